"""The CPU backend: every variant against the float64 reference, both instruction sets, the EXL3
MoE vector, dtypes, determinism, threads and the decoders.  Outputs are poisoned with NaN first."""

import concurrent.futures
import os

import numpy as np
import pytest

import metal_moe as mm
from metal_moe import policy, reference

from native_cases import (EXPERTS, HIDDEN, RSF, TOP_K, check, check_decoder_on_vectors, check_exl3_moe,
                          every_state_weight, expected, exl3_moe_case, inputs, matrix, seed_of, weights)

pytestmark = pytest.mark.skipif("cpu" not in mm.backends(), reason="the native library is not built")

ISAS = ["auto", "scalar"]


_contexts = {}


def _context(isa):
    if isa not in _contexts:
        _contexts[isa] = mm.Context("cpu", cpu_isa=isa)
    return _contexts[isa]


def run(ctx, variant, codebook, bits, batch, shared, out_dtype=np.float32):
    x, ids, p = inputs(batch)
    out = np.full((batch, HIDDEN), np.nan, dtype=out_dtype)
    got = mm.fused_moe(x, ids, p, weights(codebook, bits, shared), kernel=variant, out=out,
                       routed_scaling_factor=RSF, context=ctx)
    assert got is out
    return out


@pytest.mark.parametrize("variant,codebook,bits,batch,shared", matrix())
def test_variant_matches_reference_simd(variant, codebook, bits, batch, shared):
    ctx = _context("auto")
    check(run(ctx, variant, codebook, bits, batch, shared), expected(codebook, bits, shared, batch), variant)


@pytest.mark.parametrize("variant,codebook,bits,batch,shared",
                         matrix(bits_list=[(6, 2, 3), (1, 8, 5)], batches=[1, 5, 33], shared=(True,)))
def test_variant_matches_reference_scalar(variant, codebook, bits, batch, shared):
    ctx = _context("scalar")
    assert ctx.simd == "scalar"
    check(run(ctx, variant, codebook, bits, batch, shared), expected(codebook, bits, shared, batch), variant)


def test_the_simd_path_is_the_default_where_the_processor_has_it():
    simd = _context("auto").simd
    assert simd in ("avx2+fma+f16c", "scalar")
    if os.uname().machine == "x86_64":
        flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
        if {"avx2", "fma", "f16c"} <= set(flags):
            assert simd == "avx2+fma+f16c"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("variant", policy.VARIANTS)
def test_exl3_moe_vector(isa, variant):
    """The reference implementation's fused-MoE case (MCG, K 4/2/3, E=8, top-2) through every variant."""
    io, w = exl3_moe_case(variant)
    out = np.full(io["y"].shape, np.nan, np.float32)
    mm.fused_moe(io["x"], io["selected_experts"], io["routing_weights"], w, kernel=variant, out=out,
                 context=_context(isa))
    check_exl3_moe(out, io, w, variant)


@pytest.mark.parametrize("isa", ISAS)
def test_decoders_are_bit_exact(isa):
    """The kernels' decoders (the shared header's bit stream and codebooks) against every vector."""
    ctx = _context(isa)

    def decode(trellis, k, n, kx2, codebook):
        out = np.full((k, n), 0xFFFF, np.uint16)
        ctx.decode(trellis, k, n, kx2, codebook, out, True)
        return out

    check_decoder_on_vectors(decode)
    for kx2 in range(2, 17):
        for cb in ("3inst", "mcg", "mul1"):
            if kx2 % 2 and (cb != "mul1" or kx2 > 7):
                continue
            w = mm.TrellisWeight.random(128, 256, kx2 / 2, cb, rng=seed_of(kx2, cb))
            assert np.array_equal(decode(w.trellis, 128, 256, kx2, cb), w.decode().view(np.uint16)), (kx2, cb)


@pytest.mark.parametrize("x_dtype", ["float16", "float32", "bfloat16"])
def test_activation_dtypes(x_dtype):
    x16, ids, p = inputs(5)
    w = weights("mcg", (4, 2, 3), True)
    if x_dtype == "bfloat16":
        x = (x16.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)   # exact: bf16 of fp16 values
        xf = (x.astype(np.uint32) << 16).view(np.float32)
    else:
        x = x16.astype(x_dtype)
        xf = x.astype(np.float32)
    ref = reference.moe_forward(xf, ids, p, w)
    out = mm.fused_moe(x, ids.astype(np.int64), p.astype(np.float16), w, kernel=policy.PREFILL4 + "_fp32acc")
    assert out.dtype == x.dtype and out.shape == x.shape
    y = (out.astype(np.uint32) << 16).view(np.float32) if x_dtype == "bfloat16" else out
    # p as float16 and an fp16/bf16 output add one rounding each (2^-11, 2^-8 relative)
    tol = 4e-3 + (2 ** -8 if x_dtype == "bfloat16" else 2 ** -11) + 2 ** -11
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()


def test_ml_dtypes_bfloat16_when_present():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x16, ids, p = inputs(3)
    x = x16.astype(ml_dtypes.bfloat16)
    out = mm.fused_moe(x, ids, p, weights("3inst", (4, 2, 3), False))
    assert out.dtype == x.dtype
    ref = reference.moe_forward(x.astype(np.float32), ids, p, weights("3inst", (4, 2, 3), False))
    assert np.abs(out.astype(np.float64) - ref).max() <= (4e-3 + 2 ** -8) * np.abs(ref).max()


def test_policy_choice_and_stats():
    mm.reset_stats()
    x, ids, p = inputs(17)
    w = weights("3inst", (6, 2, 3), False)
    mm.fused_moe(x, ids, p, w)
    mm.fused_moe(x[:1], ids[:1], p[:1], w)
    s = mm.stats()
    # hidden 256 < 1024: auto fp32 accumulation is off
    assert s["variants"] == {"moe_trellis_swiglu": 1, "moe_trellis_swiglu_decode_6_2_3": 1}
    assert s["calls"] == 2 and s["fp32_fallbacks"] == 0


def test_deterministic_and_independent_of_threads():
    x, ids, p = inputs(33)
    w = weights("mul1", (4, 2, 3), True)
    one = mm.Context("cpu", num_threads=1)
    results = [mm.fused_moe(x, ids, p, w, kernel=v, context=c, num_threads=n)
               for v in (policy.LARGE_BATCH, policy.SIMD) for c, n in ((one, None), (_context("auto"), None),
                                                                      (_context("auto"), 1))]
    for i in (0, 3):
        assert all(np.array_equal(results[i], r) for r in results[i:i + 3])


def test_concurrent_calls_match_serial():
    w = weights("mcg", (6, 2, 3), True)
    jobs = [(inputs(b, seed), v) for b in (1, 4, 17, 40) for seed in (1, 2) for v in (None, policy.SIMD)]
    serial = [mm.fused_moe(*xip, w, kernel=v) for xip, v in jobs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            parallel = list(pool.map(lambda job: mm.fused_moe(*job[0], w, kernel=job[1]), jobs))
            assert all(np.array_equal(a, b) for a, b in zip(serial, parallel))


def test_zero_tokens_and_shared_only_rows():
    w = weights("3inst", (4, 2, 3), True)
    x = np.zeros((0, HIDDEN), np.float16)
    out = mm.fused_moe(x, np.zeros((0, TOP_K), np.int32), np.zeros((0, TOP_K), np.float32), w)
    assert out.shape == (0, HIDDEN)
    # zero routing weights: only the shared expert remains
    x, ids, _ = inputs(3)
    y = mm.fused_moe(x, ids, np.zeros(ids.shape, np.float32), w, out=np.full(x.shape, np.nan, np.float32))
    ref = reference.expert_forward(x.astype(np.float64), *w.shared)
    check(y, ref, policy.PREFILL4)


def _overflowing_weights():
    """Weights whose gate/up running sums overflow fp16 although the results do not.

    K = 8 and one byte b repeated makes every position's state b * 257.  Rows 0..127 of gate and up
    get a large positive value, rows 128..255 a large negative one of almost the same size; x is
    chosen so that the rotated input is the constant 1000, so that over the first half the running
    sums (four per output column, one per lane pair) pass 65504, while the total is small.  svh
    keeps the SwiGLU product in range."""
    values = mm.format.codebook_values(np.arange(256, dtype=np.uint32) * 257, "3inst").astype(np.float64)
    pos, neg = np.argsort(values)[-16:], np.argsort(values)[:16]
    b1, b2 = min(((a, b) for a in pos for b in neg), key=lambda ab: abs(values[ab[0]] + values[ab[1]]))
    assert values[b1] > 2 and abs(values[b1] + values[b2]) < 0.01

    def constant_tiles(k_tiles, n_tiles, byte_first, byte_second):
        words = np.zeros((k_tiles, n_tiles, 128), np.uint16)
        words[: k_tiles // 2] = byte_first * 257
        words[k_tiles // 2:] = byte_second * 257
        return words.view(np.int16)

    e, h, i = 2, 256, 128
    ones_h = np.ones((e, h), np.float16)
    small = np.full((e, i), 2.0 ** -6, np.float16)
    rng = np.random.default_rng(3)
    gate = mm.TrellisWeight(np.stack([constant_tiles(16, 8, b1, b2)] * e), ones_h, small)
    up = mm.TrellisWeight(np.stack([constant_tiles(16, 8, b1, b2)] * e), ones_h, small)
    down = mm.TrellisWeight.random(i, h, 3, experts=e, rng=rng)
    x = np.zeros((4, h), np.float16)
    x[:, 0] = x[:, 128] = 1000 * np.sqrt(128)
    return mm.MoEWeights(gate, up, down), x


def test_nonfinite_fp16_accumulation_falls_back_to_fp32():
    w, x = _overflowing_weights()
    ids = np.array([[0, 1]] * 4, np.int32)
    p = np.full((4, 2), 0.5, np.float32)
    ref = reference.moe_forward(x, ids, p, w)
    assert np.all(np.isfinite(ref))
    # the fp16-accumulating variant really overflows when run directly through the C layer ...
    raw = np.empty((4, 256), np.float32)
    ctx = _context("auto")
    ctx.forward(mm.api._descriptor(w), x, "float16", ids, "int32", p, "float32", raw, "float32",
                policy.PREFILL4)
    assert not np.all(np.isfinite(raw))
    # ... and fused_moe re-runs it with its twin, counts it and warns
    mm.reset_stats()
    mm.api._warned["fallback"] = False
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = mm.fused_moe(x, ids, p, w, kernel=policy.PREFILL4, out=np.full((4, 256), np.nan, np.float32))
    assert mm.stats()["fp32_fallbacks"] == 1 and mm.stats()["nonfinite_after_fallback"] == 0
    check(y, ref, policy.PREFILL4 + "_fp32acc")


def test_shared_library_and_header_are_installed():
    assert os.path.isfile(os.path.join(mm.get_include(), "metal_moe.h"))
    assert os.path.isfile(mm.get_library())
    assert os.path.dirname(mm.get_library()) == os.path.dirname(mm._native.__file__)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("codebook", ["3inst", "mcg", "mul1"])
def test_decoders_cover_every_state(isa, codebook):
    """Every 16-bit state occurs: the kernels' decoders must give every codebook value bit-exactly."""
    w = every_state_weight(codebook)
    out = np.empty((256, 512), np.uint16)
    _context(isa).decode(w.trellis, 256, 512, 16, codebook, out, True)
    assert np.array_equal(out, w.decode().view(np.uint16))


def test_token_blocks(monkeypatch):
    """A workspace cap of 1 MB splits 300 tokens into 9 blocks of 34: results must not change."""
    w = weights("mcg", (6, 2, 3), True)
    rng = np.random.default_rng(seed_of("blocks"))
    x = rng.standard_normal((300, HIDDEN)).astype(np.float16)
    ids, p = reference.route(rng.standard_normal((300, EXPERTS)), TOP_K)
    whole = mm.fused_moe(x, ids, p, w, kernel=policy.LARGE_BATCH)
    monkeypatch.setenv("METAL_MOE_CPU_WORKSPACE_MB", "1")
    small = mm.Context("cpu")
    for variant in (policy.LARGE_BATCH, policy.SIMD, policy.DECODE):
        y = mm.fused_moe(x, ids, p, w, kernel=variant, context=small, out=np.full(x.shape, np.nan, np.float32))
        check(y, reference.moe_forward(x, ids, p, w), variant)
    assert np.array_equal(mm.fused_moe(x, ids, p, w, kernel=policy.LARGE_BATCH, context=small), whole)
    monkeypatch.setenv("METAL_MOE_CPU_WORKSPACE_MB", "0")
    with pytest.raises(ValueError, match="^METAL_MOE_CPU_WORKSPACE_MB: '0' is not a positive integer"):
        mm.Context("cpu")
