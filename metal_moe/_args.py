"""Argument checks shared by the reference and the kernels' front end.

Every check raises TypeError (wrong kind or dtype) or ValueError (wrong shape or value) with a
message that starts with the argument's name.
"""

from __future__ import annotations

import numbers

import numpy as np

FLOAT_ACTIVATIONS = ("float16", "bfloat16", "float32", "float64")


def _name_of(dtype):
    return np.dtype(dtype).name


def as_float64_activations(x, hidden, name="x"):
    """``x [M, hidden]`` of a floating dtype (float16/bfloat16/float32/float64) as float64."""
    if not hasattr(x, "__array__") and not hasattr(x, "__array_interface__") and not isinstance(x, (list, tuple)):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    x = np.asarray(x)
    if _name_of(x.dtype) not in FLOAT_ACTIVATIONS:
        raise TypeError(f"{name}: expected one of {FLOAT_ACTIVATIONS}, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"{name}: expected shape [tokens, {hidden}], got {x.shape}")
    return x.astype(np.float64)


def check_top_k(top_k, experts, name="top_k"):
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(top_k).__name__}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"{name}: must be in 1..{experts} (the number of experts), got {top_k}")
    return int(top_k)


def check_routing(ids, p, tokens, experts):
    """Validate ``ids [tokens, top_k]`` (integers in ``[0, experts)``) and ``p`` (finite floats)."""
    ids, p = np.asarray(ids), np.asarray(p)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids: expected an integer array (int32 or int64), got {ids.dtype}")
    if ids.ndim != 2 or ids.shape[0] != tokens:
        raise ValueError(f"ids: expected shape [{tokens}, top_k] (one row per token of x), got {ids.shape}")
    if ids.shape[1] < 1:
        raise ValueError("ids: top_k (the second dimension) must be at least 1")
    if ids.size and (ids.min() < 0 or ids.max() >= experts):
        bad = ids[(ids < 0) | (ids >= experts)][0]
        raise ValueError(f"ids: expert index {int(bad)} is outside [0, {experts})")
    if _name_of(p.dtype) not in FLOAT_ACTIVATIONS:
        raise TypeError(f"p: expected a floating-point array (float32, float16 or bfloat16), got {p.dtype}")
    if p.shape != ids.shape:
        raise ValueError(f"p: expected the shape of ids {ids.shape}, got {p.shape}")
    if p.size and not np.all(np.isfinite(p.astype(np.float64))):
        raise ValueError("p: routing weights contain NaN or infinite values")
    return ids, p
