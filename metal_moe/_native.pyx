# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython bindings of the C ABI (native/include/metal_moe.h): zero-copy dispatch of caller buffers.

Arrays reach C through the buffer protocol (C-contiguous, no copy); the Python layer
(`metal_moe.api`) has already checked dtypes and shapes and chosen the variant, and the C core
checks everything again, so this layer only moves pointers.  The GIL is released during a call.
"""

from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset


cdef extern from *:
    """
    /* DLPack (v0.x, the unversioned "dltensor" capsule that every producer exports by default) */
    typedef struct { int32_t device_type; int32_t device_id; } mm_DLDevice;
    typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } mm_DLDataType;
    typedef struct {
        void *data; mm_DLDevice device; int32_t ndim; mm_DLDataType dtype;
        int64_t *shape; int64_t *strides; uint64_t byte_offset;
    } mm_DLTensor;
    typedef struct { mm_DLTensor dl_tensor; void *manager_ctx; void (*deleter)(void *); } mm_DLManagedTensor;
    """
    ctypedef struct mm_DLDevice:
        int32_t device_type
        int32_t device_id
    ctypedef struct mm_DLDataType:
        uint8_t code
        uint8_t bits
        uint16_t lanes
    ctypedef struct mm_DLTensor:
        void *data
        mm_DLDevice device
        int32_t ndim
        mm_DLDataType dtype
        int64_t *shape
        int64_t *strides
        uint64_t byte_offset
    ctypedef struct mm_DLManagedTensor:
        mm_DLTensor dl_tensor


cdef extern from "metal_moe.h" nogil:
    ctypedef enum mm_status:
        MM_OK
        MM_ERR_INVALID_VALUE
        MM_ERR_INVALID_TYPE
        MM_ERR_UNSUPPORTED
        MM_ERR_OUT_OF_MEMORY
        MM_ERR_BACKEND
    ctypedef enum mm_backend:
        MM_BACKEND_CPU
        MM_BACKEND_CUDA
        MM_BACKEND_METAL
    ctypedef enum mm_dtype:
        MM_F16
        MM_BF16
        MM_F32
        MM_I32
        MM_I64
        MM_I16
    ctypedef enum mm_codebook:
        MM_CODEBOOK_3INST
        MM_CODEBOOK_MCG
        MM_CODEBOOK_MUL1
    ctypedef struct mm_context:
        pass
    ctypedef struct mm_context_options:
        uint32_t struct_size
        int32_t num_threads
        const char *cpu_isa
    ctypedef struct mm_tensor:
        void *data
        mm_dtype dtype
        int64_t rows
        int64_t cols
    ctypedef struct mm_projection:
        const int16_t *trellis
        const uint16_t *suh
        const uint16_t *svh
        int32_t bits_x2
        mm_codebook codebook
    ctypedef struct mm_weights:
        uint32_t struct_size
        int32_t hidden
        int32_t intermediate
        int32_t experts
        mm_projection gate, up, down
        int32_t has_shared
        mm_projection shared_gate, shared_up, shared_down
    ctypedef struct mm_variant_info:
        const char *name
        int32_t tile_n
        int32_t tokens_per_tile
        int32_t fp32_accumulate
        int32_t bits_x2[3]
        const char *fp32acc_twin
    ctypedef struct mm_forward_options:
        uint32_t struct_size
        const char *variant
        int32_t fp32_accumulate
        float routed_scaling_factor
        int32_t num_threads
        void *stream

    const char *mm_version()
    int mm_abi_version()
    const char *mm_last_error()
    int mm_backend_built(mm_backend backend)
    int mm_backend_device_count(mm_backend backend)
    void mm_context_options_init(mm_context_options *options)
    mm_status mm_context_create(mm_backend backend, int device, const mm_context_options *options, mm_context **out)
    void mm_context_destroy(mm_context *ctx)
    int mm_context_num_threads(const mm_context *ctx)
    const char *mm_context_simd(const mm_context *ctx)
    int mm_variant_count()
    const char *mm_variant_name(int index)
    mm_status mm_variant_describe(const char *name, mm_variant_info *info)
    int mm_backend_has_variant(mm_backend backend, const char *name)
    void mm_forward_options_init(mm_forward_options *options)
    mm_status mm_moe_forward(mm_context *ctx, const mm_weights *weights, const mm_tensor *x, const mm_tensor *ids,
                             const mm_tensor *p, const mm_tensor *out, const mm_forward_options *options)
    mm_status mm_decode_weight(mm_context *ctx, const int16_t *trellis, int32_t in_features, int32_t out_features,
                               int32_t bits_x2, mm_codebook codebook, int32_t simd, uint16_t *out)
    mm_status mm_context_counters(mm_context *ctx, uint64_t *fp32_reruns, uint64_t *invalid_ids)
    ctypedef enum mm_scoring:
        MM_SCORING_SOFTMAX
        MM_SCORING_SIGMOID
    ctypedef struct mm_route_options:
        uint32_t struct_size
        int32_t top_k
        mm_scoring scoring
        int32_t renormalize
        const float *bias
        void *stream
    void mm_route_options_init(mm_route_options *options)
    mm_status mm_route(mm_context *ctx, const mm_tensor *logits, const mm_route_options *options,
                       const mm_tensor *ids, const mm_tensor *p)
    mm_status mm_device_alloc(mm_context *ctx, size_t bytes, void **ptr)
    mm_status mm_device_free(mm_context *ctx, void *ptr)
    mm_status mm_device_copy(mm_context *ctx, void *dst, const void *src, size_t bytes)


BACKENDS = {"cpu": MM_BACKEND_CPU, "cuda": MM_BACKEND_CUDA, "metal": MM_BACKEND_METAL}
DTYPES = {"float16": MM_F16, "bfloat16": MM_BF16, "float32": MM_F32, "int32": MM_I32, "int64": MM_I64,
          "int16": MM_I16}
CODEBOOKS = {"3inst": MM_CODEBOOK_3INST, "mcg": MM_CODEBOOK_MCG, "mul1": MM_CODEBOOK_MUL1}


class UnsupportedError(ValueError):
    """The request is valid, but this backend or build cannot run it."""


cdef raise_status(mm_status status):
    message = mm_last_error().decode("utf-8", "replace")
    if status == MM_ERR_INVALID_TYPE:
        raise TypeError(message)
    if status == MM_ERR_INVALID_VALUE:
        raise ValueError(message)
    if status == MM_ERR_UNSUPPORTED:
        raise UnsupportedError(message)
    if status == MM_ERR_OUT_OF_MEMORY:
        raise MemoryError(message)
    raise RuntimeError(message)


def version():
    return mm_version().decode()


def abi_version():
    return mm_abi_version()


def variant_names():
    return tuple(mm_variant_name(i).decode() for i in range(mm_variant_count()))


def describe_variant(name):
    cdef mm_variant_info info
    encoded = name.encode()
    cdef mm_status s = mm_variant_describe(encoded, &info)
    if s != MM_OK:
        raise_status(s)
    return {
        "name": info.name.decode(),
        "tile_n": info.tile_n,
        "tokens_per_tile": info.tokens_per_tile,
        "fp32_accumulate": bool(info.fp32_accumulate),
        "bits_x2": (info.bits_x2[0], info.bits_x2[1], info.bits_x2[2]),
        "fp32acc_twin": None if info.fp32acc_twin == NULL else info.fp32acc_twin.decode(),
    }


def backend_built(name):
    return bool(mm_backend_built(BACKENDS[name]))


def backend_device_count(name):
    return mm_backend_device_count(BACKENDS[name])


def backend_has_variant(name, variant):
    return bool(mm_backend_has_variant(BACKENDS[name], variant.encode()))


cdef class _Buffers:
    """Buffer-protocol views held for the duration of one call."""
    cdef Py_buffer views[24]
    cdef int count

    def __cinit__(self):
        self.count = 0

    cdef void *get(self, object obj, bint writable) except? NULL:
        if obj is None:
            return NULL
        if self.count >= 24:
            raise RuntimeError("too many buffers")
        flags = PyBUF_C_CONTIGUOUS | (PyBUF_WRITABLE if writable else 0)
        PyObject_GetBuffer(obj, &self.views[self.count], flags)
        self.count += 1
        return self.views[self.count - 1].buf

    def __dealloc__(self):
        for i in range(self.count):
            PyBuffer_Release(&self.views[i])


cdef const void *array_address(object a, _Buffers bufs) except? NULL:
    """A buffer-protocol array's data (held by bufs), or an integer address when bufs is None."""
    if bufs is None:
        return <const void *><uintptr_t>a
    return bufs.get(a, False)


cdef int fill_projection(mm_projection *pr, object desc, _Buffers bufs) except -1:
    trellis, suh, svh, kx2, codebook = desc
    pr.trellis = <const int16_t *>array_address(trellis, bufs)
    pr.suh = <const uint16_t *>array_address(suh, bufs)
    pr.svh = <const uint16_t *>array_address(svh, bufs)
    pr.bits_x2 = kx2
    pr.codebook = CODEBOOKS[codebook]
    return 0


cdef int fill_weights(mm_weights *w, tuple weights, _Buffers bufs) except -1:
    """weights: (hidden, intermediate, experts, gate, up, down, shared) with each projection a
    (trellis, suh, svh, bits_x2, codebook) tuple of arrays (bufs) or addresses (bufs None), and
    shared None or a (gate, up, down) tuple."""
    memset(w, 0, sizeof(w[0]))
    w.struct_size = sizeof(w[0])
    hidden, intermediate, experts, gate, up, down, shared = weights
    w.hidden, w.intermediate, w.experts = hidden, intermediate, experts
    fill_projection(&w.gate, gate, bufs)
    fill_projection(&w.up, up, bufs)
    fill_projection(&w.down, down, bufs)
    if shared is not None:
        w.has_shared = 1
        fill_projection(&w.shared_gate, shared[0], bufs)
        fill_projection(&w.shared_up, shared[1], bufs)
        fill_projection(&w.shared_down, shared[2], bufs)
    return 0


cdef int fill_tensor(mm_tensor *t, object arr, str dtype, bint writable, _Buffers bufs) except -1:
    t.data = bufs.get(arr, writable)
    t.dtype = DTYPES[dtype]
    t.rows = arr.shape[0]
    t.cols = arr.shape[1]
    return 0


_DL_CODES = {(0, 32): "int32", (0, 64): "int64", (0, 16): "int16", (1, 16): "uint16", (2, 16): "float16",
             (2, 32): "float32", (4, 16): "bfloat16"}
_DL_DEVICES = {1: "cpu", 2: "cuda", 3: "cuda_host", 13: "cuda_managed"}


def dlpack_info(capsule):
    """(pointer, shape, strides or None, dtype name or None, device type name, device index) of an
    unconsumed DLPack capsule; the capsule is left unconsumed, so its owner frees it as usual."""
    if not PyCapsule_IsValid(capsule, b"dltensor"):
        raise TypeError("not a DLPack capsule (or one already consumed)")
    cdef mm_DLManagedTensor *m = <mm_DLManagedTensor *>PyCapsule_GetPointer(capsule, b"dltensor")
    cdef mm_DLTensor *t = &m.dl_tensor
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = None if t.strides == NULL else tuple(t.strides[i] for i in range(t.ndim))
    dtype = _DL_CODES.get((t.dtype.code, t.dtype.bits)) if t.dtype.lanes == 1 else None
    ptr = <uintptr_t>t.data + t.byte_offset
    return ptr, shape, strides, dtype, _DL_DEVICES.get(t.device.device_type, str(t.device.device_type)), t.device.device_id


cdef class Context:
    """A backend context (worker pool, kernels, device).  Thread-safe; reuse it."""
    cdef mm_context *ctx
    cdef readonly str backend
    cdef readonly int device

    def __cinit__(self, backend="cpu", int device=0, num_threads=None, cpu_isa=None):
        if backend not in BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; expected one of {sorted(BACKENDS)}")
        cdef mm_context_options options
        mm_context_options_init(&options)
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads: must be at least 1, got {num_threads}")
            options.num_threads = num_threads
        isa = None if cpu_isa is None else str(cpu_isa).encode()
        if isa is not None:
            options.cpu_isa = isa
        cdef mm_status s = mm_context_create(BACKENDS[backend], device, &options, &self.ctx)
        if s != MM_OK:
            raise_status(s)
        self.backend = backend
        self.device = device

    def __dealloc__(self):
        mm_context_destroy(self.ctx)

    @property
    def num_threads(self):
        return mm_context_num_threads(self.ctx)

    @property
    def simd(self):
        return mm_context_simd(self.ctx).decode()

    def __repr__(self):
        return f"Context(backend={self.backend!r}, device={self.device}, threads={self.num_threads}, simd={self.simd!r})"

    def forward(self, tuple weights, x, str x_dtype, ids, str ids_dtype, p, str p_dtype, out, str out_dtype,
                str variant, bint fp32_accumulate=False, float routed_scaling_factor=1.0, int num_threads=0):
        """weights: (hidden, intermediate, experts, gate, up, down, shared) with each projection a
        (trellis, suh, svh, bits_x2, codebook) tuple and shared None or a (gate, up, down) tuple."""
        cdef _Buffers bufs = _Buffers()
        cdef mm_weights w
        cdef mm_tensor tx, tids, tp, tout
        cdef mm_forward_options options
        cdef mm_status s
        fill_weights(&w, weights, bufs)
        fill_tensor(&tx, x, x_dtype, False, bufs)
        fill_tensor(&tids, ids, ids_dtype, False, bufs)
        fill_tensor(&tp, p, p_dtype, False, bufs)
        fill_tensor(&tout, out, out_dtype, True, bufs)
        mm_forward_options_init(&options)
        encoded = variant.encode()
        options.variant = encoded
        options.fp32_accumulate = fp32_accumulate
        options.routed_scaling_factor = routed_scaling_factor
        options.num_threads = num_threads
        with nogil:
            s = mm_moe_forward(self.ctx, &w, &tx, &tids, &tp, &tout, &options)
        if s != MM_OK:
            raise_status(s)

    def forward_pointers(self, tuple weights, tuple x, tuple ids, tuple p, tuple out, str variant,
                         bint fp32_accumulate=False, float routed_scaling_factor=1.0, uintptr_t stream=0):
        """The forward on raw (device) pointers.  weights: as for forward(), with each array an
        integer address; x, ids, p, out: (address, dtype name, rows, cols).  Returns once the
        work is queued on `stream` (it does not wait for it)."""
        cdef mm_weights w
        cdef mm_tensor t[4]
        cdef mm_forward_options options
        cdef mm_status s
        fill_weights(&w, weights, None)
        for i, (ptr, dtype, rows, cols) in enumerate((x, ids, p, out)):
            t[i].data = <void *><uintptr_t>ptr
            t[i].dtype = DTYPES[dtype]
            t[i].rows = rows
            t[i].cols = cols
        mm_forward_options_init(&options)
        encoded = variant.encode()
        options.variant = encoded
        options.fp32_accumulate = fp32_accumulate
        options.routed_scaling_factor = routed_scaling_factor
        options.stream = <void *>stream
        with nogil:
            s = mm_moe_forward(self.ctx, &w, &t[0], &t[1], &t[2], &t[3], &options)
        if s != MM_OK:
            raise_status(s)

    def route(self, logits, str logits_dtype, int top_k, str scoring, bint renormalize, bias, ids, p):
        """Top-k selection from router logits into ids (int32) and p (float32), in place (host arrays)."""
        cdef _Buffers bufs = _Buffers()
        cdef mm_tensor tl, ti, tp
        cdef mm_route_options options
        cdef mm_status s
        fill_tensor(&tl, logits, logits_dtype, False, bufs)
        fill_tensor(&ti, ids, "int32", True, bufs)
        fill_tensor(&tp, p, "float32", True, bufs)
        mm_route_options_init(&options)
        options.top_k = top_k
        options.scoring = MM_SCORING_SOFTMAX if scoring == "softmax" else MM_SCORING_SIGMOID
        options.renormalize = renormalize
        options.bias = <const float *>bufs.get(bias, False)
        with nogil:
            s = mm_route(self.ctx, &tl, &options, &ti, &tp)
        if s != MM_OK:
            raise_status(s)

    def route_pointers(self, tuple logits, int top_k, str scoring, bint renormalize, uintptr_t bias, uintptr_t ids,
                       uintptr_t p, uintptr_t stream=0):
        """route() on device addresses: logits (address, dtype name, rows, cols); ids int32 and p float32
        [rows, top_k] are written on `stream` (queued, not waited for)."""
        cdef mm_tensor tl, ti, tp
        cdef mm_route_options options
        cdef mm_status s
        ptr, dtype, rows, cols = logits
        tl.data = <void *><uintptr_t>ptr
        tl.dtype = DTYPES[dtype]
        tl.rows = rows
        tl.cols = cols
        ti.data = <void *>ids
        ti.dtype = MM_I32
        ti.rows = rows
        ti.cols = top_k
        tp.data = <void *>p
        tp.dtype = MM_F32
        tp.rows = rows
        tp.cols = top_k
        mm_route_options_init(&options)
        options.top_k = top_k
        options.scoring = MM_SCORING_SOFTMAX if scoring == "softmax" else MM_SCORING_SIGMOID
        options.renormalize = renormalize
        options.bias = <const float *>bias
        options.stream = <void *>stream
        with nogil:
            s = mm_route(self.ctx, &tl, &options, &ti, &tp)
        if s != MM_OK:
            raise_status(s)

    def counters(self):
        """(fp16 tiles re-run with fp32 sums, invalid expert ids seen) since the context was made."""
        cdef uint64_t reruns = 0, invalid = 0
        cdef mm_status s
        with nogil:
            s = mm_context_counters(self.ctx, &reruns, &invalid)
        if s != MM_OK:
            raise_status(s)
        return int(reruns), int(invalid)

    def alloc(self, size_t nbytes):
        """Device memory of this context's device: an integer address (free it with free())."""
        cdef void *ptr = NULL
        cdef mm_status s
        with nogil:
            s = mm_device_alloc(self.ctx, nbytes, &ptr)
        if s != MM_OK:
            raise_status(s)
        return <uintptr_t>ptr

    def free(self, uintptr_t ptr):
        cdef mm_status s
        with nogil:
            s = mm_device_free(self.ctx, <void *>ptr)
        if s != MM_OK:
            raise_status(s)

    def copy(self, uintptr_t dst, uintptr_t src, size_t nbytes):
        """Copy nbytes between host and device addresses (synchronous)."""
        cdef mm_status s
        with nogil:
            s = mm_device_copy(self.ctx, <void *>dst, <const void *>src, nbytes)
        if s != MM_OK:
            raise_status(s)

    def decode_pointers(self, uintptr_t trellis, int in_features, int out_features, int bits_x2, str codebook,
                        uintptr_t out):
        """decode() on device addresses (GPU contexts); returns when the result is written."""
        cdef mm_codebook cb = CODEBOOKS[codebook]
        cdef mm_status s
        with nogil:
            s = mm_decode_weight(self.ctx, <const int16_t *>trellis, in_features, out_features, bits_x2, cb, 1,
                                 <uint16_t *>out)
        if s != MM_OK:
            raise_status(s)

    def decode(self, trellis, int in_features, int out_features, int bits_x2, str codebook, out, bint simd=True):
        """Decode one projection of one expert into `out` (uint16 [in, out], fp16 bit patterns)."""
        cdef _Buffers bufs = _Buffers()
        cdef const int16_t *t = <const int16_t *>bufs.get(trellis, False)
        cdef uint16_t *o = <uint16_t *>bufs.get(out, True)
        cdef mm_codebook cb = CODEBOOKS[codebook]
        cdef mm_status s
        with nogil:
            s = mm_decode_weight(self.ctx, t, in_features, out_features, bits_x2, cb, simd, o)
        if s != MM_OK:
            raise_status(s)
