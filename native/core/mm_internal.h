/* Internal interface between the core (argument checks, registry, dispatch) and the backends. */
#ifndef MM_INTERNAL_H
#define MM_INTERNAL_H

#include "metal_moe.h"

enum mm_variant_id {
#define MM_VARIANT(ID, name, tile_n, tokens, fp32, g, u, d, FALLBACK) MM_VARIANT_##ID,
#include "variants.def"
#undef MM_VARIANT
    MM_VARIANT_COUNT
};

typedef struct mm_variant_desc {
    const char *name;
    int tile_n;
    int tokens_per_tile;
    int fp32_accumulate;
    int kx2[3];                 /* compile-time rates (gate, up, down); 0 = run-time */
    int fallback;               /* enum mm_variant_id */
} mm_variant_desc;

extern const mm_variant_desc mm_variants[MM_VARIANT_COUNT];

/* A forward call after every argument has been checked. */
typedef struct mm_forward_call {
    const mm_weights *w;
    const mm_variant_desc *variant;
    int variant_id;
    int64_t tokens;             /* M */
    int32_t top_k;
    const void *x;
    mm_dtype x_dtype;
    const void *ids;
    mm_dtype ids_dtype;
    const void *p;
    mm_dtype p_dtype;
    void *out;
    mm_dtype out_dtype;
    float routed_scaling_factor;
    int num_threads;            /* 0 = all */
    void *stream;
} mm_forward_call;

typedef struct mm_backend_ops {
    mm_status (*forward)(mm_context *ctx, const mm_forward_call *call);
    mm_status (*decode)(mm_context *ctx, const int16_t *trellis, int in_features, int out_features,
                        int kx2, int codebook, int simd, uint16_t *out);
    void (*destroy)(mm_context *ctx);
    int (*num_threads)(const mm_context *ctx);
    const char *(*simd)(const mm_context *ctx);
    int (*has_variant)(int variant_id);
    /* device-side counters: [0] fp16 tiles re-run with fp32 sums, [1] invalid expert ids (NULL: none) */
    mm_status (*counters)(mm_context *ctx, uint64_t *values, int n);
    /* top-k routing (NULL: the core's host implementation, for host-memory backends) */
    mm_status (*route)(mm_context *ctx, const mm_tensor *logits, const mm_route_options *options,
                       const mm_tensor *ids, const mm_tensor *p);
    /* device memory (NULL for host backends) */
    mm_status (*alloc)(mm_context *ctx, size_t bytes, void **ptr);
    mm_status (*release)(mm_context *ctx, void *ptr);
    mm_status (*copy)(mm_context *ctx, void *dst, const void *src, size_t bytes);
} mm_backend_ops;

struct mm_context {
    mm_backend backend;
    int device;
    const mm_backend_ops *ops;
    void *impl;
};

/* Set this thread's last-error message (printf-style) and return `status`. */
mm_status mm_fail(mm_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Backend constructors: fill ctx->ops and ctx->impl. */
mm_status mm_cpu_context_init(mm_context *ctx, const mm_context_options *options);
#if defined(MM_HAVE_CUDA)
mm_status mm_cuda_context_init(mm_context *ctx, const mm_context_options *options);
int mm_cuda_device_count(void);
#endif
#if defined(MM_HAVE_METAL)
mm_status mm_metal_context_init(mm_context *ctx, const mm_context_options *options);
int mm_metal_device_count(void);
#endif

/* Element size of a dtype in bytes. */
size_t mm_dtype_size(mm_dtype dtype);

#endif
