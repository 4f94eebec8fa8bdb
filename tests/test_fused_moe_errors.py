"""Bad input to fused_moe and to the C core: a clear error naming the argument, never a crash,
and nothing written to `out`."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metal_moe as mm
from metal_moe import policy

from native_cases import EXPERTS, HIDDEN, TOP_K, inputs, weights

pytestmark = pytest.mark.skipif("cpu" not in mm.backends(), reason="the native library is not built")

W = weights("3inst", (6, 2, 3), True)


def good(batch=3):
    x, ids, p = inputs(batch)
    return x, ids, p


def sentinel(shape=(3, HIDDEN)):
    return np.full(shape, 7.0, np.float32)


def refused(exc, match, *, out=None, **kwargs):
    x, ids, p = good()
    args = dict(x=x, ids=ids, p=p, weights=W)
    args.update(kwargs)
    target = sentinel() if out is None else out
    before = target.copy()
    with pytest.raises(exc, match=match):
        mm.fused_moe(args.pop("x"), args.pop("ids"), args.pop("p"), args.pop("weights"), out=target, **args)
    assert np.array_equal(target, before, equal_nan=True), "a refused call wrote to out"


def test_shapes_and_dtypes():
    x, ids, p = good()
    refused(ValueError, r"^x: expected shape \[tokens, 256\]", x=np.zeros((3, 128), np.float16))
    refused(ValueError, r"^x: expected 2 dimensions", x=np.zeros((3, 2, 128), np.float16))
    refused(TypeError, r"^x: dtype float64 is not accepted", x=x.astype(np.float64))
    refused(TypeError, r"^x: dtype int32 is not accepted", x=np.zeros((3, HIDDEN), np.int32))
    refused(ValueError, r"^ids: expected 3 rows", ids=ids[:2])
    refused(TypeError, r"^ids: dtype float32 is not accepted", ids=ids.astype(np.float32))
    refused(TypeError, r"^ids: dtype int16 is not accepted", ids=ids.astype(np.int16))
    refused(ValueError, r"^p: expected the shape of ids", p=np.ascontiguousarray(p[:, :1]))
    refused(TypeError, r"^p: dtype float64 is not accepted", p=p.astype(np.float64))
    refused(ValueError, r"^out: expected the shape of x", out=np.zeros((3, 128), np.float32))
    refused(TypeError, r"^out: dtype float64 is not accepted", out=np.zeros((3, HIDDEN), np.float64))
    refused(TypeError, r"^weights: expected MoEWeights", weights=W.gate)
    refused(TypeError, r"^x: expected an array", x=None)


def test_values_checked_before_any_work():
    x, ids, p = good()
    bad = ids.copy()
    bad[2, 1] = EXPERTS
    refused(ValueError, r"^ids: expert index 8 \(token 2, slot 1\) is outside \[0, 8\)", ids=bad)
    bad[2, 1] = -1
    refused(ValueError, r"^ids: expert index -1", ids=bad)
    nan = p.copy()
    nan[1, 0] = np.nan
    refused(ValueError, r"^p: routing weight of token 1, slot 0 is not finite", p=nan)
    refused(ValueError, r"^routed_scaling_factor: must be finite", routed_scaling_factor=float("inf"))
    refused(TypeError, r"^routed_scaling_factor: expected a number", routed_scaling_factor="2")


def test_layout_and_aliasing():
    x, ids, p = good()
    wide = np.zeros((3, 2 * HIDDEN), np.float16)
    refused(ValueError, r"^x: must be C-contiguous", x=wide[:, ::2])
    refused(ValueError, r"^ids: must be C-contiguous", ids=np.asfortranarray(np.zeros((3, 2), np.int32)))
    raw = np.zeros(3 * HIDDEN * 4 + 1, np.uint8)
    misaligned = raw[1:].view(np.float32).reshape(3, HIDDEN)
    refused(ValueError, r"^out: data is not aligned", out=misaligned)
    xf = x.astype(np.float32)
    refused(ValueError, r"^out: shares memory with x", x=xf, out=xf)
    ro = sentinel()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out: is read-only"):
        mm.fused_moe(x, ids, p, W, out=ro)


def test_kernels_backends_and_threads():
    refused(ValueError, r"^kernel: unknown or unavailable variant 'fast'; valid variants: moe_trellis_swiglu_decode,",
            kernel="fast")
    refused(ValueError, r"^variant: is specialised for weights.up bits 3, but the weights have 2",
            kernel="moe_trellis_swiglu_decode_6_3_4")
    refused(ValueError, r"^backend: unknown backend 'tpu'", backend="tpu")
    for name in ("cuda", "metal"):
        if name not in mm.backends():
            refused(ValueError, rf"^backend: '{name}' is not usable on this machine", backend=name)
    refused(ValueError, r"^num_threads: must be at least 1", num_threads=0)
    refused(TypeError, r"^num_threads: expected an integer", num_threads=1.5)
    with pytest.raises(ValueError, match=r"^num_threads: must be at least 1"):
        mm.Context("cpu", num_threads=0)
    with pytest.raises(ValueError, match=r"^cpu_isa: 'sse9' is not one of auto, scalar"):
        mm.Context("cpu", cpu_isa="sse9")
    with pytest.raises(ValueError, match=r"^device: 3 is not a device of backend 'cpu'"):
        mm.Context("cpu", 3)


def test_environment_thread_cap(monkeypatch):
    monkeypatch.setenv("METAL_MOE_NUM_THREADS", "1")
    assert mm.Context("cpu").num_threads == 1
    monkeypatch.setenv("METAL_MOE_NUM_THREADS", "many")
    with pytest.raises(ValueError, match=r"^METAL_MOE_NUM_THREADS: 'many' is not a positive integer"):
        mm.Context("cpu")


def test_the_c_core_checks_on_its_own():
    """The Python layer's checks bypassed: the C core still refuses, naming the argument."""
    ctx = mm.Context("cpu")
    x, ids, p = good()
    out = sentinel()
    desc = list(mm.api._descriptor(W))

    def call(d=desc, x=x, xd="float16", ids=ids, idd="int32", p=p, pd="float32", o=out, od="float32",
             variant=policy.PREFILL4):
        before = o.copy()
        try:
            ctx.forward(tuple(d), x, xd, ids, idd, p, pd, o, od, variant)
        finally:
            assert np.array_equal(o, before)

    with pytest.raises(ValueError, match=r"^x: expected \[tokens, 512\] \(hidden\)"):
        call(d=[512] + desc[1:])
    with pytest.raises(ValueError, match=r"^weights.intermediate: 100 is not a positive multiple of 128"):
        call(d=desc[:1] + [100] + desc[2:])
    bad_gate = list(desc[3])
    bad_gate[3] = 7                     # K = 3.5 with 3inst
    with pytest.raises(ValueError, match=r"^weights.gate.bits_x2: half-integer K = 7/2 is valid only with"):
        call(d=desc[:3] + [tuple(bad_gate)] + desc[4:])
    bad_gate[3] = 18
    with pytest.raises(ValueError, match=r"^weights.gate.bits_x2: 18 is outside 2..16"):
        call(d=desc[:3] + [tuple(bad_gate)] + desc[4:])
    with pytest.raises(ValueError, match=r"^ids: expected 3 rows"):
        call(ids=ids[:2])
    with pytest.raises(ValueError, match=r"^p: expected the shape of ids"):
        call(p=np.ascontiguousarray(p[:, :1]))
    with pytest.raises(ValueError, match=r"^out: overlaps x"):
        xf = x.astype(np.float32)
        call(x=xf, xd="float32", o=xf)
    with pytest.raises(ValueError, match=r"^variant: unknown kernel variant 'nope'; valid variants:"):
        call(variant="nope")


# ---- fuzzing: hypothesis-generated garbage ------------------------------------------------------
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint16, np.bool_]


@st.composite
def garbage_array(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple))
    if draw(st.booleans()) and len(shape) == 2:
        shape = (shape[0], draw(st.sampled_from([HIDDEN, TOP_K, 1])))
    arr = np.zeros(shape, dtype)
    if arr.size:
        fill = draw(st.sampled_from([0, 1, -1, 7, 1e30, float("nan"), float("inf"), EXPERTS]))
        with np.errstate(all="ignore"):
            arr[...] = np.array(fill).astype(dtype)
    if draw(st.booleans()) and arr.ndim == 2 and arr.shape[1] > 1:
        arr = arr[:, ::2]                 # non-contiguous
    return arr


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=st.one_of(garbage_array(), st.none(), st.integers(), st.text(max_size=3)),
       ids=st.one_of(garbage_array(), st.just(inputs(3)[1])),
       p=st.one_of(garbage_array(), st.just(inputs(3)[2])),
       out=st.one_of(st.none(), garbage_array()),
       kernel=st.one_of(st.none(), st.sampled_from(list(policy.VARIANTS) + ["", "x" * 40])),
       num_threads=st.one_of(st.none(), st.integers(-3, 3)),
       use_fp32_acc=st.one_of(st.none(), st.booleans()))
def test_fuzz_fused_moe_never_crashes(x, ids, p, out, kernel, num_threads, use_fp32_acc):
    try:
        y = mm.fused_moe(x, ids, p, W, out=out, kernel=kernel, num_threads=num_threads, use_fp32_acc=use_fp32_acc)
    except (TypeError, ValueError) as err:
        assert str(err).split(":")[0] in {"x", "ids", "p", "out", "kernel", "num_threads", "variant",
                                          "use_fp32_acc"}, str(err)
    else:
        assert y.shape == np.asarray(x).shape
