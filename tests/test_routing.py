"""The native router (mm_route, fused_moe(router_logits=...)): the same selection and weights as
metal_moe.reference.route for both scorings, with and without the correction bias and
renormalisation, ties to the lower index, and the refusals."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import metal_moe as mm
from metal_moe import reference

from native_cases import EXPERTS, HIDDEN, RSF, TOP_K, check, inputs, weights

pytestmark = pytest.mark.skipif("cpu" not in mm.backends(), reason="the native library is not built")


def native_route(logits, top_k, scoring="softmax", renormalize=True, bias=None, dtype="float32"):
    ctx = mm.api._default_context("cpu")
    ids = np.full((logits.shape[0], top_k), -1, np.int32)
    p = np.full((logits.shape[0], top_k), np.nan, np.float32)
    ctx.route(np.ascontiguousarray(logits), dtype, top_k, scoring, renormalize, bias, ids, p)
    return ids, p


@given(tokens=st.integers(1, 40), experts=st.integers(1, 300), data=st.data(),
       scoring=st.sampled_from(["softmax", "sigmoid"]), renormalize=st.booleans(), with_bias=st.booleans())
def test_matches_the_reference_router(tokens, experts, data, scoring, renormalize, with_bias):
    top_k = data.draw(st.integers(1, min(experts, 16)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    logits = (3 * rng.standard_normal((tokens, experts))).astype(np.float32)
    bias = rng.uniform(-0.2, 0.2, experts).astype(np.float32) if with_bias else None
    ids, p = native_route(logits, top_k, scoring, renormalize, bias)
    ref_ids, ref_p = reference.route(logits, top_k, scoring, renormalize, bias)
    assert np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(p, ref_p, rtol=1e-6, atol=1e-30)


def test_ties_go_to_the_lower_index_and_float16_logits():
    logits = np.zeros((3, 8), np.float16)
    logits[1, [2, 5]] = 1.0
    ids, p = native_route(logits, 3, dtype="float16")
    ref_ids, ref_p = reference.route(logits, 3)
    assert np.array_equal(ids, ref_ids) and ids[0].tolist() == [0, 1, 2] and ids[1].tolist() == [2, 5, 0]
    np.testing.assert_allclose(p, ref_p, rtol=1e-6)


def test_fused_moe_with_router_logits():
    x, _, _ = inputs(9)
    w = weights("mcg", (6, 2, 3), True)
    logits = np.random.default_rng(5).standard_normal((9, EXPERTS)).astype(np.float32)
    bias = np.linspace(-0.1, 0.1, EXPERTS).astype(np.float32)
    ids, p = reference.route(logits, TOP_K, "sigmoid", bias=bias)
    ref = reference.moe_forward(x, ids, p, w, routed_scaling_factor=RSF)
    out = np.full((9, HIDDEN), np.nan, np.float32)
    mm.fused_moe(x, weights=w, router_logits=logits, top_k=TOP_K, scoring="sigmoid", bias=bias, out=out,
                 routed_scaling_factor=RSF)
    check(out, ref, mm.api.resolve_kernel(9, w).name)
    same = np.full((9, HIDDEN), np.nan, np.float32)
    mm.fused_moe(x, ids, p, w, out=same, routed_scaling_factor=RSF)
    assert np.array_equal(out, same)


def test_refusals():
    x, ids, p = inputs(2)
    w = weights("mcg", (4, 2, 3), False)
    logits = np.zeros((2, EXPERTS), np.float32)
    with pytest.raises(ValueError, match="not both"):
        mm.fused_moe(x, ids, p, w, router_logits=logits, top_k=2)
    with pytest.raises(TypeError, match="top_k: required"):
        mm.fused_moe(x, weights=w, router_logits=logits)
    with pytest.raises(ValueError, match=r"top_k: must be in 1\.\.8"):
        mm.fused_moe(x, weights=w, router_logits=logits, top_k=9)
    with pytest.raises(ValueError, match="scoring"):
        mm.fused_moe(x, weights=w, router_logits=logits, top_k=2, scoring="relu")
    with pytest.raises(ValueError, match="router_logits: expected shape"):
        mm.fused_moe(x, weights=w, router_logits=np.zeros((2, 3), np.float32), top_k=2)
    with pytest.raises(ValueError, match="bias: expected"):
        mm.fused_moe(x, weights=w, router_logits=logits, top_k=2, bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="top_k/bias: only used with router_logits"):
        mm.fused_moe(x, ids, p, w, top_k=2)
    bad = logits.copy()
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="logits: token 1, expert 3 is not finite"):
        mm.fused_moe(x, weights=w, router_logits=bad, top_k=2)
    with pytest.raises(ValueError, match="bias: entry 0 is not finite"):
        mm.fused_moe(x, weights=w, router_logits=logits, top_k=2, bias=np.full(EXPERTS, np.nan, np.float32))
