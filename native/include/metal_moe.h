/*
 * metal_moe.h — the stable C interface of metal_moe.
 *
 * One call computes the expert block of a Mixture-of-Experts layer straight from EXL3
 * trellis-quantized weights:
 *
 *     y[t] = rsf * sum_j p[t,j] * Down_e( silu(Gate_e(x[t])) * Up_e(x[t]) ) + Shared(x[t]),
 *            e = ids[t,j],  j < top_k,  rsf = routed_scaling_factor
 *
 * Use:
 *     mm_context *ctx;
 *     if (mm_context_create(MM_BACKEND_CPU, 0, NULL, &ctx) != MM_OK) { puts(mm_last_error()); ... }
 *     mm_weights w = {0}; w.struct_size = sizeof w; ... fill pointers and shapes ...
 *     mm_forward_options o; mm_forward_options_init(&o); o.variant = "moe_trellis_swiglu_decode";
 *     mm_status s = mm_moe_forward(ctx, &w, &x, &ids, &p, &y, &o);
 *     mm_context_destroy(ctx);
 *
 * Rules
 *   - Every array is borrowed: the library never copies or frees caller memory, and keeps no
 *     pointer after a call returns.  Arrays must be C-contiguous and aligned to their element
 *     size (trellis arrays to 4 bytes).
 *   - No global mutable state.  Every function is thread-safe; one context may be used from many
 *     threads at once (calls on the same CPU context share its worker pool and run one at a time).
 *   - Every failing call returns a status other than MM_OK and sets a thread-local message,
 *     read with mm_last_error(), that names the offending argument.  Inputs are checked before
 *     any work is done; a failed call leaves `out` untouched.
 *   - Structs that may grow carry `struct_size` (set it to sizeof the struct you compiled with);
 *     the library reads only the fields that size covers.
 */
#ifndef METAL_MOE_H
#define METAL_MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
  #define MM_API __declspec(dllexport)
#else
  #define MM_API __attribute__((visibility("default")))
#endif

/* ---- versions ------------------------------------------------------------------------------ */
#define MM_VERSION_MAJOR 0
#define MM_VERSION_MINOR 1
#define MM_VERSION_PATCH 0
/* The ABI version changes whenever a struct layout, an enum value or a signature changes. */
#define MM_ABI_VERSION 1

MM_API const char *mm_version(void);    /* "0.1.0" */
MM_API int mm_abi_version(void);        /* MM_ABI_VERSION of the library actually loaded */

/* ---- status -------------------------------------------------------------------------------- */
typedef enum mm_status {
    MM_OK = 0,
    MM_ERR_INVALID_VALUE = 1,   /* a shape, range or value is wrong (Python: ValueError) */
    MM_ERR_INVALID_TYPE = 2,    /* a dtype, a missing pointer or a wrong kind of thing (TypeError) */
    MM_ERR_UNSUPPORTED = 3,     /* valid, but this backend or build cannot do it */
    MM_ERR_OUT_OF_MEMORY = 4,
    MM_ERR_BACKEND = 5          /* the device or its runtime failed */
} mm_status;

/* The message of the last failed call on this thread ("" if none).  Valid until the next call
 * on this thread. */
MM_API const char *mm_last_error(void);
MM_API const char *mm_status_name(mm_status status);

/* ---- backends and contexts ------------------------------------------------------------------ */
typedef enum mm_backend {
    MM_BACKEND_CPU = 0,
    MM_BACKEND_CUDA = 1,
    MM_BACKEND_METAL = 2
} mm_backend;

/* 1 if the backend was compiled into this library, 0 otherwise. */
MM_API int mm_backend_built(mm_backend backend);
/* Number of usable devices of a backend on this machine (CPU: 1; 0 when not built/usable). */
MM_API int mm_backend_device_count(mm_backend backend);
MM_API const char *mm_backend_name(mm_backend backend);   /* "cpu", "cuda", "metal" */

/* An opaque per-backend, per-device context: worker threads (CPU), device handles and caches
 * (GPU).  Immutable after creation except for internal caches, which are locked. */
typedef struct mm_context mm_context;

/* Options for a new context; zero fields mean "default".  Initialise with
 * mm_context_options_init. */
typedef struct mm_context_options {
    uint32_t struct_size;           /* sizeof(mm_context_options) */
    int32_t num_threads;            /* CPU worker pool size; 0: min(online CPUs, $METAL_MOE_NUM_THREADS) */
    const char *cpu_isa;            /* CPU kernels: "auto" (best the processor runs) or "scalar" (portable);
                                       NULL: $METAL_MOE_CPU_ISA, else "auto" */
} mm_context_options;

MM_API void mm_context_options_init(mm_context_options *options);

/* Create a context for `device` of `backend` (CPU: device 0).  `options` may be NULL.
 * Environment, read here: $METAL_MOE_NUM_THREADS caps the default pool size (it never raises it);
 * $METAL_MOE_CPU_ISA ("auto" or "scalar") picks the CPU kernels when options->cpu_isa is NULL;
 * $METAL_MOE_CPU_WORKSPACE_MB (default 256) bounds the CPU workspace: larger batches run in
 * blocks of tokens. */
MM_API mm_status mm_context_create(mm_backend backend, int device, const mm_context_options *options,
                                   mm_context **out);
MM_API void mm_context_destroy(mm_context *ctx);              /* NULL is a no-op */
MM_API mm_backend mm_context_backend(const mm_context *ctx);
/* Worker threads of the context (CPU), 0 for GPU contexts. */
MM_API int mm_context_num_threads(const mm_context *ctx);
/* A short description of the machine code the context runs: CPU "avx2+fma+f16c" or "scalar";
 * CUDA "sm_90 (NVIDIA H200, 132 SMs)". */
MM_API const char *mm_context_simd(const mm_context *ctx);

/* Counters kept by a device context since it was created: fp16-accumulating tiles re-run with
 * fp32 sums because their sums overflowed, and expert ids outside [0, experts) met by the kernels
 * (device backends check ids on the device; the token's output row is then NaN).  CPU contexts
 * report 0 (the CPU core refuses bad ids before any work, and the Python layer re-runs
 * overflowing calls).  Reading a CUDA context's counters synchronises with its device. */
MM_API mm_status mm_context_counters(mm_context *ctx, uint64_t *fp32_reruns, uint64_t *invalid_ids);

/* Device memory of a GPU context (MM_ERR_UNSUPPORTED for the CPU backend).  mm_device_copy copies
 * `bytes` between any two of host and this device's memory and returns when the copy is done (it
 * synchronises with the device's legacy default stream). */
MM_API mm_status mm_device_alloc(mm_context *ctx, size_t bytes, void **ptr);
MM_API mm_status mm_device_free(mm_context *ctx, void *ptr);
MM_API mm_status mm_device_copy(mm_context *ctx, void *dst, const void *src, size_t bytes);

/* ---- arrays -------------------------------------------------------------------------------- */
typedef enum mm_dtype {
    MM_F16 = 0,
    MM_BF16 = 1,
    MM_F32 = 2,
    MM_I32 = 3,
    MM_I64 = 4,
    MM_I16 = 5
} mm_dtype;

/* A borrowed, C-contiguous 2-D array [rows, cols]. */
typedef struct mm_tensor {
    void *data;
    mm_dtype dtype;
    int64_t rows;
    int64_t cols;
} mm_tensor;

/* ---- weights ------------------------------------------------------------------------------- */
typedef enum mm_codebook {
    MM_CODEBOOK_3INST = 0,
    MM_CODEBOOK_MCG = 1,
    MM_CODEBOOK_MUL1 = 2
} mm_codebook;

/* One projection of every expert, exactly as an EXL3 checkpoint stores it:
 *   trellis  int16 [experts, in/16, out/16, 16*K]
 *   suh      fp16  [experts, in]
 *   svh      fp16  [experts, out]
 * bits_x2 = 2*K: 2..16, odd values (K = 1.5, 2.5, 3.5) only with MM_CODEBOOK_MUL1. */
typedef struct mm_projection {
    const int16_t *trellis;
    const uint16_t *suh;
    const uint16_t *svh;
    int32_t bits_x2;
    mm_codebook codebook;
} mm_projection;

/* A layer's experts: gate/up map hidden -> intermediate, down intermediate -> hidden; hidden
 * and intermediate are multiples of 128.  The optional shared expert uses the same layout with
 * one expert (no expert axis) and is applied to every token with weight 1 (not scaled by the
 * routed scaling factor). */
typedef struct mm_weights {
    uint32_t struct_size;           /* sizeof(mm_weights) */
    int32_t hidden;
    int32_t intermediate;
    int32_t experts;
    mm_projection gate, up, down;
    int32_t has_shared;
    mm_projection shared_gate, shared_up, shared_down;
} mm_weights;

/* ---- kernel variants ------------------------------------------------------------------------ */
/* The variant registry (DESIGN.md section 4).  Names are stable API. */
MM_API int mm_variant_count(void);
MM_API const char *mm_variant_name(int index);            /* NULL outside [0, count) */

typedef struct mm_variant_info {
    const char *name;
    int32_t tile_n;             /* output columns per work item */
    int32_t tokens_per_tile;    /* tokens that share one decode of a weight tile (0: all) */
    int32_t fp32_accumulate;    /* 1: fp32 partial sums; 0: fp16 running sums */
    int32_t bits_x2[3];         /* compile-time (gate, up, down) rates, 0 when run-time */
    const char *fp32acc_twin;   /* the variant to re-run with when fp16 sums overflow (NULL: none) */
} mm_variant_info;

/* Describe a variant by name; MM_ERR_INVALID_VALUE (message lists the valid names) if unknown. */
MM_API mm_status mm_variant_describe(const char *name, mm_variant_info *info);
/* 1 if `backend` implements the variant. */
MM_API int mm_backend_has_variant(mm_backend backend, const char *name);

/* ---- the forward ------------------------------------------------------------------------------ */
typedef struct mm_forward_options {
    uint32_t struct_size;           /* sizeof(mm_forward_options) */
    const char *variant;            /* required: a name from the registry */
    int32_t fp32_accumulate;        /* 1: run the fp32-accumulating twin of `variant` (if the
                                       variant already accumulates in fp32 this changes nothing;
                                       a variant without a twin is refused) */
    float routed_scaling_factor;    /* multiplies the routed experts' sum (default 1) */
    int32_t num_threads;            /* CPU: cap on worker threads for this call; 0 = all */
    void *stream;                   /* GPU backends: the stream to run on (NULL: default) */
} mm_forward_options;

MM_API void mm_forward_options_init(mm_forward_options *options);

/* The MoE expert block.
 *   x    [M, hidden]   MM_F16, MM_BF16 or MM_F32
 *   ids  [M, top_k]    MM_I32 or MM_I64, each in [0, experts)
 *   p    [M, top_k]    MM_F32, MM_F16 or MM_BF16, finite
 *   out  [M, hidden]   any of x's dtypes; must not overlap x, ids or p
 * M may be 0.  Per token, the routed contributions are summed in slot order j = 0..top_k-1 in
 * fp32, so results do not depend on threads or scheduling.
 *
 * CUDA contexts: every pointer (x, ids, p, out and the weights) is device memory of the context's
 * device, checked with cudaPointerGetAttributes.  The call queues four kernels on
 * options->stream and returns without waiting for them; it allocates nothing once the context's
 * workspace has grown to the largest call seen (a call needing more allocates it, except during
 * stream capture, where it fails with MM_ERR_UNSUPPORTED: make one call of that size first).
 * The host cannot read ids or p there, so the kernels check the ids: an id outside [0, experts)
 * makes its token's row NaN and is counted (mm_context_counters); p is not checked.  Calls on one
 * context must not run concurrently on different streams (use one context per stream); a call on
 * another stream than the previous one waits for it on the device. */
MM_API mm_status mm_moe_forward(mm_context *ctx, const mm_weights *weights, const mm_tensor *x,
                                const mm_tensor *ids, const mm_tensor *p, const mm_tensor *out,
                                const mm_forward_options *options);

/* ---- routing -------------------------------------------------------------------------------- */
typedef enum mm_scoring {
    MM_SCORING_SOFTMAX = 0,         /* Qwen3-MoE: softmax(logits) */
    MM_SCORING_SIGMOID = 1          /* GLM-4.x, DeepSeek-V3: sigmoid(logits) */
} mm_scoring;

typedef struct mm_route_options {
    uint32_t struct_size;           /* sizeof(mm_route_options) */
    int32_t top_k;                  /* 1..experts */
    mm_scoring scoring;
    int32_t renormalize;            /* 1: the selected scores are divided by their sum (at least 1e-20) */
    const float *bias;              /* NULL or [experts] float32: added to the scores to choose experts,
                                       not to their weights (DeepSeek's correction bias); finite */
    void *stream;                   /* GPU backends: the stream to run on (NULL: default) */
} mm_route_options;

MM_API void mm_route_options_init(mm_route_options *options);

/* Top-k expert selection from router logits, as metal_moe.reference.route computes it:
 *   logits  [M, experts]  MM_F32, MM_F16 or MM_BF16, finite
 *   ids     [M, top_k]    MM_I32 (written): the experts with the largest scores (+ bias), ties to
 *                         the lower index, in decreasing order
 *   p       [M, top_k]    MM_F32 (written): their scores, renormalised if asked
 * Computed in double precision on the CPU.  Feed ids and p to mm_moe_forward (Python:
 * fused_moe(x, weights=w, router_logits=...)). */
MM_API mm_status mm_route(mm_context *ctx, const mm_tensor *logits, const mm_route_options *options,
                          const mm_tensor *ids, const mm_tensor *p);

/* ---- format helpers (for tests and tools) ---------------------------------------------------- */
/* Decode one projection of one expert to its fp16 W_q [in, out] with the backend's decoder
 * (`simd` = 1: the context's SIMD decoder where it has one, else the portable one). */
MM_API mm_status mm_decode_weight(mm_context *ctx, const int16_t *trellis, int32_t in_features,
                                  int32_t out_features, int32_t bits_x2, mm_codebook codebook,
                                  int32_t simd, uint16_t *out);

#ifdef __cplusplus
}
#endif
#endif /* METAL_MOE_H */
