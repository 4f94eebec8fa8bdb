"""metal_moe.reference: the float64 MoE forward and the routers (FORMAT.md 5, DESIGN.md 1 and 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import bits_and_codebook, load_vector, moe_case_path, random_moe, seeds, silu
from metal_moe import MoEWeights, TrellisWeight
from metal_moe.reference import moe_forward, route


# --------------------------------------------------------------------------------------------
# the fused-MoE test vector
# --------------------------------------------------------------------------------------------
def test_moe_vector():
    io = load_vector(moe_case_path("io"))
    parts = {name: load_vector(moe_case_path(name)) for name in ("gate", "up", "down")}
    layers = []
    for name, k_name in (("gate", "K_gate"), ("up", "K_up"), ("down", "K_down")):
        part = parts[name]
        layer = TrellisWeight(part["trellis"], part["suh"], part["svh"], part["codebook"])
        assert layer.bits == float(io[k_name]) == float(part["K"])
        layers.append(layer)
    weights = MoEWeights(*layers)
    dims = (weights.hidden, weights.intermediate, weights.experts)
    assert dims == (int(io["hidden"]), int(io["intermediate"]), int(io["E"]))
    assert io["selected_experts"].shape[1] == int(io["top_k"]) and io["activation"] == "silu"
    y = moe_forward(io["x"], io["selected_experts"], io["routing_weights"], weights)
    assert y.dtype == np.float64 and y.shape == io["y"].shape
    # README: the stored y carries fp16 intermediates (activations, intermediates, routing
    # weights) with fp32 accumulation and differs from a float64 evaluation by at most ~0.006
    # on values up to ~4.6 (an fp16 ulp there is 2**-8 = 0.004); 0.01 leaves a small margin.
    assert np.max(np.abs(y - io["y"].astype(np.float64))) <= 0.01


# --------------------------------------------------------------------------------------------
# moe_forward against a dense computation
# --------------------------------------------------------------------------------------------
def dense_moe(x, ids, p, weights, routed_scaling_factor=1.0):
    """Dequantize every used expert and loop over tokens and slots: DESIGN.md section 1 literally."""
    x = np.asarray(x, dtype=np.float64)
    dense = {}

    def expert(gate, up, down):
        return [w.dequantize(np.float64) for w in (gate, up, down)]

    y = np.zeros((x.shape[0], weights.hidden))
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e not in dense:
                dense[e] = expert(weights.gate[e], weights.up[e], weights.down[e])
            g, u, d = dense[e]
            y[t] += float(p[t, j]) * ((silu(x[t] @ g) * (x[t] @ u)) @ d)
    y *= routed_scaling_factor
    if weights.shared is not None:
        g, u, d = expert(*weights.shared)
        for t in range(x.shape[0]):
            y[t] += (silu(x[t] @ g) * (x[t] @ u)) @ d
    return y


@settings(max_examples=15)
@given(projections=st.tuples(bits_and_codebook(), bits_and_codebook(), bits_and_codebook()),
       experts=st.integers(1, 4), top_k=st.integers(1, 3), tokens=st.integers(1, 5),
       shared=st.booleans(), scale=st.sampled_from([1.0, 2.5]), seed=seeds)
def test_moe_forward_matches_dense(projections, experts, top_k, tokens, shared, scale, seed):
    rng = np.random.default_rng(seed)
    bits = tuple(b for b, _ in projections)
    codebooks = tuple(c for _, c in projections)
    weights = random_moe(rng, 128, 256, experts, bits, codebooks, shared)
    x = rng.standard_normal((tokens, 128))
    ids = rng.integers(0, experts, size=(tokens, top_k))          # repeats within a row allowed
    p = rng.random((tokens, top_k)).astype(np.float32)
    y = moe_forward(x, ids, p, weights, routed_scaling_factor=scale)
    want = dense_moe(x, ids, p, weights, scale)
    assert y.shape == (tokens, 128) and y.dtype == np.float64
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-9 * max(1.0, np.abs(want).max()))


def test_moe_forward_shared_and_scaling_are_separate():
    rng = np.random.default_rng(11)
    weights = random_moe(rng, experts=3, shared=True)
    routed_only = MoEWeights(weights.gate, weights.up, weights.down)
    x = rng.standard_normal((4, 128))
    ids = np.array([[0, 1], [2, 2], [1, 0], [2, 0]], dtype=np.int32)
    p = rng.random((4, 2)).astype(np.float32)
    routed = moe_forward(x, ids, p, routed_only)
    shared = moe_forward(x, ids, np.zeros_like(p), weights)        # p = 0: the shared expert alone
    assert np.abs(shared).max() > 0.01
    # the routed scaling factor scales the routed experts only, never the shared expert
    np.testing.assert_allclose(moe_forward(x, ids, p, weights, 1.8), 1.8 * routed + shared, rtol=1e-12, atol=1e-12)


def test_moe_forward_input_dtypes():
    rng = np.random.default_rng(12)
    weights = random_moe(rng, experts=2)
    x16 = rng.standard_normal((3, 128)).astype(np.float16)
    ids = np.array([[0, 1], [1, 0], [1, 1]])
    p = np.array([[0.25, 0.75], [0.5, 0.5], [1.0, 0.125]])
    want = moe_forward(x16.astype(np.float64), ids, p, weights)
    for x, i, w in ((x16, ids.astype(np.int32), p.astype(np.float32)),
                    (x16.astype(np.float32), ids, p.astype(np.float16))):
        np.testing.assert_array_equal(moe_forward(x, i, w, weights), want)


# --------------------------------------------------------------------------------------------
# route
# --------------------------------------------------------------------------------------------
def slow_route(row, top_k, scoring, renormalize, bias):
    """One token's routing, in Python floats, from route()'s documented semantics."""
    if scoring == "softmax":
        m = max(row)
        z = [math.exp(v - m) for v in row]
        scores = [v / sum(z) for v in z]
    else:
        scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
    choice = scores if bias is None else [s + b for s, b in zip(scores, bias)]
    chosen = sorted(range(len(row)), key=lambda e: (-choice[e], e))[:top_k]
    p = [scores[e] for e in chosen]
    if renormalize:
        p = [v / sum(p) for v in p]
    return chosen, p


grid = st.integers(-12, 12).map(lambda v: v / 4)       # coarse values: exact ties do occur


@settings(max_examples=50)
@given(data=st.data(), tokens=st.integers(1, 4), experts=st.integers(1, 10),
       scoring=st.sampled_from(["softmax", "sigmoid"]), renormalize=st.booleans(), with_bias=st.booleans())
def test_route_matches_per_row_model(data, tokens, experts, scoring, renormalize, with_bias):
    top_k = data.draw(st.integers(1, experts), label="top_k")
    logits = np.array(data.draw(st.lists(st.lists(grid, min_size=experts, max_size=experts),
                                         min_size=tokens, max_size=tokens), label="logits"))
    bias = None
    if with_bias:
        bias = np.array(data.draw(st.lists(grid, min_size=experts, max_size=experts), label="bias")) / 8
    ids, p = route(logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias)
    assert ids.dtype == np.int32 and p.dtype == np.float32
    assert ids.shape == p.shape == (tokens, top_k)
    for t in range(tokens):
        chosen, weights = slow_route(logits[t].tolist(), top_k, scoring, renormalize,
                                     None if bias is None else bias.tolist())
        assert ids[t].tolist() == chosen
        np.testing.assert_allclose(p[t], weights, rtol=1e-6)


def test_route_ties_go_to_the_lower_index():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    for scoring in ("softmax", "sigmoid"):
        assert route(logits, 2, scoring)[0].tolist() == [[1, 2]]
        assert route(logits, 4, scoring)[0].tolist() == [[1, 2, 4, 0]]
    assert route(np.zeros((2, 6)), 3)[0].tolist() == [[0, 1, 2]] * 2


def test_route_softmax_renormalize():
    logits = np.array([[2.0, 0.0, 1.0, -1.0]])
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    ids, p = route(logits, 2, "softmax", renormalize=False)
    assert ids.tolist() == [[0, 2]]
    np.testing.assert_allclose(p[0], probs[[0, 2]], rtol=1e-6)
    assert p.sum() < 1
    ids, p = route(logits, 2, "softmax")
    np.testing.assert_allclose(p[0], probs[[0, 2]] / probs[[0, 2]].sum(), rtol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-6)


def test_route_sigmoid_bias_changes_selection_not_weights():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    sig = 1 / (1 + np.exp(-logits[0]))
    ids, p = route(logits, 2, "sigmoid", renormalize=False)
    assert ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(p[0], sig[[0, 1]], rtol=1e-6)
    bias = np.array([0.0, 0.0, 0.0, 5.0])
    ids, p = route(logits, 2, "sigmoid", renormalize=False, bias=bias)
    assert ids.tolist() == [[3, 0]]                         # the bias picks expert 3 ...
    np.testing.assert_allclose(p[0], sig[[3, 0]], rtol=1e-6)  # ... but its weight is its score alone
    ids, p = route(logits, 2, "sigmoid", bias=bias)
    np.testing.assert_allclose(p[0], sig[[3, 0]] / sig[[3, 0]].sum(), rtol=1e-6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_feeds_moe_forward(scoring):
    rng = np.random.default_rng(13)
    weights = random_moe(rng, experts=4)
    x = rng.standard_normal((5, 128))
    ids, p = route(rng.standard_normal((5, 4)), 2, scoring)
    y = moe_forward(x, ids, p, weights)
    np.testing.assert_allclose(y, dense_moe(x, ids, p, weights), rtol=0, atol=1e-9 * np.abs(y).max())
