"""The CUDA backend: every variant against the float64 reference, the EXL3 vectors, the decoders,
zero-copy arrays (metal_moe's own, torch, cupy), streams, CUDA graphs, determinism and the checks.

Skipped where no CUDA device is usable (CI has none); run on the lent H200 before a CUDA change lands
(README, "Testing on a GPU").  Outputs are poisoned with NaN before every call.  Tolerances are the
CPU backend's (tests/native_cases.py): the kernels keep the same fp16 intermediates; fp16
accumulation on CUDA rounds the MMA's running sum once per 16-row k-slice, as the CPU does.
"""

import os

import numpy as np
import pytest

import metal_moe as mm
from metal_moe import policy, reference

from native_cases import (EXPERTS, HIDDEN, RSF, check, check_decoder_on_vectors, check_exl3_moe, every_state_weight,
                          expected, exl3_moe_case, inputs, matrix, seed_of, weights)

pytestmark = pytest.mark.skipif("cuda" not in mm.backends(),
                                reason="no usable CUDA device (or the library was built without the cuda backend)")

BATCHES = [1, 2, 3, 16, 17, 33, 64, 300]
# benchmarks/cuda_sanitize.sh runs the kernels under compute-sanitizer on a smaller matrix
SUBSET = os.environ.get("METAL_MOE_CUDA_SUBSET")
if SUBSET == "memcheck":
    CASES = matrix(bits_list=[(6, 2, 3)], batches=[3, 33, 300], shared=(True,))     # 300: the wide shape too
elif SUBSET == "racecheck":
    CASES = matrix(codebooks=["mcg"], bits_list=[(6, 2, 3)], batches=[17, 300], shared=(True,))
else:
    CASES = matrix(batches=BATCHES)

try:
    import torch

    HAVE_TORCH = torch.cuda.is_available()
except ImportError:                       # pragma: no cover - depends on the machine
    torch = None
    HAVE_TORCH = False

try:
    import cupy

    HAVE_CUPY = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:                         # pragma: no cover - depends on the machine
    cupy = None
    HAVE_CUPY = False

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch with CUDA is not installed")
EXPERTS_OUT_OF_RANGE = 1000               # an expert id no test layer has

_device_weights = {}


def device_weights(codebook, bits, shared):
    key = (codebook, bits, shared)
    if key not in _device_weights:
        _device_weights[key] = weights(codebook, bits, shared).to("cuda")
    return _device_weights[key]


def dev(a):
    return mm.DeviceArray.from_numpy(a)


def poisoned(shape, dtype=np.float32):
    return dev(np.full(shape, np.nan, dtype))


def run(variant, codebook, bits, batch, shared, out_dtype=np.float32):
    x, ids, p = inputs(batch)
    out = poisoned((batch, HIDDEN), out_dtype)
    got = mm.fused_moe(dev(x), dev(ids), dev(p), device_weights(codebook, bits, shared), kernel=variant, out=out,
                       routed_scaling_factor=RSF)
    assert got is out
    return out.numpy()


@pytest.mark.parametrize("variant,codebook,bits,batch,shared", CASES)
def test_variant_matches_reference(variant, codebook, bits, batch, shared):
    check(run(variant, codebook, bits, batch, shared), expected(codebook, bits, shared, batch), variant)


def test_every_variant_is_built():
    assert mm.variants("cuda") == policy.VARIANTS


@pytest.mark.parametrize("variant", policy.VARIANTS)
def test_exl3_moe_vector(variant):
    """The reference implementation's fused-MoE case (MCG, K 4/2/3, E=8, top-2)."""
    io, w = exl3_moe_case(variant)
    out = poisoned(io["y"].shape)
    mm.fused_moe(dev(io["x"]), dev(io["selected_experts"]), dev(io["routing_weights"]), w.to("cuda"), kernel=variant,
                 out=out)
    check_exl3_moe(out.numpy(), io, w, variant)


def _decode_on_device(trellis, k, n, kx2, codebook):
    ctx = mm.api._default_context("cuda")
    t = dev(np.ascontiguousarray(trellis))
    out = dev(np.full((k, n), 0xFFFF, np.uint16))
    ctx.decode_pointers(t.ptr, k, n, kx2, codebook, out.ptr)
    return out.numpy()


def test_decoder_is_bit_exact_on_the_vectors():
    check_decoder_on_vectors(_decode_on_device)


@pytest.mark.parametrize("codebook", ["3inst", "mcg", "mul1"])
def test_decoder_covers_every_state(codebook):
    """All 65536 states occur (as in the CPU test)."""
    w = every_state_weight(codebook)
    assert np.array_equal(_decode_on_device(w.trellis, 256, 512, 16, codebook), w.decode().view(np.uint16))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 1.5, 2.5, 3.5])
def test_decoder_every_rate(bits):
    cb = "mul1" if bits != int(bits) else "mcg"
    w = mm.TrellisWeight.random(256, 384, bits, cb, rng=np.random.default_rng(seed_of("rate", bits)))
    assert np.array_equal(_decode_on_device(w.trellis, 256, 384, int(round(2 * bits)), cb), w.decode().view(np.uint16))


@pytest.mark.parametrize("x_dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("out_dtype", ["float16", "float32", "bfloat16"])
def test_activation_dtypes(x_dtype, out_dtype):
    x, ids, p = inputs(5)
    w = weights("mcg", (6, 2, 3), True)

    def as_dtype(a, name):
        if name == "bfloat16":       # uint16 storage: round to nearest even
            u = a.astype(np.float32).view(np.uint32)
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return a.astype(name)

    xs = as_dtype(x, x_dtype)
    x_used = (xs.astype(np.uint32) << 16).view(np.float32) if x_dtype == "bfloat16" else xs
    ref = reference.moe_forward(x_used, ids, p, w, routed_scaling_factor=RSF)
    store = np.uint16 if out_dtype == "bfloat16" else out_dtype
    out = dev(np.full((5, HIDDEN), 0x7FC0 if out_dtype == "bfloat16" else np.nan, store))
    mm.fused_moe(dev(xs), dev(ids.astype(np.int64)), dev(p.astype(np.float16)), w.to("cuda"), out=out,
                 routed_scaling_factor=RSF)
    y = out.numpy()
    y = (y.astype(np.uint32) << 16).view(np.float32) if out_dtype == "bfloat16" else y.astype(np.float32)
    # p in float16 and the output rounding add up to one fp16/bf16 rounding each
    tol = 1e-2 if "bfloat16" in (x_dtype, out_dtype) else 5e-3
    assert np.all(np.isfinite(y))
    assert np.abs(y - ref).max() / np.abs(ref).max() <= tol


def test_deterministic_across_calls():
    w = device_weights("3inst", (6, 2, 3), True)
    x, ids, p = inputs(300)
    for variant in (policy.LARGE_BATCH, policy.SIMD, policy.GENERAL, policy.PREFILL4):
        outs = []
        for _ in range(3):
            out = poisoned((300, HIDDEN))
            mm.fused_moe(dev(x), dev(ids), dev(p), w, kernel=variant, out=out)
            outs.append(out.numpy())
        assert all(np.array_equal(outs[0], o) for o in outs[1:]), variant


def test_invalid_ids_make_nan_rows_and_are_counted():
    w = device_weights("mcg", (4, 2, 3), False)
    x, ids, p = inputs(4)
    ids = ids.copy()
    ids[2, 1] = 99
    mm.reset_stats()
    out = poisoned((4, HIDDEN))
    mm.fused_moe(dev(x), dev(ids), dev(p), w, out=out)
    y = out.numpy()
    assert np.all(np.isnan(y[2])) and np.all(np.isfinite(np.delete(y, 2, axis=0)))
    assert mm.stats()["cuda_invalid_ids"] == 1


def test_invalid_ids_with_direct_tiles():
    """The decode variants take one slot per CTA (no routing block): an invalid id is counted by the
    input rotation and its token's row is NaN, also when every id of the token is invalid."""
    w = device_weights("3inst", (6, 2, 3), True)
    x, ids, p = inputs(3)
    ids = ids.copy()
    ids[0, 1] = -1
    ids[2, :] = EXPERTS_OUT_OF_RANGE
    for variant in (policy.DECODE, "moe_trellis_swiglu_decode_6_2_3"):
        mm.reset_stats()
        out = poisoned((3, HIDDEN))
        mm.fused_moe(dev(x), dev(ids), dev(p), w, kernel=variant, out=out)
        y = out.numpy()
        assert np.all(np.isnan(y[0])) and np.all(np.isnan(y[2])) and np.all(np.isfinite(y[1])), variant
        assert mm.stats()["cuda_invalid_ids"] == 1 + ids.shape[1], variant


@pytest.mark.parametrize("variant", [policy.DECODE, policy.PREFILL4, policy.GENERAL + policy.FP32ACC, policy.LARGE_BATCH])
def test_token_with_no_valid_slot_gets_a_nan_row(variant):
    """Without a shared expert, a token whose every id is invalid reaches no down CTA, so mm_prep writes
    its NaN row: the output is poisoned with a finite value here, so that a missing write shows."""
    w = device_weights("mcg", (4, 2, 3), False)
    x, ids, p = inputs(5)
    ids = ids.copy()
    ids[3, :] = EXPERTS_OUT_OF_RANGE
    out = dev(np.full((5, HIDDEN), 7.0, np.float32))
    mm.fused_moe(dev(x), dev(ids), dev(p), w, kernel=variant, out=out)
    y = out.numpy()
    assert np.all(np.isnan(y[3])), variant
    assert np.all(np.isfinite(np.delete(y, 3, axis=0))) and not np.any(np.delete(y, 3, axis=0) == 7.0), variant


_LAUNCH_ENV_SCRIPT = """
import os, sys, numpy as np, metal_moe as mm
sys.path.insert(0, {tests!r})
from native_cases import EXPERTS, HIDDEN, inputs, weights
print(mm.Context("cuda").simd)
dims = {dims!r}
w = weights("mcg", (6, 2, 3), True, **dims).to("cuda")
for batch, variant in {cases!r}:
    x, ids, p = inputs(batch, experts=dims.get("experts", EXPERTS))
    out = mm.DeviceArray.from_numpy(np.full((batch, HIDDEN), np.nan, np.float32))
    mm.fused_moe(mm.DeviceArray.from_numpy(x), mm.DeviceArray.from_numpy(ids), mm.DeviceArray.from_numpy(p), w,
                 kernel=variant, out=out)
    np.save(os.path.join({folder!r}, f"{{batch}}_{{variant}}.npy"), out.numpy())
"""


def _run_with_env(tmp_path, env, cases, with_stderr=False, dims=None):
    """Runs `cases` [(batch, variant)] in a fresh process with `env` added: (Context.simd, {case: output}),
    and the process's stderr (where METAL_MOE_CUDA_TRACE=1 writes) if with_stderr.  `dims`: the
    weights' {experts, intermediate} where not native_cases' own."""
    import subprocess
    import sys

    script = _LAUNCH_ENV_SCRIPT.format(tests=os.path.dirname(__file__), cases=cases, folder=str(tmp_path),
                                       dims=dims or {})
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = done.stdout.splitlines()[0], {c: np.load(tmp_path / f"{c[0]}_{c[1]}.npy") for c in cases}
    return (*result, done.stderr) if with_stderr else result


def test_programmatic_launches_change_no_bit(tmp_path):
    """METAL_MOE_CUDA_PDL=0 (ordinary launches) gives bitwise the same results as the default."""
    cases = [(1, policy.DECODE), (5, policy.PREFILL4), (33, policy.GENERAL + policy.FP32ACC), (64, policy.LARGE_BATCH)]
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    _, on = _run_with_env(tmp_path / "on", {}, cases)
    simd_off, off = _run_with_env(tmp_path / "off", {"METAL_MOE_CUDA_PDL": "0"}, cases)
    assert "programmatic launches" not in simd_off
    for case in cases:
        assert np.all(np.isfinite(on[case])), case
        assert np.array_equal(on[case], off[case]), case


def _check_cases(got, cases, dims=None):
    """Each case's output from the env script (mcg, 6/2/3, shared expert) against the reference."""
    dims = dims or {}
    for batch, variant in cases:
        x, ids, p = inputs(batch, experts=dims.get("experts", EXPERTS))
        expected = reference.moe_forward(x, ids, p, weights("mcg", (6, 2, 3), True, **dims))
        check(got[(batch, variant)], expected, variant)


def _two_forced_settings(tmp_path, name, settings, cases):
    """Runs `cases` once per {value: text in Context.simd} of the environment setting `name`; every
    result must match the reference (the env script calls without a routed scaling factor), and the
    two settings' results must not be bitwise equal (each test says why they would not be)."""
    got = {}
    for value, text in settings.items():
        (tmp_path / value).mkdir()
        simd, got[value] = _run_with_env(tmp_path / value, {name: value}, cases)
        assert text in simd
        _check_cases(got[value], cases)
    first, second = settings
    for case in cases:
        assert not np.array_equal(got[first][case], got[second][case]), f"{case}: {name} made no difference"


def test_every_shape_of_the_fp32_general_variant(tmp_path):
    """METAL_MOE_CUDA_WIDE=0 / 1 / 2 force the fp32 general variant's own shape, its 128-slot and its
    32-slot wide shape (the std orientation) at batch sizes where the default picks another: nearly
    empty wide tiles (batch 3, 17: most fragments skipped) and many-tile calls (batch 300) match the
    reference, the diagnostic is named in Context.simd, and the trace on stderr shows which shape ran
    (outputs cannot tell: two shapes may add the same products in the same order)."""
    variant = policy.GENERAL + policy.FP32ACC
    cases = [(3, variant), (17, variant), (300, variant)]
    forced = {"0": ("wide tiles off", "own shape (16 slots per tile)"),
              "1": ("wide tiles always", "wide shape (128 slots per tile)"),
              "2": ("32-slot wide tiles always", "wide shape (32 slots per tile)")}
    for value, (simd_text, shape) in forced.items():
        (tmp_path / value).mkdir()
        simd, got, trace = _run_with_env(tmp_path / value, {"METAL_MOE_CUDA_WIDE": value, "METAL_MOE_CUDA_TRACE": "1"},
                                         cases, with_stderr=True)
        assert simd_text in simd, simd
        plans = [line for line in trace.splitlines() if line.startswith("metal_moe cuda:")]
        assert len(plans) == len(cases) and all(f", {shape}" in line for line in plans), trace
        _check_cases(got, cases)


def test_small_shapes_of_99_kb_devices(tmp_path):
    """METAL_MOE_CUDA_SMALL=1 runs every call in the shapes that GPUs with 99 KB of shared memory per
    block (sm_86, sm_89) get: one k-group, two weight stages, at most 32 slots per tile, K chunks of
    128.  Every variant at batch sizes with partial tiles, one full tile, several tiles per expert
    (batch 300: where the fp32 general variant would take its wide shape) and K split across CTAs
    (METAL_MOE_CUDA_SPLIT=2 on the fp32 variants) matches the reference; Context.simd and the trace say
    the small shapes ran, also with the wide shape asked for (METAL_MOE_CUDA_WIDE=1, which a small-shape
    context ignores, so Context.simd does not claim it)."""
    fp32 = policy.FP32ACC
    cases = [(1, policy.DECODE), (1, policy.DECODE + "_6_2_3"), (3, policy.PREFILL4), (5, policy.PREFILL4 + fp32),
             (3, policy.PREFILL4 + fp32), (17, policy.GENERAL), (33, policy.GENERAL + fp32),
             (300, policy.GENERAL + fp32), (64, policy.LARGE_BATCH), (300, policy.LARGE_BATCH),
             (33, policy.SIMD), (3, policy.SIMD)]
    for split in ("", "2"):
        (tmp_path / f"split{split}").mkdir()
        env = {"METAL_MOE_CUDA_SMALL": "1", "METAL_MOE_CUDA_TRACE": "1", "METAL_MOE_CUDA_SPLIT": split,
               "METAL_MOE_CUDA_WIDE": "1" if split else ""}
        simd, got, trace = _run_with_env(tmp_path / f"split{split}", env, cases, with_stderr=True)
        assert "small shapes" in simd and "wgmma" not in simd and "wide tiles" not in simd, simd
        plans = [line for line in trace.splitlines() if line.startswith("metal_moe cuda:")]
        assert len(plans) == len(cases) and all(", small shape (" in line for line in plans), trace
        if split:
            assert all("K split 2" in line for line, (_, v) in zip(plans, cases) if v.endswith(fp32)), trace
        _check_cases(got, cases)


def test_fp16_variants_take_their_small_shape_from_a_full_wave(tmp_path):
    """In the default shapes prefill4 and the fp16 general variant keep their own shape while its grid
    is short of two waves (batch 3: a few tiles) and take their small shape from there on (batch 2000:
    hundreds of tiles).  large_batch takes its small shape (32 slots per tile) where its own grid fills
    a wave and an expert has fewer than 32 routed slots (64 experts x 1536 intermediate at batch 16),
    and its own (64 slots) where the grid is short of a wave (the 8 experts of native_cases at batch 16)
    or the experts are fuller (batch 1100: 34 routed slots per expert).  METAL_MOE_CUDA_SMALL=0 keeps
    every one in its own shape.  The trace on stderr names the shape of each call, and every one
    matches the reference."""
    small_dims = [(3, policy.PREFILL4, "own shape (4"), (2000, policy.PREFILL4, "small shape (4"),
                  (3, policy.GENERAL, "own shape (16"), (2000, policy.GENERAL, "small shape (16"),
                  (16, policy.LARGE_BATCH, "own shape (64")]
    big_dims = [(16, policy.LARGE_BATCH, "small shape (32"), (1100, policy.LARGE_BATCH, "own shape (64")]
    for setting in ("rule", "0"):
        for dims, expect in ((None, small_dims), ({"experts": 64, "intermediate": 1536}, big_dims)):
            folder = tmp_path / f"{setting}_{len(expect)}"
            folder.mkdir()
            cases = [(batch, variant) for batch, variant, _ in expect]
            env = {"METAL_MOE_CUDA_TRACE": "1", "METAL_MOE_CUDA_SMALL": setting}
            simd, got, trace = _run_with_env(folder, env, cases, with_stderr=True, dims=dims)
            if "small shapes" in simd:
                pytest.skip(f"this device runs every call in the small shapes: {simd}")
            assert ("fp16 variants in their own shapes only" in simd) == (setting == "0"), simd
            plans = [line for line in trace.splitlines() if line.startswith("metal_moe cuda:")]
            assert len(plans) == len(cases), trace
            for plan, (_, _, shape) in zip(plans, expect):
                if setting == "0":
                    shape = "own shape (64" if "32" in shape else shape.replace("small", "own")
                assert f", {shape} slots per tile)" in plan, (setting, shape, plan)
            _check_cases(got, cases, dims)


def test_wide_shape_on_wgmma_and_on_mma_sync(tmp_path):
    """On compute capability 9.0, METAL_MOE_CUDA_WGMMA=1 runs the wide shape on wgmma (sm_90a code, found
    by the context's probe kernel); =0 (and the default) on mma.sync.  Both match the reference with the wide shape
    forced at batch 3 and 17 (one n32 wgmma per projection and k-tile: most of the tile empty; K split
    across CTAs) and 300 (tiles of 75 routed slots and the shared expert's 128, 128, 44: n128 and n64),
    and the trace on stderr shows which ran: the two may give bitwise equal sums, so the outputs cannot
    tell.  Elsewhere (sm_80) Context.simd never names wgmma; a 9.0 GPU running the compute_90 PTX (the
    probe runs only when wgmma is asked for) says "wgmma unavailable", and the test is skipped."""
    simd = mm.Context("cuda").simd
    if not simd.startswith("sm_90 "):
        assert "wgmma" not in simd
        pytest.skip(f"wgmma needs compute capability 9.0 (this device: {simd})")
    assert "wgmma off" in simd                                   # the default
    variant = policy.GENERAL + policy.FP32ACC
    cases = [(3, variant), (17, variant), (300, variant)]
    for value, simd_text, shape in (("1", "wgmma wide tiles", "wide (wgmma) shape"), ("0", "wgmma off", "wide shape")):
        (tmp_path / value).mkdir()
        simd, got, trace = _run_with_env(tmp_path / value, {"METAL_MOE_CUDA_WGMMA": value, "METAL_MOE_CUDA_WIDE": "1",
                                                            "METAL_MOE_CUDA_TRACE": "1"}, cases, with_stderr=True)
        if "wgmma unavailable" in simd:
            pytest.skip(f"the sm_90a code is not what runs here: {simd}")
        assert simd_text in simd, simd
        plans = [line for line in trace.splitlines() if line.startswith("metal_moe cuda:")]
        assert len(plans) == len(cases) and all(f", {shape} (128 slots per tile)" in line for line in plans), trace
        _check_cases(got, cases)


def test_forced_k_splits_match_the_reference(tmp_path):
    """METAL_MOE_CUDA_SPLIT=1 (never) and =3 (three ways, capped at a projection's steps) wherever a call
    may split (fp32 accumulation): the fixed-order reduction matches the reference either way, Context.simd
    names the diagnostic, and the forced counts really ran: here every case splits at least one
    projection under =3 (the test layer's gate/up has 2 steps, its down 3) and none under =1, so the
    partial sums are added in different orders and the outputs are not bitwise equal."""
    cases = [(1, policy.DECODE), (5, policy.PREFILL4 + policy.FP32ACC), (33, policy.GENERAL + policy.FP32ACC),
             (300, policy.GENERAL + policy.FP32ACC)]
    _two_forced_settings(tmp_path, "METAL_MOE_CUDA_SPLIT", {"1": "K split forced to 1", "3": "K split forced to 3"},
                         cases)


def test_timing_diagnostic_says_so(tmp_path):
    """METAL_MOE_CUDA_LAUNCHES=1..3 (timing only) is named in Context.simd; other values are ignored."""
    simd, _ = _run_with_env(tmp_path, {"METAL_MOE_CUDA_LAUNCHES": "2"}, [])
    assert "TIMING ONLY" in simd
    simd, _ = _run_with_env(tmp_path, {"METAL_MOE_CUDA_LAUNCHES": "7"}, [])
    assert "TIMING ONLY" not in simd


def test_fp16_overflow_is_rerun_on_the_device():
    from test_cpu_backend import _overflowing_weights

    w, x = _overflowing_weights()
    ids = np.array([[0, 1]] * 4, np.int32)
    p = np.full((4, 2), 0.5, np.float32)
    ref = reference.moe_forward(x, ids, p, w)
    mm.reset_stats()
    mm.api._warned["cuda_fallback"] = False
    out = poisoned((4, 256))
    mm.fused_moe(dev(x), dev(ids), dev(p), w.to("cuda"), kernel=policy.PREFILL4, out=out)
    with pytest.warns(RuntimeWarning, match="re-run with fp32"):
        reruns = mm.stats()["cuda_fp32_reruns"]
    assert reruns > 0
    check(out.numpy(), ref, policy.PREFILL4 + "_fp32acc")


def test_host_and_device_data_are_not_mixed():
    x, ids, p = inputs(3)
    host_w = weights("mcg", (4, 2, 3), False)
    w = device_weights("mcg", (4, 2, 3), False)
    with pytest.raises(TypeError, match="weights.to\\('cuda'\\)"):
        mm.fused_moe(dev(x), dev(ids), dev(p), host_w)
    with pytest.raises(ValueError, match="ids: is a host array"):
        mm.fused_moe(dev(x), ids, dev(p), w)
    with pytest.raises(ValueError, match="x: is a host array"):
        mm.fused_moe(x, dev(ids), dev(p), w)
    with pytest.raises(ValueError, match="out: is a host array"):
        mm.fused_moe(dev(x), dev(ids), dev(p), w, out=np.empty((3, HIDDEN), np.float32))
    with pytest.raises(ValueError, match="backend"):
        mm.fused_moe(dev(x), dev(ids), dev(p), w, backend="cpu")
    with pytest.raises(ValueError, match="num_threads"):
        mm.fused_moe(dev(x), dev(ids), dev(p), w, num_threads=2)


def test_c_layer_refuses_host_pointers():
    """The C checks catch what a caller of the raw entry point could get wrong."""
    w = device_weights("mcg", (4, 2, 3), False)
    x, ids, p = inputs(2)
    ctx = mm.api._default_context("cuda")
    dx, did, dp, out = dev(x), dev(ids), dev(p), poisoned((2, HIDDEN))
    with pytest.raises(ValueError, match="ids: is host memory"):
        ctx.forward_pointers(w.descriptor, (dx.ptr, "float16", 2, HIDDEN), (ids.ctypes.data, "int32", 2, 2),
                             (dp.ptr, "float32", 2, 2), (out.ptr, "float32", 2, HIDDEN), policy.DECODE)
    host = weights("mcg", (4, 2, 3), False)
    desc = list(w.descriptor)
    desc[3] = (host.gate.trellis.ctypes.data,) + desc[3][1:]
    with pytest.raises(ValueError, match="weights.gate.trellis: is host memory"):
        ctx.forward_pointers(tuple(desc), (dx.ptr, "float16", 2, HIDDEN), (did.ptr, "int32", 2, 2),
                             (dp.ptr, "float32", 2, 2), (out.ptr, "float32", 2, HIDDEN), policy.DECODE)


def test_device_weights_round_trip():
    w = weights("mul1", (2.5, 1.5, 3.5), True)
    back = w.to("cuda").to("cpu")
    for a, b in zip(w.projections + w.shared, back.projections + back.shared):
        assert np.array_equal(a.trellis, b.trellis) and np.array_equal(a.suh, b.suh) and a.codebook == b.codebook


# ---- torch: zero-copy, streams, graphs ------------------------------------------------------------
def _torch_inputs(batch):
    x, ids, p = inputs(batch)
    return (torch.from_numpy(x).cuda(), torch.from_numpy(ids).cuda(), torch.from_numpy(p).cuda())


@needs_torch
def test_torch_arrays_zero_copy_and_current_stream():
    w = device_weights("3inst", (6, 2, 3), True)
    x, ids, p = _torch_inputs(17)
    ref = reference.moe_forward(*inputs(17), weights("3inst", (6, 2, 3), True))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = torch.full((17, HIDDEN), float("nan"), device="cuda", dtype=torch.float32)
        got = mm.fused_moe(x, ids, p, w, out=out)
    side.synchronize()
    assert got is out
    check(out.cpu().numpy(), ref, policy.select(17, False, 6, 2, 3).name)
    # out=None allocates like x, with x's dtype
    y = mm.fused_moe(x, ids, p, w)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float16 and y.device == x.device


@needs_torch
def test_torch_bfloat16_and_noncontiguous():
    w = device_weights("3inst", (6, 2, 3), False)
    x, ids, p = _torch_inputs(8)
    y = mm.fused_moe(x.to(torch.bfloat16), ids, p, w)
    assert y.dtype == torch.bfloat16
    ref = reference.moe_forward(x.to(torch.bfloat16).float().cpu().numpy(), ids.cpu().numpy(), p.cpu().numpy(),
                                weights("3inst", (6, 2, 3), False))
    assert np.abs(y.float().cpu().numpy() - ref).max() / np.abs(ref).max() <= 1e-2
    wide = torch.zeros((8, 2 * HIDDEN), device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="x: must be C-contiguous"):
        mm.fused_moe(wide[:, ::2], ids, p, w)
    with pytest.raises(ValueError, match="x: is a torch tensor on cpu|x: is a host array"):
        mm.fused_moe(x.cpu(), ids, p, w)


@needs_torch
def test_device_weights_from_torch_arrays_without_copy():
    host = weights("mcg", (4, 2, 3), True)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).cuda()

    triples = [(t(w.trellis), t(w.suh), t(w.svh)) for w in host.projections]
    shared = [(t(w.trellis), t(w.suh), t(w.svh)) for w in host.shared]
    dw = mm.DeviceWeights.from_arrays(*triples, codebook="mcg", shared=shared)
    assert dw.descriptor[3][0] == triples[0][0].data_ptr()          # the caller's memory, not a copy
    assert dw.bits == (4, 2, 3)
    x, ids, p = _torch_inputs(5)
    y = mm.fused_moe(x, ids, p, dw, out=torch.full((5, HIDDEN), float("nan"), device="cuda"))
    check(y.cpu().numpy(), reference.moe_forward(*inputs(5), host), policy.select(5, False, 4, 2, 3).name)
    with pytest.raises(TypeError, match="gate.suh: dtype float32"):
        mm.DeviceWeights.from_arrays((triples[0][0], triples[0][1].float(), triples[0][2]), *triples[1:])


def _warm_up_and_capture(call):
    """`call()` once on a side stream (it sizes the workspace), then captured in a torch CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


@needs_torch
@pytest.mark.parametrize("batch", [1, 33])
def test_cuda_graph_capture_and_replay(batch):
    w = device_weights("3inst", (6, 2, 3), True)
    x, ids, p = _torch_inputs(batch)
    out = torch.full((batch, HIDDEN), float("nan"), device="cuda")
    graph = _warm_up_and_capture(lambda: mm.fused_moe(x, ids, p, w, out=out))
    for seed in range(3):                                  # new inputs in the captured buffers
        xs, idss, ps = inputs(batch, seed=seed + 1)
        x.copy_(torch.from_numpy(xs))
        ids.copy_(torch.from_numpy(idss))
        p.copy_(torch.from_numpy(ps))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.moe_forward(xs, idss, ps, weights("3inst", (6, 2, 3), True))
        check(out.cpu().numpy(), ref, policy.select(batch, False, 6, 2, 3).name)


@needs_torch
def test_capture_refuses_to_grow_the_workspace():
    w = device_weights("mcg", (4, 2, 3), False)
    ctx = mm.Context("cuda")                                 # a fresh context: no workspace yet
    x, ids, p = _torch_inputs(16)
    out = torch.empty((16, HIDDEN), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(mm._native.UnsupportedError, match="before capturing"):
        with torch.cuda.graph(graph):
            mm.fused_moe(x, ids, p, w, out=out, context=ctx)


@needs_torch
def test_explicit_stream_argument():
    w = device_weights("mcg", (4, 2, 3), False)
    x, ids, p = _torch_inputs(3)
    s = torch.cuda.Stream()
    out = torch.full((3, HIDDEN), float("nan"), device="cuda")
    mm.fused_moe(x, ids, p, w, out=out, stream=s)
    s.synchronize()
    check(out.cpu().numpy(), reference.moe_forward(*inputs(3), weights("mcg", (4, 2, 3), False)),
          policy.select(3, False, 4, 2, 3).name)
    with pytest.raises(TypeError, match="stream"):
        mm.fused_moe(x, ids, p, w, out=out, stream="fast")


@pytest.mark.skipif(not HAVE_CUPY, reason="cupy is not installed")
def test_cupy_arrays_zero_copy():
    w = device_weights("mul1", (2.5, 1.5, 3.5), True)
    x, ids, p = inputs(16)
    out = cupy.full((16, HIDDEN), cupy.nan, dtype=cupy.float32)
    mm.fused_moe(cupy.asarray(x), cupy.asarray(ids), cupy.asarray(p), w, out=out)
    cupy.cuda.get_current_stream().synchronize()
    check(cupy.asnumpy(out), reference.moe_forward(x, ids, p, weights("mul1", (2.5, 1.5, 3.5), True)),
          policy.select(16, False, 2.5, 1.5, 3.5).name)


@needs_torch
@pytest.mark.parametrize("scoring,with_bias,renormalize", [("softmax", False, True), ("sigmoid", True, True),
                                                           ("sigmoid", False, False)])
def test_router_on_the_device_matches_the_reference(scoring, with_bias, renormalize):
    w = device_weights("mcg", (4, 2, 3), True)
    rng = np.random.default_rng(7)
    for experts, top_k, tokens in ((8, 2, 33), (256, 8, 5), (1000, 16, 3)):
        logits = (3 * rng.standard_normal((tokens, experts))).astype(np.float32)
        bias = rng.uniform(-0.2, 0.2, experts).astype(np.float32) if with_bias else None
        ids = torch.full((tokens, top_k), -1, dtype=torch.int32, device="cuda")
        p = torch.full((tokens, top_k), float("nan"), device="cuda")
        lt = torch.from_numpy(logits).cuda()
        bt = torch.from_numpy(bias).cuda() if bias is not None else None
        ctx = mm.api._default_context("cuda")
        ctx.route_pointers((lt.data_ptr(), "float32", tokens, experts), top_k, scoring, renormalize,
                           0 if bt is None else bt.data_ptr(), ids.data_ptr(), p.data_ptr(),
                           torch.cuda.current_stream().cuda_stream)
        ref_ids, ref_p = reference.route(logits, top_k, scoring, renormalize, bias)
        assert np.array_equal(ids.cpu().numpy(), ref_ids)
        np.testing.assert_allclose(p.cpu().numpy(), ref_p, rtol=1e-6, atol=1e-30)
    x, _, _ = inputs(9)
    logits = rng.standard_normal((9, 8)).astype(np.float32)
    bias = np.linspace(-0.1, 0.1, 8).astype(np.float32) if with_bias else None
    out = torch.full((9, HIDDEN), float("nan"), device="cuda")
    mm.fused_moe(torch.from_numpy(x).cuda(), weights=w, router_logits=torch.from_numpy(logits).cuda(), top_k=2,
                 scoring=scoring, renormalize=renormalize, out=out,
                 bias=None if bias is None else torch.from_numpy(bias).cuda())
    ids, p = reference.route(logits, 2, scoring, renormalize, bias)
    check(out.cpu().numpy(), reference.moe_forward(x, ids, p, weights("mcg", (4, 2, 3), True)),
          policy.select(9, False, 4, 2, 3).name)


@needs_torch
@pytest.mark.parametrize("batch", [1, 17])
def test_routing_in_the_call_is_graph_capturable(batch):
    """fused_moe with router_logits= captured in one CUDA graph (router kernel + the three launches;
    ids and p come from the graph's own pool): replays with new logits and inputs in the captured
    buffers route again on the device and match the reference routing and forward."""
    w = device_weights("3inst", (6, 2, 3), True)
    experts = w.experts
    rng = np.random.default_rng(batch)
    x = torch.zeros((batch, HIDDEN), dtype=torch.float16, device="cuda")
    logits = torch.zeros((batch, experts), dtype=torch.float32, device="cuda")
    out = torch.full((batch, HIDDEN), float("nan"), device="cuda")
    graph = _warm_up_and_capture(lambda: mm.fused_moe(x, weights=w, router_logits=logits, top_k=2, scoring="sigmoid",
                                                      renormalize=True, out=out))
    for _ in range(3):
        xs = rng.standard_normal((batch, HIDDEN)).astype(np.float16)
        ls = (3 * rng.standard_normal((batch, experts))).astype(np.float32)
        x.copy_(torch.from_numpy(xs))
        logits.copy_(torch.from_numpy(ls))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ids, p = reference.route(ls, 2, "sigmoid", True)
        check(out.cpu().numpy(), reference.moe_forward(xs, ids, p, weights("3inst", (6, 2, 3), True)),
              policy.select(batch, False, 6, 2, 3).name)


@pytest.mark.parametrize("batch", [1, 3])
def test_split_k_matches_the_reference_and_is_deterministic(batch):
    """Small batches of wide layers split K across CTAs (the fp32 variants): each split spans
    several staging chunks here, and the last CTA adds the partials in a fixed order."""
    w = mm.MoEWeights.random(hidden=1024, intermediate=1536, experts=8, bits=(6, 2, 3), shared=True, seed=21)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 1024)).astype(np.float16)
    ids, p = reference.route(rng.standard_normal((batch, 8)), 2)
    ref = reference.moe_forward(x, ids, p, w)
    dw = w.to("cuda")
    for variant in (policy.DECODE, policy.PREFILL4 + "_fp32acc", policy.SIMD):
        outs = []
        for _ in range(2):
            out = poisoned((batch, 1024))
            mm.fused_moe(dev(x), dev(ids), dev(p), dw, kernel=variant, out=out)
            outs.append(out.numpy())
        check(outs[0], ref, variant)
        assert np.array_equal(outs[0], outs[1]), variant
