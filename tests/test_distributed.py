"""metal_moe.distributed: expert parallelism over torch.distributed.

* Multi-process: 2 and 3 local CPU processes over gloo (tests/distributed_worker.py: uneven and
  explicit partitions, a rank owning no expert, tokens routed to one rank only, empty batches,
  the router, the shared expert, fp16/bf16/fp32, routed_scaling_factor, determinism, forced
  kernels, refusals), each against the single-device fused_moe and the float64 reference, with
  every buffer poisoned; and CUDA + nccl with one process per visible GPU (skipped without one).
* In this process: a world of one over gloo, and the argument checks.

Skipped where torch is not installed (the first CI step runs without it; the next installs it).
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import metal_moe as mm
from metal_moe import reference

try:
    import torch
    import torch.distributed as dist

    HAVE_GLOO = dist.is_available() and dist.is_gloo_available()
except ImportError:
    torch = dist = None
    HAVE_GLOO = False

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TIMEOUT_S = 300

needs_gloo = pytest.mark.skipif(not HAVE_GLOO, reason="torch (with torch.distributed and gloo) is not installed")
needs_cpu = pytest.mark.skipif("cpu" not in mm.backends(), reason="the native library is not built")


def test_importable_without_torch_and_says_what_is_missing():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import metal_moe.distributed as d\n"
            "assert d.partition_experts(7, 3) == [(0, 3), (3, 5), (5, 7)]\n"
            "try:\n    d.ExpertParallelMoE(None)\n"
            "except ImportError as err:\n    assert 'torch' in str(err), err\n"
            "else:\n    raise SystemExit('no ImportError')\n")
    with tempfile.TemporaryDirectory() as tmp:          # not the checkout: the installed package
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=tmp)


def launch(backend, world):
    """Run `world` worker ranks; fail with the first failing rank's output (ending the others)."""
    with tempfile.TemporaryDirectory(prefix="metal_moe_dist_") as tmp:
        env = {**os.environ, "METAL_MOE_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        logs = [open(Path(tmp) / f"rank{r}.log", "w+") for r in range(world)]
        procs = [subprocess.Popen([sys.executable, str(WORKER), backend, str(r), str(world), str(Path(tmp) / "init")],
                                  stdout=logs[r], stderr=subprocess.STDOUT, env=env, cwd=tmp) for r in range(world)]
        deadline = time.monotonic() + TIMEOUT_S
        failed = None
        try:
            while any(p.poll() is None for p in procs) and failed is None:
                failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                if time.monotonic() > deadline:
                    failed = "timeout"
                    break
                time.sleep(0.1)
            if failed is None:
                failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        output = []
        for r, log in enumerate(logs):
            log.seek(0)
            output.append(f"--- rank {r} (exit {procs[r].returncode})\n{log.read()}")
            log.close()
        text = "\n".join(output)
        if failed == "timeout":
            pytest.fail(f"{backend} world {world}: still running after {TIMEOUT_S} s (a hang?)\n{text}")
        if failed is not None:
            pytest.fail(f"{backend} world {world}: rank {failed} failed\n{text}")
        assert text.count("refusals passed") == world, text


@needs_gloo
@needs_cpu
@pytest.mark.parametrize("world", [2, 3])
def test_gloo_cpu_processes(world):
    launch("cpu", world)


def _nccl_gpus():
    if torch is None or not torch.cuda.is_available() or not dist.is_nccl_available() or "cuda" not in mm.backends():
        return 0
    return torch.cuda.device_count()


@pytest.mark.skipif(_nccl_gpus() == 0, reason="needs a CUDA GPU, torch with nccl and the cuda backend")
def test_nccl_cuda_one_process_per_gpu():
    launch("cuda", _nccl_gpus())


# ---- one process: a world of one, and the checks ---------------------------------------------------
def test_not_initialised_is_refused():
    if not HAVE_GLOO:
        pytest.skip("torch is not installed")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from metal_moe.distributed import ExpertParallelMoE

    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(mm.MoEWeights.random(hidden=128, intermediate=128, experts=2, bits=3))


@pytest.fixture(scope="module")
def world_of_one():
    if not HAVE_GLOO:
        pytest.skip("torch (with torch.distributed and gloo) is not installed")
    if "cpu" not in mm.backends():
        pytest.skip("the native library is not built")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def layer():
    return mm.MoEWeights.random(hidden=256, intermediate=128, experts=5, bits=(4, 2, 3), shared=True, seed=11)


def test_world_of_one_is_the_single_device_call(world_of_one, layer):
    from metal_moe.distributed import ExpertParallelMoE

    moe = ExpertParallelMoE(layer)
    assert moe.backend == "cpu" and moe.local_experts == (0, 5) and "experts [0, 5) of 5" in repr(moe)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 256)).astype(np.float16)
    ids, p = reference.route(rng.standard_normal((6, 5)), 2)
    y = moe(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(p), routed_scaling_factor=1.5,
            use_fp32_acc=True)
    single = mm.fused_moe(x, ids, p, layer, routed_scaling_factor=1.5, use_fp32_acc=True)
    assert np.array_equal(y.numpy(), single)


@pytest.mark.parametrize("ranges,match", [
    ([(0, 5), (5, 5)], "one \\(start, stop\\) per rank"),
    ([(1, 5)], "contiguous"),
    ([(0, 4)], "end at 4"),
    ([(0, 6)], "end at 6"),
    ([(0, 5.0)], "pair of integers"),
    (5, "list of \\(start, stop\\) pairs"),
])
def test_bad_expert_ranges(world_of_one, layer, ranges, match):
    from metal_moe.distributed import ExpertParallelMoE

    with pytest.raises((TypeError, ValueError), match=f"^expert_ranges: .*{match}"):
        ExpertParallelMoE(layer, expert_ranges=ranges)


def test_bad_construction(world_of_one, layer):
    from metal_moe.distributed import ExpertParallelMoE

    with pytest.raises(TypeError, match="^weights: expected the layer's host MoEWeights"):
        ExpertParallelMoE(layer.gate)
    with pytest.raises(ValueError, match="^backend: 'cuda' needs a nccl process group"):
        ExpertParallelMoE(layer, backend="cuda")
    with pytest.raises(ValueError, match="^backend: expected 'cpu' or 'cuda'"):
        ExpertParallelMoE(layer, backend="metal")
    with pytest.raises(ValueError, match="^device: the cpu backend runs on the host"):
        ExpertParallelMoE(layer, device=0)


def test_bad_forward_arguments(world_of_one, layer):
    from metal_moe.distributed import ExpertParallelMoE

    moe = ExpertParallelMoE(layer)
    x = torch.zeros((3, 256), dtype=torch.float16)
    ids = torch.zeros((3, 2), dtype=torch.int32)
    p = torch.ones((3, 2))
    cases = [
        ((x.numpy(), ids, p), {}, TypeError, "^x: expected a torch tensor.*torch.from_numpy"),
        ((x.double(), ids, p), {}, TypeError, "^x: dtype torch.float64 is not accepted"),
        ((x[:, :128], ids, p), {}, ValueError, "^x: expected shape \\[tokens, 256\\]"),
        ((torch.zeros((256, 3), dtype=torch.float16).t(), ids, p), {}, ValueError, "^x: must be C-contiguous"),
        ((x, ids[:2], p), {}, ValueError, "^ids: expected 3 rows"),
        ((x, ids, p[:, :1]), {}, ValueError, "^p: expected the shape of ids"),
        ((x, ids.float(), p), {}, TypeError, "^ids: dtype torch.float32 is not accepted"),
        ((x, ids + 5, p), {}, ValueError, "^ids: 6 expert ids are outside \\[0, 5\\)"),
        ((x, ids - 1, p), {}, ValueError, "^ids: 6 expert ids are outside"),
        ((x, ids), {}, TypeError, "^ids, p: required"),
        ((x, ids, p), {"router_logits": torch.zeros((3, 5))}, ValueError, "^router_logits: pass either"),
        ((x,), {"router_logits": torch.zeros((3, 4)), "top_k": 2}, ValueError, "^router_logits: expected shape"),
        ((x,), {"router_logits": torch.zeros((3, 5))}, TypeError, "^top_k: required"),
        ((x,), {"router_logits": torch.zeros((3, 5)), "top_k": 2, "scoring": "relu"}, ValueError, "^scoring:"),
        ((x, ids, p), {"top_k": 2}, ValueError, "^top_k/bias: only used with router_logits"),
        ((x, ids, p), {"routed_scaling_factor": float("inf")}, ValueError, "^routed_scaling_factor:"),
        ((x, ids, p), {"out": torch.zeros((3, 128))}, ValueError, "^out: expected the shape of x"),
        ((x, ids, p), {"out": torch.zeros((3, 256), dtype=torch.bfloat16)}, TypeError, "^out: dtype"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            moe(*args, **kwargs)
    # the group still works after the refusals
    assert moe(x, ids, p).shape == x.shape
