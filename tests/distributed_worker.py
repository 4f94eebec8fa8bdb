"""One rank of the multi-process tests of metal_moe.distributed; tests/test_distributed.py starts
``world`` of them:

    python distributed_worker.py BACKEND RANK WORLD INIT_FILE      # BACKEND: cpu (gloo) or cuda (nccl)

Every rank runs the same scenarios in the same order (each a few collective forwards), and checks
its own tokens' outputs against the single-device ``fused_moe`` and the float64 reference
(tolerances: see check()).  Every buffer the forward allocates is poisoned with NaN
(``distributed._POISON``), and so is every ``out=`` given.  A failure prints the traceback and
exits at once with status 1; the parent then ends the other ranks instead of leaving them waiting
in a collective.
"""

import functools
import math
import os
import sys
import traceback
import zlib

import numpy as np
import torch
import torch.distributed as dist

import metal_moe as mm
from metal_moe import distributed, policy, reference
from metal_moe.distributed import ExpertParallelMoE, SectionTimer, partition_experts

from native_cases import TOL, relative_error

HIDDEN, INTERMEDIATE, RSF = 256, 128, 1.25
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OUTPUT_ROUNDING = {"float16": 2 ** -11, "bfloat16": 2 ** -8, "float32": 0.0}


@functools.lru_cache(maxsize=None)
def layer(experts, shared, bits=(4, 2, 3)):
    return mm.MoEWeights.random(hidden=HIDDEN, intermediate=INTERMEDIATE, experts=experts, bits=bits, shared=shared,
                                seed=zlib.crc32(repr((experts, shared, bits)).encode()))


class Rank:
    """This rank's backend, device and the conversions between NumPy and its tensors."""

    def __init__(self, backend, rank, world):
        self.backend, self.rank, self.world = backend, rank, world
        self.cuda = backend == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self._device_layers = {}

    def rng(self, *tag):
        return np.random.default_rng(zlib.crc32(repr((tag, self.rank)).encode()))

    def tensor(self, a, dtype=None):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device=self.device, dtype=DTYPES[dtype] if dtype else t.dtype)

    def poisoned(self, shape, dtype):
        return torch.full(shape, float("nan"), dtype=DTYPES[dtype], device=self.device)

    def single(self, w, *arrays, **kwargs):
        """The single-device fused_moe on the same tensors: y as float32 NumPy."""
        out = self.poisoned(arrays[0].shape, "float32")
        if self.cuda:
            key = id(w)
            if key not in self._device_layers:
                self._device_layers[key] = w.to("cuda", self.device.index)
            mm.fused_moe(*arrays, weights=self._device_layers[key], out=out, **kwargs)
        else:
            kwargs = {k: distributed._host(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            mm.fused_moe(*(distributed._host(a) for a in arrays), weights=w, out=distributed._host(out), **kwargs)
        return out.cpu().numpy()


def tokens(r, tag, count, experts, top_k, dtype):
    """x (a tensor of `dtype`), its exact float32 values, ids and p (NumPy, from the reference router)."""
    rng = r.rng(tag, count, experts, top_k, dtype)
    x = r.tensor(rng.standard_normal((count, HIDDEN)).astype(np.float32), dtype)
    ids, p = reference.route(rng.standard_normal((count, experts)), top_k)
    return x, x.float().cpu().numpy(), ids, p


def check(r, moe, w, x, x_values, ids, p, *, exact, kernel=None, use_fp32_acc=None, rsf=RSF, **routing):
    """Run the layer four times (twice into a new output of x's dtype, then into a poisoned float32
    out= and a poisoned out= of x's dtype) and check: shape and dtype, bitwise repeatability, every
    output of x's dtype is the float32 one rounded, the
    float32 one against the float64 reference (the kernels' tolerance for the accumulation mode,
    plus one rounding of the output's dtype) and against the single-device fused_moe: bitwise with
    ``exact`` (CPU, fp32 accumulation or a forced kernel), else within the sum of the two
    tolerances."""
    dtype = str(x.dtype).replace("torch.", "")
    args = (x,) if routing else (x, r.tensor(ids), r.tensor(p))
    kw = dict(kernel=kernel, use_fp32_acc=use_fp32_acc, routed_scaling_factor=rsf, **routing)
    y = moe(*args, **kw)
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape), (y.dtype, y.shape)
    assert torch.equal(moe(*args, **kw), y), "two calls with the same inputs differ"
    out = r.poisoned(tuple(x.shape), "float32")
    assert moe(*args, out=out, **kw) is out
    assert torch.equal(out.to(x.dtype), y), "the x-dtype output is not the float32 one rounded"
    same = r.poisoned(tuple(x.shape), dtype)
    assert moe(*args, out=same, **kw) is same and torch.equal(same, y)
    got = out.cpu().numpy()
    assert np.all(np.isfinite(got)), "non-finite values (an unwritten row?)"
    if x.shape[0] == 0:
        return
    fp32 = use_fp32_acc or (kernel is not None and not policy.accumulates_fp16(kernel))
    tol = TOL[bool(fp32)]
    ref = reference.moe_forward(x_values, ids, p, w, routed_scaling_factor=rsf)
    err = relative_error(got, ref)
    assert err <= tol, f"float32 output vs the reference: {err:.2e} > {tol:.0e}"
    err = relative_error(y.float().cpu().numpy(), ref)
    assert err <= tol + OUTPUT_ROUNDING[dtype], f"{dtype} output vs the reference: {err:.2e}"
    single = r.single(w, *args, **kw)
    if exact:
        assert np.array_equal(got, single), f"not bitwise the single-device call: {relative_error(got, single):.2e}"
    else:
        err = relative_error(got, single)
        assert err <= 2 * tol, f"vs the single-device call: {err:.2e} > {2 * tol:.0e}"


# ---- scenarios ------------------------------------------------------------------------------------
def default_partition(r):
    """E = 7 over the default partition (uneven for 2 and 3 ranks), a shared expert, every dtype,
    a different batch on every rank; fp32 accumulation (bitwise the single-device call on the CPU)
    and the policy's own choice."""
    w = layer(7, True)
    moe = ExpertParallelMoE(w)
    assert moe.expert_ranges == partition_experts(7, r.world)
    for dtype in DTYPES:
        x, xv, ids, p = tokens(r, "default", [5, 3, 9][r.rank % 3], 7, 3, dtype)
        check(r, moe, w, x, xv, ids, p, exact=not r.cuda, use_fp32_acc=True)
    x, xv, ids, p = tokens(r, "policy", [1, 17, 40][r.rank % 3], 7, 3, "float16")
    check(r, moe, w, x, xv, ids, p, exact=False)


def explicit_ranges(r):
    """Explicit ranges in which a rank owns no expert; the last rank has an empty batch."""
    w = layer(7, False)
    if r.world == 1:
        ranges = [(0, 7)]
    elif r.world == 2:
        ranges = [(0, 0), (0, 7)]
    else:
        ranges = [(0, 4), (4, 4)] + [(a + 4, b + 4) for a, b in partition_experts(3, r.world - 2)]
    moe = ExpertParallelMoE(w, expert_ranges=ranges)
    assert moe.local_experts == ranges[r.rank]
    count = 0 if r.rank == r.world - 1 and r.world > 1 else 6
    x, xv, ids, p = tokens(r, "explicit", count, 7, 2, "bfloat16")
    check(r, moe, w, x, xv, ids, p, exact=not r.cuda, use_fp32_acc=True)
    check(r, moe, w, x, xv, ids, p, exact=False)


def all_to_one_rank(r):
    """Every token routed to rank 0's experts: the other ranks receive nothing."""
    w = layer(8, True)
    moe = ExpertParallelMoE(w)
    start, stop = moe.expert_ranges[0]
    rng = r.rng("one")
    count, top_k = 7, 2
    ids = np.stack([rng.choice(np.arange(start, stop), top_k, replace=False) for _ in range(count)]).astype(np.int64)
    p = rng.uniform(0.1, 1.0, (count, top_k)).astype(np.float32)
    x, xv, _, _ = tokens(r, "one", count, 8, top_k, "float32")
    check(r, moe, w, x, xv, ids, p, exact=not r.cuda, use_fp32_acc=True)


def empty_everywhere(r):
    """No rank has a token: every exchange is empty, the outputs are [0, hidden]."""
    w = layer(7, True)
    moe = ExpertParallelMoE(w)
    x = r.tensor(np.zeros((0, HIDDEN), np.float16))
    y = moe(x, r.tensor(np.zeros((0, 2), np.int32)), r.tensor(np.zeros((0, 2), np.float32)))
    assert tuple(y.shape) == (0, HIDDEN) and y.dtype == torch.float16
    y = moe(x, router_logits=r.tensor(np.zeros((0, 7), np.float32)), top_k=2)
    assert tuple(y.shape) == (0, HIDDEN)


def router_logits(r):
    """router_logits= with both scorings, the correction bias and float16 logits: the selection of
    reference.route, and the single-device fused_moe(router_logits=...) result."""
    for shared, scoring, bias, logits_dtype in ((False, "softmax", False, "float32"),
                                                (True, "sigmoid", True, "float16")):
        w = layer(7, shared)
        moe = ExpertParallelMoE(w)
        rng = r.rng("router", scoring)
        count = [4, 11, 2][r.rank % 3]
        x, xv, _, _ = tokens(r, "router", count, 7, 3, "float16")
        logits = rng.standard_normal((count, 7)).astype(logits_dtype)
        b = rng.uniform(-0.2, 0.2, 7).astype(np.float32) if bias else None
        ids, p = reference.route(logits, 3, scoring, True, b)
        check(r, moe, w, x, xv, ids, p, exact=not r.cuda, use_fp32_acc=True, router_logits=r.tensor(logits), top_k=3,
              scoring=scoring, bias=None if b is None else r.tensor(b))


def forced_kernels(r):
    """A forced kernel= runs on every rank: bitwise the single-device call with that kernel (CPU)."""
    w = layer(7, True)
    moe = ExpertParallelMoE(w)
    x, xv, ids, p = tokens(r, "kernels", [3, 20, 35][r.rank % 3], 7, 2, "float16")
    for kernel in (policy.DECODE, policy.PREFILL4, policy.LARGE_BATCH, policy.SIMD):
        check(r, moe, w, x, xv, ids, p, exact=not r.cuda, kernel=kernel)
    # a specialised decode, with a shared expert of other bits (which the kernels run generically)
    routed = layer(7, False, (6, 2, 3))
    w = mm.MoEWeights(routed.gate, routed.up, routed.down, layer(7, True).shared)
    check(r, ExpertParallelMoE(w), w, x[:2], xv[:2], ids[:2], p[:2], exact=not r.cuda, kernel=policy.DECODE + "_6_2_3")


def refusals(r):
    """Bad input on one rank: that rank raises the error naming the argument, every other rank a
    RuntimeError naming it, nobody waits; the group works afterwards."""
    w = layer(7, True)
    moe = ExpertParallelMoE(w)
    x, _, ids, p = tokens(r, "refuse", 4, 7, 2, "float16")
    bad = r.world - 1
    for what, expected in (("ids", ValueError), ("x", TypeError)):
        xi, ii = x, ids
        if r.rank == bad and what == "ids":
            ii = ids.copy()
            ii[1, 0] = 7
        if r.rank == bad and what == "x":
            xi = x.double()
        try:
            moe(xi, r.tensor(ii), r.tensor(p))
        except expected as err:
            assert r.rank == bad and str(err).startswith(what + ":"), (r.rank, err)
        except RuntimeError as err:
            assert r.rank != bad and f"[{bad}]" in str(err), (r.rank, err)
        else:
            raise AssertionError(f"rank {r.rank}: no error for bad {what} on rank {bad}")
    assert moe(x, r.tensor(ids), r.tensor(p)).shape == x.shape
    if r.world > 1:        # ranks that disagree on the partition: every rank refuses at construction
        ranges = partition_experts(7, r.world) if r.rank else [(0, 7)] + [(7, 7)] * (r.world - 1)
        try:
            ExpertParallelMoE(w, expert_ranges=ranges)
        except ValueError as err:
            assert str(err).startswith("weights/expert_ranges:"), err
        else:
            raise AssertionError("ranks with different partitions were not refused")


def timed(r):
    """SectionTimer sees every section; communication is its counts + dispatch + return."""
    w = layer(7, True)
    moe = ExpertParallelMoE(w)
    x, _, ids, p = tokens(r, "timer", 5, 7, 2, "float16")
    timer = SectionTimer(cuda=r.cuda)
    moe(x, r.tensor(ids), r.tensor(p), timer=timer)
    totals = timer.read()
    assert {"route", "counts", "dispatch", "experts", "return", "shared", "combine"} <= set(totals), totals
    comm = timer.communication
    # isclose, not ==: since Python 3.12 sum() of floats is compensated, so it can differ from a + b + c
    # in the last bit (this was the "flaky" failure on the device, whose Python is 3.12)
    assert math.isclose(comm, totals["counts"] + totals["dispatch"] + totals["return"], rel_tol=1e-12), (comm, totals)
    assert comm > 0, (comm, totals)


SCENARIOS = [default_partition, explicit_ranges, all_to_one_rank, empty_everywhere, router_logits, forced_kernels,
             refusals, timed]


def main():
    backend, rank, world, init_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    if backend == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if backend == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    distributed._POISON = True
    r = Rank(backend, rank, world)
    for scenario in SCENARIOS:
        try:
            scenario(r)
        except BaseException:
            print(f"rank {rank}/{world}: {scenario.__name__} failed", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)          # at once: the other ranks may be waiting in a collective
        print(f"rank {rank}/{world}: {scenario.__name__} passed", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
