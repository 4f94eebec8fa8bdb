"""The public call: ``fused_moe`` and the backend plumbing around it."""

from __future__ import annotations

import contextlib
import glob
import numbers
import os
import threading
import warnings

import numpy as np

from . import policy
from .device import DeviceArray, DeviceWeights, array_info, current_stream, is_device_array
from .weights import MoEWeights

try:
    from . import _native
    from ._native import UnsupportedError
except ImportError as err:          # a source checkout that was never built
    _native = None
    _IMPORT_ERROR = err
    UnsupportedError = ValueError

__all__ = ["Context", "backends", "fused_moe", "get_include", "get_library", "reset_stats", "stats"]

_HERE = os.path.dirname(os.path.abspath(__file__))
ALL_BACKENDS = ("cpu", "cuda", "metal")


def _require_native():
    if _native is None:
        raise ImportError(
            "metal_moe's native library is not built; install the package (pip install .) "
            f"instead of importing it from the source tree ({_IMPORT_ERROR})"
        )
    return _native


def get_include():
    """The folder holding ``metal_moe.h`` (for C programs: ``cc -I"$(python -c 'import metal_moe;
    print(metal_moe.get_include())')"``).  Installed inside the package; an editable install of a
    source checkout uses the checkout's ``native/include``."""
    for folder in (os.path.join(_HERE, "include"), os.path.join(os.path.dirname(_HERE), "native", "include")):
        if os.path.isfile(os.path.join(folder, "metal_moe.h")):
            return folder
    raise FileNotFoundError(f"metal_moe.h is not installed in {_HERE}")


def get_library():
    """The path of the shared library behind the C ABI (``libmetal_moe.so`` / ``.dylib``), which
    sits next to the Python extension that links it."""
    folders = [_HERE]
    if _native is not None:
        folders.insert(0, os.path.dirname(os.path.abspath(_native.__file__)))
    for folder in folders:
        for pattern in ("libmetal_moe*.so*", "libmetal_moe*.dylib", "metal_moe*.dll"):
            found = sorted(glob.glob(os.path.join(folder, pattern)))
            if found:
                return found[0]
    raise FileNotFoundError(f"the metal_moe shared library is not installed in {folders}")


# ---- contexts ----------------------------------------------------------------------------------
def Context(backend="cpu", device=0, *, num_threads=None, cpu_isa=None):
    """A backend context of your own (worker pool size, CPU kernel set); pass it as ``context=``."""
    return _require_native().Context(backend, device, num_threads, cpu_isa)


_contexts = {}
_contexts_lock = threading.Lock()


def _default_context(backend, device=0):
    key = (backend, device)
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _contexts[key] = _require_native().Context(backend, device)
        return ctx


def backends():
    """The backends usable on this machine: built into the library and with a device present."""
    if _native is None:
        return []
    return [b for b in ALL_BACKENDS if _native.backend_built(b) and _native.backend_device_count(b) > 0]


def variants(backend="cpu"):
    """The variants a backend implements (all of :data:`policy.VARIANTS` on every built backend)."""
    native = _require_native()
    return tuple(v for v in policy.VARIANTS if native.backend_has_variant(backend, v))


# ---- statistics --------------------------------------------------------------------------------
_stats_lock = threading.Lock()
_stats = {"calls": 0, "fp32_fallbacks": 0, "nonfinite_after_fallback": 0, "variants": {}}
_warned = {"fallback": False}


_device_base = {}


def _device_counters():
    """Sum of the CUDA contexts' device counters (tiles re-run in fp32, invalid ids); reading them
    synchronises with each device."""
    with _contexts_lock:
        contexts = [c for (b, _), c in _contexts.items() if b == "cuda"]
    reruns = invalid = 0
    for ctx in contexts:
        r, i = ctx.counters()
        base = _device_base.get(id(ctx), (0, 0))
        reruns += r - base[0]
        invalid += i - base[1]
    return reruns, invalid


def stats():
    """Counters since start (or :func:`reset_stats`): calls, variants run, non-finite fallbacks.

    With CUDA contexts in use it also holds ``cuda_fp32_reruns`` (fp16-accumulating tiles the
    kernels re-ran with fp32 sums: the device-side form of the fallback, which needs no host
    synchronisation) and ``cuda_invalid_ids`` (expert ids outside [0, experts) met on the device;
    those tokens' rows are NaN).  Reading these synchronises with the devices."""
    with _stats_lock:
        out = {**_stats, "variants": dict(_stats["variants"])}
    if any(b == "cuda" for b, _ in list(_contexts)):
        reruns, invalid = _device_counters()
        out["cuda_fp32_reruns"], out["cuda_invalid_ids"] = reruns, invalid
        if reruns and not _warned.get("cuda_fallback"):
            _warned["cuda_fallback"] = True
            warnings.warn(f"metal_moe: {reruns} CUDA tiles overflowed fp16 accumulation and were re-run with fp32 "
                          "sums (see stats()['cuda_fp32_reruns']; warned once).", RuntimeWarning, stacklevel=2)
    return out


def reset_stats():
    with _stats_lock:
        _stats.update(calls=0, fp32_fallbacks=0, nonfinite_after_fallback=0, variants={})
    with _contexts_lock:
        contexts = [c for (b, _), c in _contexts.items() if b == "cuda"]
    for ctx in contexts:
        _device_base[id(ctx)] = ctx.counters()


def _count(name, fallback=False, still_nonfinite=False):
    with _stats_lock:
        _stats["calls"] += 1
        _stats["variants"][name] = _stats["variants"].get(name, 0) + 1
        _stats["fp32_fallbacks"] += int(fallback)
        _stats["nonfinite_after_fallback"] += int(still_nonfinite)


# ---- arrays ------------------------------------------------------------------------------------
def _dtype_label(arr, name, allowed):
    """The C dtype name of an array (bfloat16 from ml_dtypes or as uint16 storage)."""
    dt = arr.dtype
    label = {"float16": "float16", "float32": "float32", "int32": "int32", "int64": "int64",
             "uint16": "bfloat16", "bfloat16": "bfloat16"}.get(dt.name)
    if label not in allowed:
        shown = ", ".join("bfloat16 (ml_dtypes or uint16 storage)" if a == "bfloat16" else a for a in allowed)
        raise TypeError(f"{name}: dtype {dt} is not accepted; expected {shown}")
    return label


def _host_array(value, name, allowed, writable=False):
    if value is None:
        raise TypeError(f"{name}: expected an array, got None")
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(memoryview(value)) if not hasattr(value, "__array__") else np.asarray(value)
        except TypeError:
            raise TypeError(f"{name}: expected an array (buffer protocol), got {type(value).__name__}") from None
    label = _dtype_label(arr, name, allowed)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected 2 dimensions, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (strides {arr.strides} for shape {arr.shape}); "
                         "pass np.ascontiguousarray(...) explicitly if a copy is acceptable")
    if arr.ctypes.data % arr.dtype.itemsize:
        raise ValueError(f"{name}: data is not aligned to its {arr.dtype.itemsize}-byte elements")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name}: is read-only")
    return arr, label


def _storage(arr):
    """The array the C layer reads: ml_dtypes bfloat16 viewed as its uint16 storage (no copy)."""
    return arr.view(np.uint16) if arr.dtype.name == "bfloat16" else arr


def _projection(w):
    return (w.trellis, w.suh.view(np.uint16), w.svh.view(np.uint16), int(round(2 * w.bits)), w.codebook)


def _descriptor(weights):
    for w in weights.projections + (weights.shared or ()):
        if not (w.trellis.flags.c_contiguous and w.suh.flags.c_contiguous and w.svh.flags.c_contiguous):
            raise ValueError("weights: every trellis/suh/svh array must be C-contiguous")
    shared = None if weights.shared is None else tuple(_projection(w) for w in weights.shared)
    return (weights.hidden, weights.intermediate, weights.experts, *(_projection(w) for w in weights.projections),
            shared)


_ACTIVATIONS = ("float16", "bfloat16", "float32")


def resolve_kernel(batch_size, weights, kernel=None, use_fp32_acc=None, backend="cpu"):
    """The :class:`policy.Decision` that ``fused_moe`` would run for this call."""
    if kernel is None:
        from .tune import load

        device = getattr(weights, "device", 0)
        return policy.select(batch_size, policy.auto_fp32_acc(use_fp32_acc, weights.hidden), *weights.bits,
                             tuned=load(backend, device))
    name = policy.check_variant(kernel, variants(backend))
    if use_fp32_acc and policy.accumulates_fp16(name):
        twin = policy.fp32_fallback(name)
        return policy.Decision(twin, policy.TILE_N[twin], f"forced {name}, fp32 accumulation asked: its twin", True)
    return policy.Decision(name, policy.TILE_N[name], "forced by kernel=", not policy.accumulates_fp16(name))


def fused_moe(x, ids=None, p=None, weights=None, *, router_logits=None, top_k=None, scoring="softmax", bias=None,
              renormalize=True, backend=None, kernel=None, use_fp32_acc=None, out=None, num_threads=None,
              routed_scaling_factor=1.0, context=None, stream=None):
    """The MoE expert block: ``y[t] = rsf * sum_j p[t,j] * down_e(silu(gate_e(x[t])) * up_e(x[t])) + shared(x[t])``.

    x: ``[M, hidden]`` float16, bfloat16 (ml_dtypes, or uint16 storage) or float32.
    ids: ``[M, top_k]`` int32 or int64 expert indices.  p: ``[M, top_k]`` float32/float16/bfloat16.
    weights: :class:`~metal_moe.MoEWeights`.  Returns ``out`` (``[M, hidden]``, x's dtype unless
    ``out`` is given).

    backend: None/"auto" (cpu for host arrays) or a name from :func:`backends`.  kernel: force a
    variant by name (default: :mod:`metal_moe.policy`).  use_fp32_acc: None = auto (on for
    ``hidden >= 1024``).  num_threads: cap on CPU worker threads for this call.

    No input is ever copied or converted: an array the kernels cannot read as it is (wrong dtype,
    non-contiguous, misaligned) is refused with an error naming it.  The GIL is released during
    the call.  If an fp16-accumulating variant returns a non-finite value although x is finite,
    the call is re-run once with its fp32-accumulating twin; this is counted in :func:`stats` and
    warned about once.

    Routing in the same call: instead of ``ids`` and ``p``, pass ``router_logits [M, experts]``
    (float32/float16/bfloat16) with ``top_k``, ``scoring`` ("softmax" or "sigmoid"), ``bias``
    (float32 [experts], added to the scores to choose experts only) and ``renormalize``: the native
    router (mm_route) selects exactly as :func:`metal_moe.reference.route` does, then the experts run.

    CUDA: pass :class:`~metal_moe.DeviceWeights` (``weights.to("cuda")``) and CUDA arrays (torch,
    cupy, anything with ``__cuda_array_interface__`` or DLPack), all on the weights' device; see
    :func:`_fused_moe_device`.
    """
    if router_logits is not None:
        if ids is not None or p is not None:
            raise ValueError("router_logits: pass either ids and p or router_logits, not both")
        ids, p = _route_native(router_logits, weights, top_k, scoring, bias, renormalize, backend, context, stream)
    elif top_k is not None or bias is not None:
        raise ValueError("top_k/bias: only used with router_logits")
    if ids is None or p is None:
        raise TypeError("ids, p: required (or pass router_logits= with top_k=)")
    if weights is None:
        raise TypeError("weights: required")
    if isinstance(weights, DeviceWeights) or any(is_device_array(a) for a in (x, ids, p, out) if a is not None):
        return _fused_moe_device(x, ids, p, weights, backend, kernel, use_fp32_acc, out, num_threads,
                                 routed_scaling_factor, context, stream)
    if stream is not None:
        raise ValueError("stream: only calls on CUDA arrays run on a stream; these arrays are host arrays")
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights: expected MoEWeights, got {type(weights).__name__}")
    if context is None:
        if backend in (None, "auto"):
            backend = "cpu"
        if backend not in ALL_BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; expected 'auto' or one of {ALL_BACKENDS}")
        if backend not in backends():
            raise ValueError(f"backend: {backend!r} is not usable on this machine; usable: {backends()}")
        ctx = _default_context(backend)
    else:
        ctx = context
        backend = ctx.backend
    x, x_label = _host_array(x, "x", _ACTIVATIONS)
    ids, ids_label = _host_array(ids, "ids", ("int32", "int64"))
    p, p_label = _host_array(p, "p", _ACTIVATIONS)
    _check_shapes(x.shape, ids.shape, p.shape, weights.hidden)
    if out is None:
        out = np.empty(x.shape, dtype=x.dtype)
        out_label = x_label
    else:
        out, out_label = _host_array(out, "out", _ACTIVATIONS, writable=True)
        if out.shape != x.shape:
            raise ValueError(f"out: expected the shape of x {x.shape}, got {out.shape}")
        if np.shares_memory(out, x):
            raise ValueError("out: shares memory with x (in-place operation is not supported)")
    if num_threads is None:
        num_threads = 0
    elif isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads: expected an integer, got {type(num_threads).__name__}")
    elif num_threads < 1:
        raise ValueError(f"num_threads: must be at least 1, got {num_threads}")
    _check_rsf(routed_scaling_factor)
    if x.shape[0] == 0:
        return out
    decision = resolve_kernel(x.shape[0], weights, kernel, use_fp32_acc, backend)
    desc = _descriptor(weights)
    view = _storage(out)

    def run(name):
        ctx.forward(desc, _storage(x), x_label, ids, ids_label, _storage(p), p_label, view, out_label, name, False,
                    float(routed_scaling_factor), int(num_threads))

    run(decision.name)
    fallback = still = False
    if policy.accumulates_fp16(decision.name):
        finite = _finite(view, out_label)
        if not finite and _finite(_storage(x), x_label):
            fallback = True
            twin = policy.fp32_fallback(decision.name)
            if not _warned["fallback"]:
                _warned["fallback"] = True
                warnings.warn(f"metal_moe: {decision.name} produced non-finite values (fp16 accumulation overflow); "
                              f"re-ran with {twin}. Counted in metal_moe.stats(); warned once.", RuntimeWarning,
                              stacklevel=2)
            run(twin)
            still = not _finite(view, out_label)
    _count(decision.name, fallback, still)
    return out


def _route_native(router_logits, weights, top_k, scoring, bias, renormalize, backend, context, stream=None):
    """ids (int32) and p (float32) for router_logits through the native router."""
    if isinstance(weights, DeviceWeights) or is_device_array(router_logits):
        if not isinstance(weights, DeviceWeights):
            raise TypeError(f"weights: {type(weights).__name__} on the host, but router_logits is on a CUDA device; "
                            "upload them once with weights.to('cuda')")
        return _route_device(router_logits, weights.experts, weights.device, top_k, scoring, bias, renormalize,
                             context, stream)
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights: expected MoEWeights, got {type(weights).__name__}")
    return _route_host(router_logits, weights.experts, top_k, scoring, bias, renormalize, context)


def _check_router_options(scoring, top_k):
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")
    if top_k is None:
        raise TypeError("top_k: required with router_logits")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k: expected an integer, got {type(top_k).__name__}")


def _route_host(router_logits, experts, top_k, scoring, bias, renormalize, context=None):
    """Host router_logits ``[M, experts]`` -> ids (int32) and p (float32), through the core's router
    (the same code on every host-memory backend) in the cpu context."""
    _check_router_options(scoring, top_k)
    logits, label = _host_array(router_logits, "router_logits", _ACTIVATIONS)
    if logits.shape[1] != experts:
        raise ValueError(f"router_logits: expected shape [tokens, {experts}] (experts), got {logits.shape}")
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype != np.float32 or bias.shape != (experts,) or not bias.flags.c_contiguous:
            raise ValueError(f"bias: expected a contiguous float32 array of shape ({experts},), got "
                             f"{bias.dtype} {bias.shape}")
    ctx = context if context is not None and context.backend != "cuda" else _default_context("cpu")
    ids = np.empty((logits.shape[0], int(top_k)), np.int32)
    p = np.empty((logits.shape[0], int(top_k)), np.float32)
    ctx.route(_storage(logits), label, int(top_k), scoring, bool(renormalize), bias, ids, p)
    return ids, p


def _route_device(router_logits, experts, device, top_k, scoring, bias, renormalize, context, stream=None):
    """CUDA router_logits ``[M, experts]`` on `device` -> ids and p on the device, written by the CUDA
    router on the call's stream (no host sync)."""
    _check_router_options(scoring, top_k)
    if not is_device_array(router_logits):
        raise ValueError("router_logits: is a host array but the weights are on a CUDA device")
    li = _device_info(router_logits, "router_logits", _ACTIVATIONS, device)
    if li.shape[1] != experts:
        raise ValueError(f"router_logits: expected shape [tokens, {experts}] (experts), got {li.shape}")
    infos = [li]
    bias_ptr = 0
    if bias is not None:
        bi = array_info(bias, "bias")
        if bi.dtype != "float32" or bi.shape != (experts,) or not bi.contiguous:
            raise ValueError(f"bias: expected a contiguous float32 CUDA array of shape ({experts},)")
        bias_ptr = bi.ptr
        infos.append(bi)
    ctx = context if context is not None else _default_context("cuda", device)
    if ctx.backend != "cuda" or ctx.device != device:
        raise ValueError(f"context: is {ctx.backend}:{ctx.device}, but the weights are on cuda:{device}")
    handle = current_stream(stream, infos, device)
    ids = _empty_device(router_logits, li, (li.shape[0], int(top_k)), "int32", device, handle)
    p = _empty_device(router_logits, li, (li.shape[0], int(top_k)), "float32", device, handle)
    ctx.route_pointers((li.ptr, li.dtype, li.shape[0], li.shape[1]), int(top_k), scoring, bool(renormalize), bias_ptr,
                       array_info(ids, "ids").ptr, array_info(p, "p").ptr, handle)
    return ids, p


def _empty_device(like, info, shape, dtype, device, stream=None):
    """A new device array of `shape`/`dtype` from the library `like` comes from (torch, cupy, ours).
    torch/cupy: allocated for `stream` (when given), so their caching allocators do not hand the
    memory to another stream while the call's kernels still use it."""
    if info.kind == "torch":
        import torch

        ctx = torch.cuda.stream(torch.cuda.ExternalStream(stream)) if stream else contextlib.nullcontext()
        with ctx:
            return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    if type(like).__module__.split(".")[0] == "cupy":
        import cupy

        with cupy.cuda.ExternalStream(stream) if stream else contextlib.nullcontext():
            return cupy.empty(shape, dtype=dtype)
    return DeviceArray(shape, dtype, device)


def _check_shapes(x, ids, p, hidden):
    """x [tokens, hidden], ids [tokens, top_k], p the shape of ids (host or device shapes alike)."""
    x, ids, p = tuple(x), tuple(ids), tuple(p)
    if x[1] != hidden:
        raise ValueError(f"x: expected shape [tokens, {hidden}], got {x}")
    if ids[0] != x[0]:
        raise ValueError(f"ids: expected {x[0]} rows (one per token of x), got shape {ids}")
    if p != ids:
        raise ValueError(f"p: expected the shape of ids {ids}, got {p}")


def _check_rsf(routed_scaling_factor):
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, numbers.Real):
        raise TypeError(f"routed_scaling_factor: expected a number, got {type(routed_scaling_factor).__name__}")
    if not np.isfinite(routed_scaling_factor):
        raise ValueError(f"routed_scaling_factor: must be finite, got {routed_scaling_factor}")


def _fused_moe_device(x, ids, p, weights, backend, kernel, use_fp32_acc, out, num_threads, routed_scaling_factor,
                      context, stream):
    """fused_moe on CUDA arrays: zero-copy, on the caller's stream, never synchronising the host.

    * Every array must be on the device of ``weights`` (a :class:`DeviceWeights`) and C-contiguous;
      a host array among them is refused (nothing is copied behind the caller's back).
    * The stream: ``stream=`` (an int handle, torch.cuda.Stream or cupy Stream), else the current
      torch stream (torch arrays), else the current cupy stream (cupy arrays), else the legacy
      default stream.
    * ``out=None`` allocates the output like x (torch.empty_like / cupy.empty_like; a
      :class:`DeviceArray` otherwise).  For CUDA-graph capture pass ``out=`` (or use torch arrays,
      whose allocator is capture-aware), and make one call of at least the captured batch size
      before capturing: the workspace is sized once per context and never allocated during capture.
    * Ids are checked on the device: an id outside [0, experts) makes its token's row NaN and is
      counted in ``stats()["cuda_invalid_ids"]``.  fp16-accumulation overflow is handled on the
      device too (``stats()["cuda_fp32_reruns"]``).
    """
    if backend not in (None, "auto", "cuda"):
        raise ValueError(f"backend: {backend!r} cannot run CUDA arrays/DeviceWeights; use backend='cuda' (or None)")
    if not isinstance(weights, DeviceWeights):
        raise TypeError(f"weights: {type(weights).__name__} on the host, but the arrays are on a CUDA device; "
                        "upload them once with weights.to('cuda') (mixing host and device data is refused)")
    if "cuda" not in backends():
        raise ValueError(f"backend: 'cuda' is not usable on this machine; usable: {backends()}")
    if num_threads is not None:
        raise ValueError("num_threads: is a CPU option; the cuda backend takes none")
    _check_rsf(routed_scaling_factor)
    infos = {}
    for value, name, allowed in ((x, "x", _ACTIVATIONS), (ids, "ids", ("int32", "int64")), (p, "p", _ACTIVATIONS)):
        if value is None:
            raise TypeError(f"{name}: expected an array, got None")
        if not is_device_array(value):
            raise ValueError(f"{name}: is a host array ({type(value).__name__}) but the call runs on CUDA device "
                             f"{weights.device}; mixing host and device arrays is refused")
        infos[name] = _device_info(value, name, allowed, weights.device)
    xi, ii, pi = infos["x"], infos["ids"], infos["p"]
    _check_shapes(xi.shape, ii.shape, pi.shape, weights.hidden)
    if out is None:
        out = _empty_like(x, xi, weights.device)
    elif not is_device_array(out):
        raise ValueError(f"out: is a host array ({type(out).__name__}) but the call runs on CUDA device "
                         f"{weights.device}; mixing host and device arrays is refused")
    oi = _device_info(out, "out", _ACTIVATIONS, weights.device)
    if oi.shape != xi.shape:
        raise ValueError(f"out: expected the shape of x {xi.shape}, got {oi.shape}")
    if xi.shape[0] == 0:
        return out
    decision = resolve_kernel(xi.shape[0], weights, kernel, use_fp32_acc, "cuda")
    ctx = context if context is not None else _default_context("cuda", weights.device)
    if ctx.backend != "cuda" or ctx.device != weights.device:
        raise ValueError(f"context: is {ctx.backend}:{ctx.device}, but the weights are on cuda:{weights.device}")
    handle = current_stream(stream, list(infos.values()), weights.device)
    ctx.forward_pointers(weights.descriptor, *((i.ptr, i.dtype, i.shape[0], i.shape[1]) for i in (xi, ii, pi, oi)),
                         decision.name, False, float(routed_scaling_factor), handle)
    _count(decision.name)
    return out


def _device_info(value, name, allowed, device):
    info = array_info(value, name)
    label = "bfloat16" if info.dtype == "uint16" else info.dtype
    if label not in allowed:
        raise TypeError(f"{name}: dtype {info.dtype} is not accepted; expected {', '.join(allowed)}")
    info.dtype = label
    if len(info.shape) != 2:
        raise ValueError(f"{name}: expected 2 dimensions, got shape {info.shape}")
    if not info.contiguous:
        raise ValueError(f"{name}: must be C-contiguous; pass a contiguous copy (e.g. .contiguous()) if a copy "
                         "is acceptable")
    if info.device is not None and info.device != device:
        raise ValueError(f"{name}: is on CUDA device {info.device}, but the weights are on device {device}")
    return info


def _empty_like(x, info, device):
    if info.kind == "torch":
        import torch

        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return _empty_device(x, info, info.shape, "uint16" if info.dtype == "bfloat16" else info.dtype, device)


def _finite(arr, label):
    if label == "bfloat16":
        return not np.any((arr.view(np.uint16) & 0x7F80) == 0x7F80)
    return bool(np.isfinite(arr).all())
