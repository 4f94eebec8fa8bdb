"""The float64 reference: the MoE expert block and the routers, in plain NumPy.

This is the oracle every backend is compared with.  It dequantizes nothing it does not need,
computes everything in float64 and follows DESIGN.md section 1 / FORMAT.md section 5 literally:

    y[t] = routed_scaling_factor * sum_j p[t,j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))
           + shared(x[t]),                                   e = ids[t,j]
"""

from __future__ import annotations

import numpy as np

from ._args import as_float64_activations, check_routing, check_top_k
from .weights import MoEWeights

__all__ = ["moe_forward", "expert_forward", "route", "silu"]


def silu(g):
    return g / (1.0 + np.exp(-g))


def expert_forward(x, gate, up, down, decoded=None):
    """``down(silu(gate(x)) * up(x))`` in float64 for one expert (unstacked projections).

    ``decoded``: optional dict used as a cache of decoded ``W_q`` (keyed by the weight objects'
    trellis buffers), so that repeated references over the same experts decode each once."""
    return down.matmul(silu(gate.matmul(x, decoded)) * up.matmul(x, decoded), decoded)


def moe_forward(x, ids, p, weights, routed_scaling_factor=1.0, decoded=None):
    """The MoE expert block in float64: ``y [M, hidden]``.

    ``x [M, hidden]`` (any float dtype; bfloat16 as uint16 storage is not accepted here: convert
    it first), ``ids [M, top_k]`` integer expert indices, ``p [M, top_k]`` routing weights.  Each
    expert's weights are decoded once, for the tokens routed to it (``decoded``: see
    :func:`expert_forward`).
    """
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights: expected MoEWeights, got {type(weights).__name__}")
    x = as_float64_activations(x, weights.hidden)
    ids, p = check_routing(ids, p, x.shape[0], weights.experts)
    rsf = float(routed_scaling_factor)
    if not np.isfinite(rsf):
        raise ValueError(f"routed_scaling_factor: must be finite, got {routed_scaling_factor!r}")
    y = np.zeros_like(x)
    for e in np.unique(ids):
        tokens, slots = np.nonzero(ids == e)
        out = expert_forward(x[tokens], weights.gate[e], weights.up[e], weights.down[e], decoded)
        # per token, slots are summed in slot order: unbuffered add handles repeated tokens
        np.add.at(y, tokens, p[tokens, slots, None].astype(np.float64) * out)
    y *= rsf
    if weights.shared is not None:
        y += expert_forward(x, *weights.shared, decoded)
    return y


def route(logits, top_k, scoring="softmax", renormalize=True, bias=None):
    """Top-k expert selection from router logits ``[M, E]``: returns ``(ids int32, p float32)``.

    * ``"softmax"`` (Qwen3-MoE): probabilities ``softmax(logits)``, the top-k of them, renormalised
      to sum 1 when ``renormalize``.
    * ``"sigmoid"`` (GLM-4.x, DeepSeek-V3): scores ``sigmoid(logits)``; the experts are chosen by
      ``scores + bias`` (the correction bias, if any) but weighted by the scores alone,
      renormalised when ``renormalize``.  (Group-limited selection is not modelled: the presets
      here use one group.)

    Ties are broken towards the lower expert index.  ``routed_scaling_factor`` is not applied here;
    it belongs to the forward.  Computed in float64.
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits: expected 2 dimensions [tokens, experts], got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"logits: expected a floating-point array, got {logits.dtype}")
    logits = logits.astype(np.float64)
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits: contains NaN or infinite values")
    experts = logits.shape[1]
    top_k = check_top_k(top_k, experts)
    if scoring == "softmax":
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = z / z.sum(axis=1, keepdims=True)
    elif scoring == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")
    choice = scores
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != (experts,):
            raise ValueError(f"bias: expected shape ({experts},), got {bias.shape}")
        if not np.all(np.isfinite(bias)):
            raise ValueError("bias: contains NaN or infinite values")
        choice = scores + bias
    ids = np.argsort(-choice, axis=1, kind="stable")[:, :top_k]
    p = np.take_along_axis(scores, ids, axis=1)
    if renormalize:
        p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-20)
    return ids.astype(np.int32), p.astype(np.float32)
