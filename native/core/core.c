/* The core: versions, errors, the variant registry, argument checks and dispatch. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mm_exl3.h"
#include "mm_internal.h"

#define MM_STR2(x) #x
#define MM_STR(x) MM_STR2(x)

const mm_variant_desc mm_variants[MM_VARIANT_COUNT] = {
#define MM_VARIANT(ID, name, tile_n, tokens, fp32, g, u, d, FALLBACK) \
    {name, tile_n, tokens, fp32, {g, u, d}, MM_VARIANT_##FALLBACK},
#include "variants.def"
#undef MM_VARIANT
};

/* ---- versions and errors --------------------------------------------------------------------- */
const char *mm_version(void)
{
    return MM_STR(MM_VERSION_MAJOR) "." MM_STR(MM_VERSION_MINOR) "." MM_STR(MM_VERSION_PATCH);
}

int mm_abi_version(void) { return MM_ABI_VERSION; }

static _Thread_local char mm_error_message[1024];

mm_status mm_fail(mm_status status, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(mm_error_message, sizeof mm_error_message, fmt, args);
    va_end(args);
    return status;
}

static void mm_clear_error(void) { mm_error_message[0] = '\0'; }

const char *mm_last_error(void) { return mm_error_message; }

const char *mm_status_name(mm_status status)
{
    switch (status) {
    case MM_OK: return "MM_OK";
    case MM_ERR_INVALID_VALUE: return "MM_ERR_INVALID_VALUE";
    case MM_ERR_INVALID_TYPE: return "MM_ERR_INVALID_TYPE";
    case MM_ERR_UNSUPPORTED: return "MM_ERR_UNSUPPORTED";
    case MM_ERR_OUT_OF_MEMORY: return "MM_ERR_OUT_OF_MEMORY";
    case MM_ERR_BACKEND: return "MM_ERR_BACKEND";
    }
    return "MM_ERR_UNKNOWN";
}

size_t mm_dtype_size(mm_dtype dtype)
{
    switch (dtype) {
    case MM_F16: case MM_BF16: case MM_I16: return 2;
    case MM_F32: case MM_I32: return 4;
    case MM_I64: return 8;
    }
    return 0;
}

static const char *mm_dtype_name(mm_dtype dtype)
{
    switch (dtype) {
    case MM_F16: return "float16";
    case MM_BF16: return "bfloat16";
    case MM_F32: return "float32";
    case MM_I32: return "int32";
    case MM_I64: return "int64";
    case MM_I16: return "int16";
    }
    return "unknown dtype";
}

/* ---- backends -------------------------------------------------------------------------------- */
const char *mm_backend_name(mm_backend backend)
{
    switch (backend) {
    case MM_BACKEND_CPU: return "cpu";
    case MM_BACKEND_CUDA: return "cuda";
    case MM_BACKEND_METAL: return "metal";
    }
    return "unknown";
}

int mm_backend_built(mm_backend backend)
{
#if defined(MM_HAVE_CUDA)
    if (backend == MM_BACKEND_CUDA) return 1;
#endif
#if defined(MM_HAVE_METAL)
    if (backend == MM_BACKEND_METAL) return 1;
#endif
    return backend == MM_BACKEND_CPU;
}

int mm_backend_device_count(mm_backend backend)
{
#if defined(MM_HAVE_CUDA)
    if (backend == MM_BACKEND_CUDA) return mm_cuda_device_count();
#endif
#if defined(MM_HAVE_METAL)
    if (backend == MM_BACKEND_METAL) return mm_metal_device_count();
#endif
    return backend == MM_BACKEND_CPU ? 1 : 0;
}

void mm_context_options_init(mm_context_options *options)
{
    if (!options) return;
    memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
}

mm_status mm_context_create(mm_backend backend, int device, const mm_context_options *options, mm_context **out)
{
    mm_clear_error();
    if (!out) return mm_fail(MM_ERR_INVALID_TYPE, "out: NULL pointer for the new context");
    *out = NULL;
    if (backend != MM_BACKEND_CPU && backend != MM_BACKEND_CUDA && backend != MM_BACKEND_METAL)
        return mm_fail(MM_ERR_INVALID_VALUE, "backend: unknown backend %d", (int)backend);
    if (!mm_backend_built(backend))
        return mm_fail(MM_ERR_UNSUPPORTED, "backend: '%s' is not built into this library", mm_backend_name(backend));
    const int devices = mm_backend_device_count(backend);
    if (devices == 0)
        return mm_fail(MM_ERR_UNSUPPORTED, "backend: '%s' is built, but no device of it is usable on this machine%s",
                       mm_backend_name(backend), backend == MM_BACKEND_CUDA    ? " (no GPU, or no driver)"
                       : backend == MM_BACKEND_METAL ? " (no Metal device)"
                                                     : "");
    if (device < 0 || device >= devices)
        return mm_fail(MM_ERR_INVALID_VALUE, "device: %d is not a device of backend '%s' (it has %d)", device,
                       mm_backend_name(backend), devices);
    mm_context_options defaults;
    mm_context_options_init(&defaults);
    if (!options) options = &defaults;
    if (options->struct_size < sizeof *options)
        return mm_fail(MM_ERR_INVALID_VALUE, "options.struct_size: %u is smaller than sizeof(mm_context_options) = %u",
                       (unsigned)options->struct_size, (unsigned)sizeof *options);
    if (options->num_threads < 0)
        return mm_fail(MM_ERR_INVALID_VALUE, "num_threads: %d must be at least 1 (or 0 for the default)",
                       options->num_threads);
    mm_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return mm_fail(MM_ERR_OUT_OF_MEMORY, "context: out of memory");
    ctx->backend = backend;
    ctx->device = device;
    mm_status s = MM_ERR_UNSUPPORTED;
    if (backend == MM_BACKEND_CPU) s = mm_cpu_context_init(ctx, options);
#if defined(MM_HAVE_CUDA)
    if (backend == MM_BACKEND_CUDA) s = mm_cuda_context_init(ctx, options);
#endif
#if defined(MM_HAVE_METAL)
    if (backend == MM_BACKEND_METAL) s = mm_metal_context_init(ctx, options);
#endif
    if (s != MM_OK) {
        free(ctx);
        return s;
    }
    *out = ctx;
    return MM_OK;
}

void mm_context_destroy(mm_context *ctx)
{
    if (!ctx) return;
    ctx->ops->destroy(ctx);
    free(ctx);
}

mm_backend mm_context_backend(const mm_context *ctx) { return ctx ? ctx->backend : MM_BACKEND_CPU; }

int mm_context_num_threads(const mm_context *ctx) { return ctx ? ctx->ops->num_threads(ctx) : 0; }

const char *mm_context_simd(const mm_context *ctx) { return ctx ? ctx->ops->simd(ctx) : ""; }

mm_status mm_context_counters(mm_context *ctx, uint64_t *fp32_reruns, uint64_t *invalid_ids)
{
    mm_clear_error();
    if (!ctx) return mm_fail(MM_ERR_INVALID_TYPE, "ctx: NULL context");
    uint64_t v[2] = {0, 0};
    if (ctx->ops->counters) {
        mm_status s = ctx->ops->counters(ctx, v, 2);
        if (s) return s;
    }
    if (fp32_reruns) *fp32_reruns = v[0];
    if (invalid_ids) *invalid_ids = v[1];
    return MM_OK;
}

static mm_status mm_no_device_memory(const mm_context *ctx)
{
    return mm_fail(MM_ERR_UNSUPPORTED, "ctx: backend '%s' has no device memory (host arrays are used as they are)",
                   mm_backend_name(ctx->backend));
}

mm_status mm_device_alloc(mm_context *ctx, size_t bytes, void **ptr)
{
    mm_clear_error();
    if (!ctx) return mm_fail(MM_ERR_INVALID_TYPE, "ctx: NULL context");
    if (!ptr) return mm_fail(MM_ERR_INVALID_TYPE, "ptr: NULL pointer");
    *ptr = NULL;
    if (!ctx->ops->alloc) return mm_no_device_memory(ctx);
    return bytes ? ctx->ops->alloc(ctx, bytes, ptr) : MM_OK;
}

mm_status mm_device_free(mm_context *ctx, void *ptr)
{
    mm_clear_error();
    if (!ctx) return mm_fail(MM_ERR_INVALID_TYPE, "ctx: NULL context");
    if (!ctx->ops->release) return mm_no_device_memory(ctx);
    return ptr ? ctx->ops->release(ctx, ptr) : MM_OK;
}

mm_status mm_device_copy(mm_context *ctx, void *dst, const void *src, size_t bytes)
{
    mm_clear_error();
    if (!ctx) return mm_fail(MM_ERR_INVALID_TYPE, "ctx: NULL context");
    if (!ctx->ops->copy) return mm_no_device_memory(ctx);
    if (bytes && (!dst || !src)) return mm_fail(MM_ERR_INVALID_TYPE, "%s: NULL pointer", dst ? "src" : "dst");
    return bytes ? ctx->ops->copy(ctx, dst, src, bytes) : MM_OK;
}

/* ---- variants -------------------------------------------------------------------------------- */
int mm_variant_count(void) { return MM_VARIANT_COUNT; }

const char *mm_variant_name(int index)
{
    return index >= 0 && index < MM_VARIANT_COUNT ? mm_variants[index].name : NULL;
}

static int mm_find_variant(const char *name)
{
    if (!name) return -1;
    for (int i = 0; i < MM_VARIANT_COUNT; ++i)
        if (strcmp(mm_variants[i].name, name) == 0) return i;
    return -1;
}

static mm_status mm_unknown_variant(const char *name)
{
    char list[1024];
    size_t used = 0;
    list[0] = '\0';
    for (int i = 0; i < MM_VARIANT_COUNT && used < sizeof list; ++i)
        used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", i ? ", " : "", mm_variants[i].name);
    return mm_fail(MM_ERR_INVALID_VALUE, "variant: unknown kernel variant '%s'; valid variants: %s",
                   name ? name : "(null)", list);
}

mm_status mm_variant_describe(const char *name, mm_variant_info *info)
{
    mm_clear_error();
    int id = mm_find_variant(name);
    if (id < 0) return mm_unknown_variant(name);
    if (!info) return mm_fail(MM_ERR_INVALID_TYPE, "info: NULL pointer");
    const mm_variant_desc *v = &mm_variants[id];
    info->name = v->name;
    info->tile_n = v->tile_n;
    info->tokens_per_tile = v->tokens_per_tile;
    info->fp32_accumulate = v->fp32_accumulate;
    for (int i = 0; i < 3; ++i) info->bits_x2[i] = v->kx2[i];
    info->fp32acc_twin = v->fallback == id && v->fp32_accumulate ? NULL : mm_variants[v->fallback].name;
    return MM_OK;
}

int mm_backend_has_variant(mm_backend backend, const char *name)
{
    int id = mm_find_variant(name);
    return id >= 0 && mm_backend_built(backend);
}

void mm_forward_options_init(mm_forward_options *options)
{
    if (!options) return;
    memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    options->routed_scaling_factor = 1.0f;
}

/* ---- argument checks ------------------------------------------------------------------------- */
static int mm_misaligned(const void *ptr, size_t align) { return ((uintptr_t)ptr % align) != 0; }

static mm_status mm_check_projection(const mm_projection *pr, const char *name, int required_kx2)
{
    if (pr->codebook < MM_CODEBOOK_3INST || pr->codebook > MM_CODEBOOK_MUL1)
        return mm_fail(MM_ERR_INVALID_VALUE, "%s.codebook: unknown codebook %d (0 = 3inst, 1 = mcg, 2 = mul1)", name,
                       (int)pr->codebook);
    if (pr->bits_x2 < MM_KX2_MIN || pr->bits_x2 > MM_KX2_MAX)
        return mm_fail(MM_ERR_INVALID_VALUE, "%s.bits_x2: %d is outside 2..16 (K = 1..8 bits)", name, pr->bits_x2);
    if (!mm_kx2_valid(pr->bits_x2, pr->codebook))
        return mm_fail(MM_ERR_INVALID_VALUE, "%s.bits_x2: half-integer K = %d/2 is valid only with the mul1 codebook", name,
                       pr->bits_x2);
    if (required_kx2 && pr->bits_x2 != required_kx2)
        return mm_fail(MM_ERR_INVALID_VALUE, "variant: is specialised for %s bits %g, but the weights have %g", name,
                       required_kx2 / 2.0, pr->bits_x2 / 2.0);
    if (!pr->trellis) return mm_fail(MM_ERR_INVALID_TYPE, "%s.trellis: NULL pointer", name);
    if (!pr->suh) return mm_fail(MM_ERR_INVALID_TYPE, "%s.suh: NULL pointer", name);
    if (!pr->svh) return mm_fail(MM_ERR_INVALID_TYPE, "%s.svh: NULL pointer", name);
    if (mm_misaligned(pr->trellis, 4))
        return mm_fail(MM_ERR_INVALID_VALUE, "%s.trellis: not 4-byte aligned (the kernels read 32-bit words)", name);
    if (mm_misaligned(pr->suh, 2)) return mm_fail(MM_ERR_INVALID_VALUE, "%s.suh: not 2-byte aligned", name);
    if (mm_misaligned(pr->svh, 2)) return mm_fail(MM_ERR_INVALID_VALUE, "%s.svh: not 2-byte aligned", name);
    return MM_OK;
}

static mm_status mm_check_weights(const mm_weights *w, const mm_variant_desc *v)
{
    if (!w) return mm_fail(MM_ERR_INVALID_TYPE, "weights: NULL pointer");
    if (w->struct_size < sizeof *w)
        return mm_fail(MM_ERR_INVALID_VALUE, "weights.struct_size: %u is smaller than sizeof(mm_weights) = %u",
                       (unsigned)w->struct_size, (unsigned)sizeof *w);
    if (w->hidden <= 0 || w->hidden % MM_HAD)
        return mm_fail(MM_ERR_INVALID_VALUE, "weights.hidden: %d is not a positive multiple of 128", w->hidden);
    if (w->intermediate <= 0 || w->intermediate % MM_HAD)
        return mm_fail(MM_ERR_INVALID_VALUE, "weights.intermediate: %d is not a positive multiple of 128", w->intermediate);
    if (w->experts <= 0) return mm_fail(MM_ERR_INVALID_VALUE, "weights.experts: %d must be at least 1", w->experts);
    mm_status s;
    if ((s = mm_check_projection(&w->gate, "weights.gate", v->kx2[0])) ||
        (s = mm_check_projection(&w->up, "weights.up", v->kx2[1])) ||
        (s = mm_check_projection(&w->down, "weights.down", v->kx2[2])))
        return s;
    if (w->has_shared) {
        if ((s = mm_check_projection(&w->shared_gate, "weights.shared_gate", 0)) ||
            (s = mm_check_projection(&w->shared_up, "weights.shared_up", 0)) ||
            (s = mm_check_projection(&w->shared_down, "weights.shared_down", 0)))
            return s;
    }
    return MM_OK;
}

static mm_status mm_check_tensor(const mm_tensor *t, const char *name, const mm_dtype *dtypes, int ndtypes)
{
    if (!t) return mm_fail(MM_ERR_INVALID_TYPE, "%s: NULL tensor descriptor", name);
    int ok = 0;
    for (int i = 0; i < ndtypes; ++i) ok |= t->dtype == dtypes[i];
    if (!ok) {
        char list[128];
        size_t used = 0;
        for (int i = 0; i < ndtypes; ++i)
            used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", i ? ", " : "", mm_dtype_name(dtypes[i]));
        return mm_fail(MM_ERR_INVALID_TYPE, "%s: dtype %s is not accepted (expected %s)", name, mm_dtype_name(t->dtype), list);
    }
    if (t->rows < 0 || t->cols < 0)
        return mm_fail(MM_ERR_INVALID_VALUE, "%s: negative shape [%lld, %lld]", name, (long long)t->rows, (long long)t->cols);
    if (t->rows * t->cols > 0 && !t->data) return mm_fail(MM_ERR_INVALID_TYPE, "%s: NULL data pointer", name);
    if (mm_misaligned(t->data, mm_dtype_size(t->dtype)))
        return mm_fail(MM_ERR_INVALID_VALUE, "%s: data is not aligned to its %zu-byte elements", name,
                       mm_dtype_size(t->dtype));
    return MM_OK;
}

static int mm_overlap(const mm_tensor *a, const mm_tensor *b)
{
    size_t na = (size_t)(a->rows * a->cols) * mm_dtype_size(a->dtype);
    size_t nb = (size_t)(b->rows * b->cols) * mm_dtype_size(b->dtype);
    if (!na || !nb) return 0;
    const char *pa = a->data, *pb = b->data;
    return pa < pb + nb && pb < pa + na;
}

static float mm_load_float(const void *data, mm_dtype dtype, int64_t i)
{
    switch (dtype) {
    case MM_F32: return ((const float *)data)[i];
    case MM_F16: return mm_half_to_float(((const uint16_t *)data)[i]);
    case MM_BF16: return mm_host_u2f((uint32_t)((const uint16_t *)data)[i] << 16);
    default: return 0.0f;
    }
}

mm_status mm_moe_forward(mm_context *ctx, const mm_weights *weights, const mm_tensor *x, const mm_tensor *ids,
                         const mm_tensor *p, const mm_tensor *out, const mm_forward_options *options)
{
    mm_clear_error();
    if (!ctx) return mm_fail(MM_ERR_INVALID_TYPE, "ctx: NULL context");
    if (!options) return mm_fail(MM_ERR_INVALID_TYPE, "options: NULL pointer (use mm_forward_options_init)");
    if (options->struct_size < sizeof *options)
        return mm_fail(MM_ERR_INVALID_VALUE, "options.struct_size: %u is smaller than sizeof(mm_forward_options) = %u",
                       (unsigned)options->struct_size, (unsigned)sizeof *options);
    int id = mm_find_variant(options->variant);
    if (id < 0) return mm_unknown_variant(options->variant);
    if (options->fp32_accumulate && !mm_variants[id].fp32_accumulate) id = mm_variants[id].fallback;
    const mm_variant_desc *v = &mm_variants[id];
    if (!ctx->ops->has_variant(id))
        return mm_fail(MM_ERR_UNSUPPORTED, "variant: backend '%s' has no variant '%s'", mm_backend_name(ctx->backend), v->name);
    if (options->num_threads < 0)
        return mm_fail(MM_ERR_INVALID_VALUE, "num_threads: %d must be at least 1 (or 0 for all)", options->num_threads);
    if (!isfinite(options->routed_scaling_factor))
        return mm_fail(MM_ERR_INVALID_VALUE, "routed_scaling_factor: must be finite");

    mm_status s = mm_check_weights(weights, v);
    if (s) return s;
    static const mm_dtype act[] = {MM_F16, MM_BF16, MM_F32};
    static const mm_dtype idx[] = {MM_I32, MM_I64};
    if ((s = mm_check_tensor(x, "x", act, 3)) || (s = mm_check_tensor(ids, "ids", idx, 2)) ||
        (s = mm_check_tensor(p, "p", act + 0, 3)) || (s = mm_check_tensor(out, "out", act, 3)))
        return s;
    if (x->cols != weights->hidden)
        return mm_fail(MM_ERR_INVALID_VALUE, "x: expected [tokens, %d] (hidden), got [%lld, %lld]", weights->hidden,
                       (long long)x->rows, (long long)x->cols);
    if (ids->rows != x->rows)
        return mm_fail(MM_ERR_INVALID_VALUE, "ids: expected %lld rows (one per token of x), got [%lld, %lld]",
                       (long long)x->rows, (long long)ids->rows, (long long)ids->cols);
    if (ids->cols < 1 || ids->cols > 1024)
        return mm_fail(MM_ERR_INVALID_VALUE, "ids: top_k = %lld must be in 1..1024", (long long)ids->cols);
    if (p->rows != ids->rows || p->cols != ids->cols)
        return mm_fail(MM_ERR_INVALID_VALUE, "p: expected the shape of ids [%lld, %lld], got [%lld, %lld]",
                       (long long)ids->rows, (long long)ids->cols, (long long)p->rows, (long long)p->cols);
    if (out->rows != x->rows || out->cols != x->cols)
        return mm_fail(MM_ERR_INVALID_VALUE, "out: expected the shape of x [%lld, %lld], got [%lld, %lld]",
                       (long long)x->rows, (long long)x->cols, (long long)out->rows, (long long)out->cols);
    if (mm_overlap(out, x)) return mm_fail(MM_ERR_INVALID_VALUE, "out: overlaps x (in-place operation is not supported)");
    if (mm_overlap(out, ids)) return mm_fail(MM_ERR_INVALID_VALUE, "out: overlaps ids");
    if (mm_overlap(out, p)) return mm_fail(MM_ERR_INVALID_VALUE, "out: overlaps p");
    /* Host-memory backends (cpu, metal) check every id and weight here; CUDA cannot read device memory
     * without synchronising, so their kernels check the ids (an invalid one makes its token's row
     * NaN and is counted, see mm_context_counters). */
    int64_t n = ctx->backend != MM_BACKEND_CUDA ? ids->rows * ids->cols : 0;   /* cpu, metal: host memory */
    for (int64_t i = 0; i < n; ++i) {
        int64_t e = ids->dtype == MM_I32 ? ((const int32_t *)ids->data)[i] : ((const int64_t *)ids->data)[i];
        if (e < 0 || e >= weights->experts)
            return mm_fail(MM_ERR_INVALID_VALUE, "ids: expert index %lld (token %lld, slot %lld) is outside [0, %d)",
                           (long long)e, (long long)(i / ids->cols), (long long)(i % ids->cols), weights->experts);
        if (!isfinite(mm_load_float(p->data, p->dtype, i)))
            return mm_fail(MM_ERR_INVALID_VALUE, "p: routing weight of token %lld, slot %lld is not finite",
                           (long long)(i / ids->cols), (long long)(i % ids->cols));
    }
    mm_forward_call call = {
        .w = weights, .variant = v, .variant_id = id, .tokens = x->rows, .top_k = (int32_t)ids->cols,
        .x = x->data, .x_dtype = x->dtype, .ids = ids->data, .ids_dtype = ids->dtype, .p = p->data,
        .p_dtype = p->dtype, .out = out->data, .out_dtype = out->dtype,
        .routed_scaling_factor = options->routed_scaling_factor, .num_threads = options->num_threads,
        .stream = options->stream,
    };
    if (call.tokens == 0) return MM_OK;
    return ctx->ops->forward(ctx, &call);
}

/* ---- routing (host memory; matches metal_moe.reference.route) ---------------------------------- */
void mm_route_options_init(mm_route_options *options)
{
    if (!options) return;
    memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    options->top_k = 1;
    options->renormalize = 1;
}

static mm_status mm_route_host(const mm_tensor *logits, const mm_route_options *o, const mm_tensor *ids,
                               const mm_tensor *p)
{
    const int64_t E = logits->cols;
    const int k = o->top_k;
    double *scores = malloc(sizeof(double) * (size_t)E);
    int32_t *pick = malloc(sizeof(int32_t) * (size_t)k);
    if (!scores || !pick) {
        free(scores), free(pick);
        return mm_fail(MM_ERR_OUT_OF_MEMORY, "route: out of memory");
    }
    for (int64_t t = 0; t < logits->rows; ++t) {
        double top = -INFINITY, sum = 0.0;
        for (int64_t e = 0; e < E; ++e) {
            scores[e] = mm_load_float(logits->data, logits->dtype, t * E + e);
            if (!isfinite(scores[e])) {
                free(scores), free(pick);
                return mm_fail(MM_ERR_INVALID_VALUE, "logits: token %lld, expert %lld is not finite", (long long)t,
                               (long long)e);
            }
            if (scores[e] > top) top = scores[e];
        }
        for (int64_t e = 0; e < E; ++e) {
            scores[e] = o->scoring == MM_SCORING_SOFTMAX ? exp(scores[e] - top) : 1.0 / (1.0 + exp(-scores[e]));
            sum += scores[e];
        }
        if (o->scoring == MM_SCORING_SOFTMAX)
            for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
        /* k passes of "largest choice not taken yet", ties to the lower index */
        for (int j = 0; j < k; ++j) {
            int64_t best = -1;
            double best_choice = 0.0;
            for (int64_t e = 0; e < E; ++e) {
                int taken = 0;
                for (int i = 0; i < j && !taken; ++i) taken = pick[i] == e;
                if (taken) continue;
                const double choice = scores[e] + (o->bias ? (double)o->bias[e] : 0.0);
                if (best < 0 || choice > best_choice) best = e, best_choice = choice;
            }
            pick[j] = (int32_t)best;
        }
        double picked = 0.0;
        for (int j = 0; j < k; ++j) picked += scores[pick[j]];
        const double norm = o->renormalize ? (picked > 1e-20 ? picked : 1e-20) : 1.0;
        for (int j = 0; j < k; ++j) {
            ((int32_t *)ids->data)[t * k + j] = pick[j];
            ((float *)p->data)[t * k + j] = (float)(scores[pick[j]] / norm);
        }
    }
    free(scores), free(pick);
    return MM_OK;
}

mm_status mm_route(mm_context *ctx, const mm_tensor *logits, const mm_route_options *options, const mm_tensor *ids,
                   const mm_tensor *p)
{
    mm_clear_error();
    if (!ctx) return mm_fail(MM_ERR_INVALID_TYPE, "ctx: NULL context");
    if (!options) return mm_fail(MM_ERR_INVALID_TYPE, "options: NULL pointer (use mm_route_options_init)");
    if (options->struct_size < sizeof *options)
        return mm_fail(MM_ERR_INVALID_VALUE, "options.struct_size: %u is smaller than sizeof(mm_route_options) = %u",
                       (unsigned)options->struct_size, (unsigned)sizeof *options);
    static const mm_dtype act[] = {MM_F16, MM_BF16, MM_F32};
    static const mm_dtype i32[] = {MM_I32};
    static const mm_dtype f32[] = {MM_F32};
    mm_status s;
    if ((s = mm_check_tensor(logits, "logits", act, 3)) || (s = mm_check_tensor(ids, "ids", i32, 1)) ||
        (s = mm_check_tensor(p, "p", f32, 1)))
        return s;
    if (logits->cols < 1) return mm_fail(MM_ERR_INVALID_VALUE, "logits: expected [tokens, experts] with experts >= 1");
    if (options->top_k < 1 || options->top_k > logits->cols)
        return mm_fail(MM_ERR_INVALID_VALUE, "top_k: must be in 1..%lld (the number of experts), got %d",
                       (long long)logits->cols, options->top_k);
    if (options->scoring != MM_SCORING_SOFTMAX && options->scoring != MM_SCORING_SIGMOID)
        return mm_fail(MM_ERR_INVALID_VALUE, "scoring: unknown scoring %d (0 = softmax, 1 = sigmoid)",
                       (int)options->scoring);
    if (ids->rows != logits->rows || ids->cols != options->top_k)
        return mm_fail(MM_ERR_INVALID_VALUE, "ids: expected [%lld, %d], got [%lld, %lld]", (long long)logits->rows,
                       options->top_k, (long long)ids->rows, (long long)ids->cols);
    if (p->rows != ids->rows || p->cols != ids->cols)
        return mm_fail(MM_ERR_INVALID_VALUE, "p: expected the shape of ids [%lld, %lld], got [%lld, %lld]",
                       (long long)ids->rows, (long long)ids->cols, (long long)p->rows, (long long)p->cols);
    if (mm_overlap(ids, logits) || mm_overlap(p, logits) || mm_overlap(ids, p))
        return mm_fail(MM_ERR_INVALID_VALUE, "ids/p: overlap each other or logits");
    if (ctx->ops->route) return ctx->ops->route(ctx, logits, options, ids, p);
    if (options->bias)
        for (int64_t e = 0; e < logits->cols; ++e)
            if (!isfinite(options->bias[e]))
                return mm_fail(MM_ERR_INVALID_VALUE, "bias: entry %lld is not finite", (long long)e);
    return mm_route_host(logits, options, ids, p);
}

mm_status mm_decode_weight(mm_context *ctx, const int16_t *trellis, int32_t in_features, int32_t out_features,
                           int32_t bits_x2, mm_codebook codebook, int32_t simd, uint16_t *out)
{
    mm_clear_error();
    if (!ctx) return mm_fail(MM_ERR_INVALID_TYPE, "ctx: NULL context");
    mm_projection pr = {trellis, (const uint16_t *)trellis, (const uint16_t *)trellis, bits_x2, codebook};
    mm_status s = mm_check_projection(&pr, "weight", 0);
    if (s) return s;
    if (in_features <= 0 || in_features % MM_HAD || out_features <= 0 || out_features % MM_HAD)
        return mm_fail(MM_ERR_INVALID_VALUE, "shape: [%d, %d] is not a pair of positive multiples of 128", in_features,
                       out_features);
    if (!out) return mm_fail(MM_ERR_INVALID_TYPE, "out: NULL pointer");
    return ctx->ops->decode(ctx, trellis, in_features, out_features, bits_x2, codebook, simd, out);
}
