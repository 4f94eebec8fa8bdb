"""Device arrays and device-resident weights for the GPU backends (CUDA today).

* :class:`DeviceArray`: a C-contiguous buffer in device memory owned by metal_moe (``cudaMalloc``
  through the library's C ABI, so neither torch nor cupy is needed).  It exports the CUDA Array
  Interface, so ``torch.as_tensor(a, device="cuda")`` and ``cupy.asarray(a)`` view it without a copy.
* :func:`array_info`: what the kernels need to know about any device array, read without a copy:
  torch tensors directly, then anything with ``__cuda_array_interface__`` (v3: cupy, numba, ...),
  then anything with ``__dlpack__`` (DLPack: jax, ...).
* :class:`DeviceWeights`: MoE weights resident on one device, from :meth:`MoEWeights.to` (one
  upload) or :meth:`DeviceWeights.from_arrays` (torch/cupy arrays used as they are, no copy).
"""

from __future__ import annotations

import numpy as np

from .format import check_bits, check_codebook
from .weights import ExpertBlock

__all__ = ["DeviceArray", "DeviceWeights", "array_info", "current_stream", "is_device_array"]

_CAI_TYPES = {"<f2": "float16", "<f4": "float32", "<i4": "int32", "<i8": "int64", "<i2": "int16", "<u2": "uint16",
              "|u1": "uint8"}
_TORCH_TYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "int32": "int32",
                "int64": "int64", "int16": "int16", "uint16": "uint16"}
_NP = {"float16": np.float16, "float32": np.float32, "int32": np.int32, "int64": np.int64, "int16": np.int16,
       "uint16": np.uint16}


class ArrayInfo:
    """A device array as the kernels see it (the object itself is kept alive in ``owner``)."""

    __slots__ = ("ptr", "shape", "dtype", "device", "contiguous", "owner", "kind")

    def __init__(self, ptr, shape, dtype, device, contiguous, owner, kind):
        self.ptr, self.shape, self.dtype, self.device = ptr, tuple(shape), dtype, device
        self.contiguous, self.owner, self.kind = contiguous, owner, kind


def _contiguous(shape, strides, itemsize):
    """C-contiguity from element or byte strides (None = contiguous)."""
    if strides is None:
        return True
    expected = 1
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected * itemsize:
            return False
        expected *= n
    return True


def _is_torch(value):
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "data_ptr")


def is_device_array(value):
    """True for arrays in GPU memory: DeviceArray, CUDA torch tensors, cupy and other CUDA Array
    Interface / DLPack exporters whose device is a GPU."""
    if isinstance(value, DeviceArray):
        return True
    if _is_torch(value):
        return value.device.type == "cuda"
    if hasattr(value, "__cuda_array_interface__"):
        return True
    if hasattr(value, "__dlpack_device__") and not isinstance(value, np.ndarray):
        try:
            return value.__dlpack_device__()[0] in (2, 13)
        except Exception:
            return False
    return False


def array_info(value, name):
    """The pointer, shape, dtype name and device index of a device array, without a copy."""
    if isinstance(value, DeviceArray):
        return ArrayInfo(value.ptr, value.shape, value.dtype_name, value.device, True, value, "metal_moe")
    if _is_torch(value):
        if value.device.type != "cuda":
            raise ValueError(f"{name}: is a torch tensor on {value.device}, not on a CUDA device")
        dtype = _TORCH_TYPES.get(str(value.dtype).replace("torch.", ""))
        return ArrayInfo(value.data_ptr(), value.shape, dtype, value.device.index, value.is_contiguous(), value,
                         "torch")
    cai = getattr(value, "__cuda_array_interface__", None)
    if cai is not None:
        dtype = _CAI_TYPES.get(cai["typestr"])
        itemsize = int(cai["typestr"][2:])
        ptr = cai["data"][0] or 0
        shape = tuple(cai["shape"])
        return ArrayInfo(ptr, shape, dtype, None, _contiguous(shape, cai.get("strides"), itemsize), value, "cai")
    if hasattr(value, "__dlpack__"):
        from . import _native

        capsule = value.__dlpack__()
        ptr, shape, strides, dtype, device_type, device = _native.dlpack_info(capsule)
        if device_type not in ("cuda", "cuda_managed"):
            raise ValueError(f"{name}: is a DLPack array on device type {device_type!r}, not a CUDA device")
        return ArrayInfo(ptr, shape, dtype, device, _contiguous(shape, strides, 1), (value, capsule), "dlpack")
    raise TypeError(f"{name}: expected a CUDA array (torch, cupy, __cuda_array_interface__ or DLPack), "
                    f"got {type(value).__name__}")


def current_stream(stream, arrays, device):
    """The CUDA stream handle to run on: ``stream`` if given (an int handle, a torch.cuda.Stream or a
    cupy Stream), else the current stream of the library the arrays come from (torch first, then
    cupy), else 0 (the legacy default stream)."""
    if stream is not None:
        if isinstance(stream, bool):
            raise TypeError("stream: expected a CUDA stream, got a bool")
        if isinstance(stream, int):
            return stream
        for attr in ("cuda_stream", "ptr", "handle"):
            handle = getattr(stream, attr, None)
            if isinstance(handle, int):
                return handle
        raise TypeError(f"stream: expected an int handle, a torch.cuda.Stream or a cupy Stream, "
                        f"got {type(stream).__name__}")
    kinds = {a.kind for a in arrays}
    if "torch" in kinds:
        import torch

        return torch.cuda.current_stream(device).cuda_stream
    if "cai" in kinds:
        for a in arrays:
            if a.kind == "cai" and type(a.owner).__module__.split(".")[0] == "cupy":
                import cupy

                return cupy.cuda.get_current_stream().ptr
    return 0


def _context(device):
    from .api import _default_context

    return _default_context("cuda", device)


class DeviceArray:
    """A C-contiguous array in CUDA device memory owned by metal_moe."""

    def __init__(self, shape, dtype, device=0):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in _NP and self.dtype.name != "bfloat16":
            raise TypeError(f"dtype: {self.dtype} is not a dtype metal_moe stores on a device")
        self.device = int(device)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._ctx = _context(self.device)
        self.ptr = self._ctx.alloc(self.nbytes) if self.nbytes else 0

    @property
    def dtype_name(self):
        return self.dtype.name

    @classmethod
    def from_numpy(cls, array, device=0):
        """Upload a host array (one synchronous copy)."""
        array = np.ascontiguousarray(array)
        out = cls(array.shape, array.dtype, device)
        if out.nbytes:
            out._ctx.copy(out.ptr, array.ctypes.data, out.nbytes)
        return out

    def numpy(self):
        """Download to a new host array (one synchronous copy)."""
        host = np.empty(self.shape, self.dtype)
        if self.nbytes:
            self._ctx.copy(host.ctypes.data, self.ptr, self.nbytes)
        return host

    def __len__(self):
        return self.shape[0]

    @property
    def __cuda_array_interface__(self):
        typestr = self.dtype.str if self.dtype.name != "bfloat16" else "<u2"
        return {"shape": self.shape, "typestr": typestr, "data": (self.ptr, False), "strides": None, "version": 3,
                "stream": None}

    def __del__(self):
        ctx, ptr = getattr(self, "_ctx", None), getattr(self, "ptr", 0)
        if ctx is not None and ptr:
            try:
                ctx.free(ptr)
            except Exception:
                pass
            self.ptr = 0

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device=cuda:{self.device})"


class _DeviceProjection:
    """One stacked (or shared) projection on a device: trellis, suh, svh, bits, codebook."""

    __slots__ = ("trellis", "suh", "svh", "bits", "codebook", "in_features", "out_features", "experts", "info")

    def __init__(self, trellis, suh, svh, codebook, name, stacked, device):
        infos = [array_info(a, f"{name}.{part}") for a, part in ((trellis, "trellis"), (suh, "suh"), (svh, "svh"))]
        for info, part, dtypes in zip(infos, ("trellis", "suh", "svh"), (("int16",), ("float16",), ("float16",))):
            if info.dtype not in dtypes:
                raise TypeError(f"{name}.{part}: dtype {info.dtype} is not accepted; expected {dtypes[0]}")
            if not info.contiguous:
                raise ValueError(f"{name}.{part}: must be C-contiguous")
            if info.device is not None and device is not None and info.device != device:
                raise ValueError(f"{name}.{part}: is on CUDA device {info.device}, the others on device {device}")
        t, su, sv = infos
        lead = 1 if stacked else 0
        if len(t.shape) != 3 + lead or len(su.shape) != 1 + lead or len(sv.shape) != 1 + lead:
            what = "[experts, in/16, out/16, 16*K]" if stacked else "[in/16, out/16, 16*K]"
            raise ValueError(f"{name}.trellis: expected shape {what}, got {t.shape}")
        experts = t.shape[0] if stacked else None
        k16, n16, words = t.shape[lead:]
        if words % 8:
            raise ValueError(f"{name}.trellis: last dimension {words} is not 16*K for a valid K")
        bits = words / 16
        self.codebook = check_codebook(codebook, name=f"{name} codebook")
        check_bits(bits, self.codebook, name=f"{name} bits")
        self.bits = int(bits) if float(bits).is_integer() else bits
        self.in_features, self.out_features, self.experts = 16 * k16, 16 * n16, experts
        for info, part, n in ((su, "suh", self.in_features), (sv, "svh", self.out_features)):
            if info.shape[-1] != n or (stacked and info.shape[0] != experts):
                want = f"[{experts}, {n}]" if stacked else f"[{n}]"
                raise ValueError(f"{name}.{part}: expected shape {want}, got {info.shape}")
        self.trellis, self.suh, self.svh = trellis, suh, svh
        self.info = infos

    @property
    def expert_bytes(self):
        """Bytes of one expert's trellis, suh and svh."""
        return self.in_features * self.out_features * self.bits / 8 + 2 * (self.in_features + self.out_features)

    def descriptor(self):
        t, su, sv = self.info
        return (t.ptr, su.ptr, sv.ptr, int(round(2 * self.bits)), self.codebook)


class DeviceWeights(ExpertBlock):
    """MoE weights resident on one CUDA device (see :meth:`MoEWeights.to` and :meth:`from_arrays`).

    The arrays are borrowed (kept alive by this object) and never copied; the descriptor the
    kernels read is built once here."""

    def __init__(self, gate, up, down, shared=None, *, device=0, preset=None):
        self.gate, self.up, self.down, self.shared = gate, up, down, shared
        self.device = int(device)
        self.preset = preset
        g, u, d = gate, up, down
        if not (g.experts == u.experts == d.experts):
            raise ValueError(f"experts: gate, up and down must have the same number of experts, got "
                             f"{g.experts}, {u.experts}, {d.experts}")
        if (u.in_features, u.out_features) != (g.in_features, g.out_features) or \
                (d.in_features, d.out_features) != (g.out_features, g.in_features):
            raise ValueError("up/down: shapes do not match gate (hidden -> intermediate -> hidden)")
        for dim, what in ((g.in_features, "hidden"), (g.out_features, "intermediate")):
            if dim % 128:
                raise ValueError(f"{what}: {dim} is not a multiple of 128")
        if shared is not None:
            sg, su_, sd = shared
            if (sg.in_features, sg.out_features, sd.out_features) != (g.in_features, g.out_features, g.in_features):
                raise ValueError("shared: its shapes do not match the routed experts'")
        shared_desc = None if shared is None else tuple(p.descriptor() for p in shared)
        self.descriptor = (g.in_features, g.out_features, g.experts, g.descriptor(), u.descriptor(), d.descriptor(),
                           shared_desc)

    @classmethod
    def from_arrays(cls, gate, up, down, *, codebook="3inst", shared=None, shared_codebook=None, device=None,
                    preset=None):
        """Device-resident weights from existing CUDA arrays, without a copy.

        gate/up/down: (trellis int16 [E, in/16, out/16, 16K], suh fp16 [E, in], svh fp16 [E, out]),
        torch/cupy/CUDA-Array-Interface/DLPack arrays on one device.  codebook: a name or a
        (gate, up, down) triple.  shared: an optional (gate, up, down) triple of unstacked triples.
        """
        books = (codebook,) * 3 if isinstance(codebook, str) else tuple(codebook)
        if len(books) != 3:
            raise ValueError(f"codebook: expected one name or a (gate, up, down) triple, got {codebook!r}")
        first = array_info(gate[0], "gate.trellis")
        device = first.device if device is None else int(device)
        device = 0 if device is None else device
        projs = [_DeviceProjection(*arrays, cb, name, True, device)
                 for arrays, cb, name in zip((gate, up, down), books, ("gate", "up", "down"))]
        sh = None
        if shared is not None:
            sbooks = books if shared_codebook is None else (
                (shared_codebook,) * 3 if isinstance(shared_codebook, str) else tuple(shared_codebook))
            sh = tuple(_DeviceProjection(*arrays, cb, f"shared.{name}", False, device)
                       for arrays, cb, name in zip(shared, sbooks, ("gate", "up", "down")))
        return cls(*projs, sh, device=device, preset=preset)

    @classmethod
    def upload(cls, weights, device=0):
        """Copy host :class:`MoEWeights` to `device` (what ``MoEWeights.to('cuda')`` calls)."""

        def put(w, name, stacked):
            arrays = [DeviceArray.from_numpy(a, device) for a in (w.trellis, w.suh, w.svh)]
            return _DeviceProjection(*arrays, w.codebook, name, stacked, device)

        projs = [put(w, n, True) for w, n in zip(weights.projections, ("gate", "up", "down"))]
        sh = None if weights.shared is None else tuple(
            put(w, f"shared.{n}", False) for w, n in zip(weights.shared, ("gate", "up", "down")))
        return cls(*projs, sh, device=device, preset=weights.preset)

    # ---- sizes (the shape properties come from ExpertBlock) -----------------------------------
    def expert_nbytes(self, e=0):
        """Bytes of one routed expert's three projections."""
        return int(sum(p.expert_bytes for p in self.projections))

    @property
    def shared_nbytes(self):
        """Bytes of the shared expert (0 without one)."""
        return 0 if self.shared is None else int(sum(p.expert_bytes for p in self.shared))

    @property
    def nbytes(self):
        return self.experts * self.expert_nbytes() + self.shared_nbytes

    def to(self, backend="cpu", device=None):
        """``"cuda"`` on this device: self.  ``"cpu"``: a host :class:`MoEWeights` (downloads)."""
        if backend == "cuda" and (device is None or int(device) == self.device):
            return self
        if backend == "cuda":
            return self.to("cpu").to("cuda", device=device)
        if backend != "cpu":
            raise ValueError(f"backend: expected 'cpu' or 'cuda', got {backend!r}")
        from .format import TrellisWeight
        from .weights import MoEWeights

        def host(p):
            arrays = [_download(a) for a in (p.trellis, p.suh, p.svh)]
            return TrellisWeight(arrays[0], arrays[1].view(np.float16), arrays[2].view(np.float16), p.codebook)

        shared = None if self.shared is None else tuple(host(p) for p in self.shared)
        return MoEWeights(*(host(p) for p in self.projections), shared, preset=self.preset)

    def __repr__(self):
        shared = ", shared" if self.shared is not None else ""
        name = f"{self.preset.name}: " if self.preset is not None else ""
        return (f"DeviceWeights({name}cuda:{self.device}, hidden={self.hidden}, intermediate={self.intermediate}, "
                f"experts={self.experts}, bits={self.bits}, codebooks={self.codebooks}{shared})")


def _download(a):
    if isinstance(a, DeviceArray):
        return a.numpy()
    if _is_torch(a):
        return a.detach().cpu().numpy()
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    info = array_info(a, "array")
    host = np.empty(info.shape, _NP[info.dtype])
    _context(info.device or 0).copy(host.ctypes.data, info.ptr, host.nbytes)
    return host
