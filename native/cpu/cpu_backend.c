/*
 * The CPU backend: the driver around the kernels of gemm_template.h.
 *
 * A forward call runs, per block of tokens, five parallel loops over a persistent pool:
 *   1. inputs    per (token, slot): x ⊙ suh -> fp16 -> Hadamard -> fp16, for gate and up, laid out
 *                as the kernel family wants (group layout or plain)
 *   2. gate/up   per (expert chunk of T tokens, strip of tile_n columns): the two GEMMs, decoded
 *                in registers (T = the variant's tokens per tile); fp16 results
 *   3. SwiGLU    per slot: Hadamard -> fp16 -> ⊙ svh -> fp16, silu(g) * u, ⊙ suh_down, Hadamard -> fp16
 *   4. down      per (expert chunk, strip of hidden columns): the down GEMM, fp32 results
 *   5. combine   per token: Hadamard, ⊙ svh_down, ⊙ p, summed over slots j = 0..top_k-1 in order in
 *                fp32, times the routed scaling factor, plus the shared expert (weight 1)
 * The rounding points follow the EXL3 fused kernel (FORMAT.md 5, "precision inside the kernel").
 * Slots are grouped by expert (a counting sort that keeps token order), so every decoded weight
 * tile serves all tokens of a chunk.  Nothing depends on scheduling: results are deterministic.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "mm_internal.h"
#include "pool.h"

#if defined(_WIN32)
  #include <windows.h>
#else
  #include <unistd.h>
#endif

#define MM_WORKSPACE_MB 256      /* token blocks are sized to keep the workspace under this
                                    ($METAL_MOE_CPU_WORKSPACE_MB overrides it) */

typedef struct mm_cpu {
    mm_pool *pool;
    void *workspace;                     /* reused between calls (guarded by the pool's use lock) */
    size_t workspace_bytes;
    size_t workspace_cap;                /* token blocks keep the workspace under this */
    const mm_cpu_kernels *kernels;      /* the fastest set this processor runs */
    mm_decode_tables tables;
    float *lut;                          /* 3 x 65536 codebook values */
    mm_kernel_env env;
} mm_cpu;

/* ---- context ----------------------------------------------------------------------------------- */
static void mm_fill_group_tables(mm_decode_tables *tables)
{
    for (int kx2 = MM_KX2_MIN; kx2 <= MM_KX2_MAX; ++kx2) {
        mm_group_table *tab = &tables->lanes[kx2];
        for (int G = 0; G < MM_GROUPS; ++G) {
            tab->wrap[G] = mm_group_wraps(G, kx2);
            tab->base[G] = mm_group_base(G, kx2);
            for (int l = 0; l < MM_LANES; ++l) {
                const int pos = mm_lane_pos[l];
                tab->idx[G][l] = mm_group_idx(G, pos, kx2);          /* 0..7 */
                tab->sh[G][l] = mm_group_sh(G, pos, kx2);
                /* byte-shuffle form: both 128-bit halves shuffle the same 16 bytes */
                const int base_byte = mm_group_offset(G, kx2);
                const int bit = mm_lane_window_bit(G, pos, kx2);
                for (int b = 0; b < 4; ++b) {
                    /* lane byte 3-b <- stream byte m+b; byte 0 (m+3) is never needed, byte 1 (m+2) only
                     * when the window is not byte-aligned, and then it lies in the 16 bytes (rel <= 15
                     * for every rate and group: the group spans at most 7 x 8 + 16 bits from its first
                     * window, whose word starts the 16 bytes; the decoder tests check every rate) */
                    const int rel = mm_stream_byte_in_memory((bit >> 3) + b) - base_byte;
                    tab->shuffle[G][4 * l + 3 - b] = b == 3 || rel > 15 ? 0x80 : (uint8_t)rel;
                }
                tab->shl[G][l] = bit & 7;
                tab->offset[G] = base_byte;
            }
        }
    }
}

static int mm_online_cpus(void)
{
#if defined(_WIN32)
    SYSTEM_INFO info;
    GetSystemInfo(&info);
    return (int)info.dwNumberOfProcessors;
#else
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
#endif
}

static int mm_cpu_has_avx2(void)
{
#if defined(MM_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static void mm_cpu_destroy(mm_context *ctx)
{
    mm_cpu *cpu = ctx->impl;
    if (!cpu) return;
    mm_pool_destroy(cpu->pool);
    free(cpu->workspace);
    free(cpu->lut);
    free(cpu);
    ctx->impl = NULL;
}

static int mm_cpu_num_threads(const mm_context *ctx) { return mm_pool_threads(((const mm_cpu *)ctx->impl)->pool); }

static const char *mm_cpu_simd(const mm_context *ctx) { return ((const mm_cpu *)ctx->impl)->kernels->isa; }

static int mm_cpu_has_variant(int variant_id) { return variant_id >= 0 && variant_id < MM_VARIANT_COUNT; }

/* ---- forward ----------------------------------------------------------------------------------- */
typedef struct mm_proj_view {
    const mm_u32 *tiles;            /* expert 0; expert e at + e * stride */
    size_t stride;                  /* 32-bit words per expert */
    const uint16_t *suh, *svh;
    int in, out, kx2, codebook;
    mm_gemm_fn gemm;
} mm_proj_view;

typedef struct mm_run {
    const mm_forward_call *call;
    mm_cpu *cpu;
    const mm_variant_desc *variant;
    int group_layout;               /* 1: group-layout inputs; 0: plain (micro kernel) */
    int H, I, top_k, experts;       /* experts counts the shared expert as the last one */
    mm_proj_view proj[2][3];        /* [routed, shared][gate, up, down] */
    /* the current token block */
    int64_t t0, nb, nslots;
    int32_t *slot_expert;           /* expert of each slot (experts-1 = shared) */
    int64_t *order;                 /* slots grouped by expert, token order inside */
    int64_t *chunk_first;           /* first index into order of each chunk */
    int32_t *chunk_count;
    int64_t nchunks;
    /* workspace, per slot */
    float *xg, *xu, *mid_g, *mid_u, *act;   /* xg is reused for the down results */
    size_t in_stride, act_stride;
    float *scratch;                 /* per worker, 2 * max(H, I) */
    size_t scratch_stride;
    int strips_i, strips_h;
} mm_run;

static float mm_load_act(const void *data, mm_dtype dtype, size_t i)
{
    switch (dtype) {
    case MM_F16: return mm_half_to_float(((const uint16_t *)data)[i]);
    case MM_BF16: return mm_host_u2f((mm_u32)((const uint16_t *)data)[i] << 16);
    default: return ((const float *)data)[i];
    }
}

static void mm_store_act(void *data, mm_dtype dtype, size_t i, float v)
{
    switch (dtype) {
    case MM_F16: ((uint16_t *)data)[i] = (uint16_t)mm_float_to_half(v); break;
    case MM_BF16: {
        mm_u32 u = mm_host_f2u(v);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) u |= 0x00400000u;          /* NaN stays NaN */
        else u += 0x7FFFu + ((u >> 16) & 1u);                           /* round to nearest even */
        ((uint16_t *)data)[i] = (uint16_t)(u >> 16);
        break;
    }
    default: ((float *)data)[i] = v; break;
    }
}

/* The shared expert is counted as the last expert. */
static int mm_is_shared(const mm_run *r, int e) { return e == r->experts - 1 && r->call->w->has_shared; }

static int64_t mm_slot_token(const mm_run *r, int64_t s)
{
    const int64_t routed = r->nb * r->top_k;
    return r->t0 + (s < routed ? s / r->top_k : s - routed);
}

/* v[0..n) <- fp16(H v) per 128-block, then written in the kernel's input layout to dst */
static void mm_rotate_to_layout(const mm_run *r, float *v, int n, int codebook, float *dst)
{
    const int group_layout = r->group_layout;
    for (int b = 0; b < n; b += MM_HAD) mm_hadamard128(v + b);
    r->cpu->kernels->round_half(v, n);
    const float scale = r->cpu->kernels->input_scale[codebook];   /* the decoder's weights carry its inverse */
    if (!group_layout) {
        for (int k = 0; k < n; ++k) dst[k] = v[k] * scale;
        return;
    }
    for (int i = 0; i < n / 16; ++i)
        for (int a = 0; a < 4; ++a)
            for (int l = 0; l < MM_LANES; ++l)
                dst[(4 * i + a) * MM_LANES + l] = v[16 * i + 2 * a + mm_lane_row[l]] * scale;
}

static void mm_phase_inputs(void *arg, int64_t s, int worker)
{
    mm_run *r = arg;
    const int e = r->slot_expert[s];
    const int shared = mm_is_shared(r, e);
    const int64_t t = mm_slot_token(r, s);
    float *v = r->scratch + (size_t)worker * r->scratch_stride;
    for (int g = 0; g < 2; ++g) {
        const mm_proj_view *pv = &r->proj[shared][g];
        const uint16_t *suh = pv->suh + (size_t)(shared ? 0 : e) * r->H;
        for (int k = 0; k < r->H; ++k)
            v[k] = mm_load_act(r->call->x, r->call->x_dtype, (size_t)t * r->H + k) * mm_half_to_float(suh[k]);
        r->cpu->kernels->round_half(v, r->H);
        mm_rotate_to_layout(r, v, r->H, pv->codebook, (g ? r->xu : r->xg) + (size_t)s * r->in_stride);
    }
}

static void mm_run_gemm(mm_run *r, int64_t item, int which, int strips, float *in_base, size_t in_stride,
                        float *out_base, size_t out_stride, int round_out)
{
    const int64_t chunk = item / strips;
    const int strip = (int)(item % strips);
    const int64_t *slots = r->order + r->chunk_first[chunk];
    const int e = r->slot_expert[slots[0]];
    const int shared = mm_is_shared(r, e);
    const mm_proj_view *pv = &r->proj[shared][which];
    const float *in[MM_MICRO_TOKENS];
    float *out[MM_MICRO_TOKENS];
    for (int t = 0; t < r->chunk_count[chunk]; ++t) {
        in[t] = in_base + (size_t)slots[t] * in_stride;
        out[t] = out_base + (size_t)slots[t] * out_stride;
    }
    const int nj = r->variant->tile_n / 16;
    mm_gemm_job job = {
        .tiles = pv->tiles + (size_t)(shared ? 0 : e) * pv->stride,
        .k_tiles = pv->in / 16, .n_tiles = pv->out / 16, .kx2 = pv->kx2, .codebook = pv->codebook,
        .j0 = strip * nj, .nj = nj, .ntok = r->chunk_count[chunk], .in = in, .out = out, .round_out = round_out,
    };
    pv->gemm(&r->cpu->env, &job);
}

static void mm_phase_gate_up(void *arg, int64_t item, int worker)
{
    mm_run *r = arg;
    (void)worker;
    mm_run_gemm(r, item, 0, r->strips_i, r->xg, r->in_stride, r->mid_g, (size_t)r->I, 1);
    mm_run_gemm(r, item, 1, r->strips_i, r->xu, r->in_stride, r->mid_u, (size_t)r->I, 1);
}

static void mm_phase_swiglu(void *arg, int64_t s, int worker)
{
    mm_run *r = arg;
    const int e = r->slot_expert[s];
    const int shared = mm_is_shared(r, e);
    const size_t ex = shared ? 0 : (size_t)e;
    float *g = r->mid_g + (size_t)s * r->I, *u = r->mid_u + (size_t)s * r->I;
    float *v = r->scratch + (size_t)worker * r->scratch_stride;
    const uint16_t *svh_g = r->proj[shared][0].svh + ex * r->I, *svh_u = r->proj[shared][1].svh + ex * r->I;
    const uint16_t *suh_d = r->proj[shared][2].suh + ex * r->I;
    void (*round_half)(float *, int) = r->cpu->kernels->round_half;
    for (int b = 0; b < r->I; b += MM_HAD) {
        mm_hadamard128(g + b);
        mm_hadamard128(u + b);
    }
    round_half(g, r->I);
    round_half(u, r->I);
    for (int k = 0; k < r->I; ++k) {
        g[k] *= mm_half_to_float(svh_g[k]);
        u[k] *= mm_half_to_float(svh_u[k]);
    }
    round_half(g, r->I);
    round_half(u, r->I);
    for (int k = 0; k < r->I; ++k) v[k] = mm_silu(g[k]);
    round_half(v, r->I);
    for (int k = 0; k < r->I; ++k) v[k] *= u[k];
    round_half(v, r->I);
    for (int k = 0; k < r->I; ++k) v[k] *= mm_half_to_float(suh_d[k]);
    round_half(v, r->I);
    mm_rotate_to_layout(r, v, r->I, r->proj[shared][2].codebook, r->act + (size_t)s * r->act_stride);
}

static void mm_phase_down(void *arg, int64_t item, int worker)
{
    mm_run *r = arg;
    (void)worker;
    mm_run_gemm(r, item, 2, r->strips_h, r->act, r->act_stride, r->xg, r->in_stride, 0);
}

static void mm_phase_combine(void *arg, int64_t tb, int worker)
{
    mm_run *r = arg;
    const mm_forward_call *call = r->call;
    float *acc = r->scratch + (size_t)worker * r->scratch_stride;
    memset(acc, 0, (size_t)r->H * sizeof *acc);
    const int64_t t = r->t0 + tb;
    for (int j = 0; j < r->top_k; ++j) {
        const int64_t s = tb * r->top_k + j;
        const int e = r->slot_expert[s];
        float *d = r->xg + (size_t)s * r->in_stride;
        const uint16_t *svh = r->proj[0][2].svh + (size_t)e * r->H;
        const float p = mm_load_act(call->p, call->p_dtype, (size_t)t * r->top_k + j);
        for (int b = 0; b < r->H; b += MM_HAD) mm_hadamard128(d + b);
        for (int h = 0; h < r->H; ++h) acc[h] += p * (mm_half_to_float(svh[h]) * d[h]);
    }
    const float rsf = call->routed_scaling_factor;
    for (int h = 0; h < r->H; ++h) acc[h] *= rsf;
    if (call->w->has_shared) {
        float *d = r->xg + (size_t)(r->nb * r->top_k + tb) * r->in_stride;
        const uint16_t *svh = r->proj[1][2].svh;
        for (int b = 0; b < r->H; b += MM_HAD) mm_hadamard128(d + b);
        for (int h = 0; h < r->H; ++h) acc[h] += mm_half_to_float(svh[h]) * d[h];
    }
    for (int h = 0; h < r->H; ++h) mm_store_act(call->out, call->out_dtype, (size_t)t * r->H + h, acc[h]);
}

/* The GEMM kernel of a variant for one projection. */
static mm_gemm_fn mm_pick_gemm(const mm_cpu_kernels *k, int variant_id, int kx2)
{
    switch (variant_id) {
    case MM_VARIANT_DECODE_6_2_3:
    case MM_VARIANT_DECODE_6_3_4:
    case MM_VARIANT_DECODE_6_2_4:
        switch (kx2) {   /* the compile-time instances; any other rate (a shared expert) runs the generic one */
        case 4: return k->group_t1_f32_k4;
        case 6: return k->group_t1_f32_k6;
        case 8: return k->group_t1_f32_k8;
        case 12: return k->group_t1_f32_k12;
        default: return k->group_t1_f32;
        }
    case MM_VARIANT_DECODE: return k->group_t1_f32;
    case MM_VARIANT_PREFILL4: return k->group_t4_f16;
    case MM_VARIANT_PREFILL4_FP32ACC: return k->group_t4_f32;
    case MM_VARIANT_GENERAL: return k->group_t16_f16;
    case MM_VARIANT_GENERAL_FP32ACC: return k->group_t16_f32;
    case MM_VARIANT_LARGE_BATCH: return k->group_t32_f16;
    default: return k->micro;
    }
}

static void mm_view_projection(mm_proj_view *pv, const mm_projection *p, int in, int out, const mm_cpu_kernels *k,
                               int variant_id)
{
    pv->tiles = (const mm_u32 *)(const void *)p->trellis;
    pv->stride = (size_t)(in / 16) * (out / 16) * mm_tile_dwords(p->bits_x2);
    pv->suh = p->suh;
    pv->svh = p->svh;
    pv->in = in;
    pv->out = out;
    pv->kx2 = p->bits_x2;
    pv->codebook = p->codebook;
    pv->gemm = mm_pick_gemm(k, variant_id, p->bits_x2);
}

static int64_t mm_load_id(const mm_forward_call *call, int64_t i)
{
    return call->ids_dtype == MM_I32 ? ((const int32_t *)call->ids)[i] : ((const int64_t *)call->ids)[i];
}

static mm_status mm_cpu_forward(mm_context *ctx, const mm_forward_call *call)
{
    mm_cpu *cpu = ctx->impl;
    const mm_weights *w = call->w;
    mm_run r;
    memset(&r, 0, sizeof r);
    r.call = call;
    r.cpu = cpu;
    r.variant = call->variant;
    r.group_layout = call->variant_id != MM_VARIANT_SIMD;
    r.H = w->hidden;
    r.I = w->intermediate;
    r.top_k = call->top_k;
    r.experts = w->experts + (w->has_shared ? 1 : 0);
    const mm_cpu_kernels *k = cpu->kernels;
    mm_view_projection(&r.proj[0][0], &w->gate, r.H, r.I, k, call->variant_id);
    mm_view_projection(&r.proj[0][1], &w->up, r.H, r.I, k, call->variant_id);
    mm_view_projection(&r.proj[0][2], &w->down, r.I, r.H, k, call->variant_id);
    if (w->has_shared) {
        mm_view_projection(&r.proj[1][0], &w->shared_gate, r.H, r.I, k, call->variant_id);
        mm_view_projection(&r.proj[1][1], &w->shared_up, r.H, r.I, k, call->variant_id);
        mm_view_projection(&r.proj[1][2], &w->shared_down, r.I, r.H, k, call->variant_id);
    }
    r.strips_i = r.I / r.variant->tile_n;
    r.strips_h = r.H / r.variant->tile_n;
    r.in_stride = (size_t)2 * r.H;
    r.act_stride = (size_t)2 * r.I;
    const size_t per_slot = 2 * r.in_stride + 2 * (size_t)r.I + r.act_stride;         /* floats */
    const int slots_per_token = r.top_k + (w->has_shared ? 1 : 0);
    int64_t block = (int64_t)(cpu->workspace_cap / (per_slot * sizeof(float) * (size_t)slots_per_token));
    if (block < 1) block = 1;
    if (block > call->tokens) block = call->tokens;

    const int threads = mm_pool_threads(cpu->pool);
    const int workers = call->num_threads > 0 && call->num_threads < threads ? call->num_threads : threads;
    r.scratch_stride = (size_t)2 * (r.H > r.I ? r.H : r.I);
    const int tpt = r.variant->tokens_per_tile;
    const int64_t max_slots = block * slots_per_token;
    const size_t bytes = sizeof(float) * (per_slot * (size_t)max_slots + r.scratch_stride * (size_t)threads) +
                         (sizeof(int32_t) * 2 + sizeof(int64_t) * 2) * (size_t)max_slots + 64;
    int64_t *counts = calloc((size_t)r.experts + 1, sizeof *counts);
    if (!counts) return mm_fail(MM_ERR_OUT_OF_MEMORY, "workspace: cannot allocate expert counts");
    mm_pool_acquire(cpu->pool);
    if (cpu->workspace_bytes < bytes) {
        free(cpu->workspace);
        cpu->workspace = malloc(bytes);
        cpu->workspace_bytes = cpu->workspace ? bytes : 0;
        if (!cpu->workspace) {
            mm_pool_release(cpu->pool);
            free(counts);
            return mm_fail(MM_ERR_OUT_OF_MEMORY, "workspace: cannot allocate %zu bytes", bytes);
        }
    }
    char *mem = cpu->workspace;
    float *f = (float *)mem;
    r.xg = f, f += r.in_stride * (size_t)max_slots;
    r.xu = f, f += r.in_stride * (size_t)max_slots;
    r.mid_g = f, f += (size_t)r.I * (size_t)max_slots;
    r.mid_u = f, f += (size_t)r.I * (size_t)max_slots;
    r.act = f, f += r.act_stride * (size_t)max_slots;
    r.scratch = f, f += r.scratch_stride * (size_t)threads;
    r.order = (int64_t *)(void *)f;
    r.chunk_first = r.order + max_slots;
    r.slot_expert = (int32_t *)(void *)(r.chunk_first + max_slots);
    r.chunk_count = r.slot_expert + max_slots;

    for (r.t0 = 0; r.t0 < call->tokens; r.t0 += block) {
        r.nb = call->tokens - r.t0 < block ? call->tokens - r.t0 : block;
        r.nslots = r.nb * slots_per_token;
        const int64_t routed = r.nb * r.top_k;
        for (int64_t s = 0; s < routed; ++s) r.slot_expert[s] = (int32_t)mm_load_id(call, r.t0 * r.top_k + s);
        for (int64_t s = routed; s < r.nslots; ++s) r.slot_expert[s] = r.experts - 1;
        /* counting sort of slots by expert; token order kept inside an expert */
        memset(counts, 0, ((size_t)r.experts + 1) * sizeof *counts);
        for (int64_t s = 0; s < r.nslots; ++s) counts[r.slot_expert[s] + 1]++;
        for (int e = 0; e < r.experts; ++e) counts[e + 1] += counts[e];
        r.nchunks = 0;
        for (int e = 0; e < r.experts; ++e)
            for (int64_t first = counts[e]; first < counts[e + 1]; first += tpt) {
                r.chunk_first[r.nchunks] = first;
                r.chunk_count[r.nchunks] = (int32_t)(counts[e + 1] - first < tpt ? counts[e + 1] - first : tpt);
                r.nchunks++;
            }
        for (int64_t s = 0; s < r.nslots; ++s) r.order[counts[r.slot_expert[s]]++] = s;

        mm_pool_run(cpu->pool, r.nslots, workers, mm_phase_inputs, &r);
        mm_pool_run(cpu->pool, r.nchunks * r.strips_i, workers, mm_phase_gate_up, &r);
        mm_pool_run(cpu->pool, r.nslots, workers, mm_phase_swiglu, &r);
        mm_pool_run(cpu->pool, r.nchunks * r.strips_h, workers, mm_phase_down, &r);
        mm_pool_run(cpu->pool, r.nb, workers, mm_phase_combine, &r);
    }
    mm_pool_release(cpu->pool);
    free(counts);
    return MM_OK;
}

static mm_status mm_cpu_decode(mm_context *ctx, const int16_t *trellis, int in_features, int out_features, int kx2,
                               int codebook, int simd, uint16_t *out)
{
    mm_cpu *cpu = ctx->impl;
    const mm_cpu_kernels *k = simd ? cpu->kernels : &mm_cpu_kernels_scalar;
    k->decode(&cpu->env, (const mm_u32 *)(const void *)trellis, in_features / 16, out_features / 16, kx2, codebook, out);
    return MM_OK;
}

static const mm_backend_ops mm_cpu_ops = {
    .forward = mm_cpu_forward,
    .decode = mm_cpu_decode,
    .destroy = mm_cpu_destroy,
    .num_threads = mm_cpu_num_threads,
    .simd = mm_cpu_simd,
    .has_variant = mm_cpu_has_variant,
    .counters = NULL,
    .route = NULL,
    .alloc = NULL,
    .release = NULL,
    .copy = NULL,
};

mm_status mm_cpu_context_init(mm_context *ctx, const mm_context_options *options)
{
    mm_cpu *cpu = calloc(1, sizeof *cpu);
    if (!cpu) return mm_fail(MM_ERR_OUT_OF_MEMORY, "context: out of memory");
    ctx->impl = cpu;
    ctx->ops = &mm_cpu_ops;
    cpu->lut = malloc(sizeof(float) * 3 * 65536);
    if (!cpu->lut) {
        mm_cpu_destroy(ctx);
        return mm_fail(MM_ERR_OUT_OF_MEMORY, "context: out of memory for the codebook tables");
    }
    for (int cb = 0; cb < 3; ++cb) {
        float *lut = cpu->lut + (size_t)cb * 65536;
        for (mm_u32 s = 0; s < 65536u; ++s) lut[s] = mm_codebook_value(s, cb);
        cpu->env.lut[cb] = lut;
    }
    mm_fill_group_tables(&cpu->tables);
    cpu->env.tables = &cpu->tables;

    int threads = mm_online_cpus();
    const char *cap = getenv("METAL_MOE_NUM_THREADS");
    if (options->num_threads > 0) {
        threads = options->num_threads;
    } else if (cap && *cap) {
        char *end = NULL;
        long n = strtol(cap, &end, 10);
        if (*end != '\0' || n < 1) {
            mm_cpu_destroy(ctx);
            return mm_fail(MM_ERR_INVALID_VALUE, "METAL_MOE_NUM_THREADS: '%s' is not a positive integer", cap);
        }
        if (n < threads) threads = (int)n;
    }
    cpu->workspace_cap = (size_t)MM_WORKSPACE_MB << 20;
    const char *cap_mb = getenv("METAL_MOE_CPU_WORKSPACE_MB");
    if (cap_mb && *cap_mb) {
        char *end = NULL;
        long mb = strtol(cap_mb, &end, 10);
        if (*end != '\0' || mb < 1) {
            mm_cpu_destroy(ctx);
            return mm_fail(MM_ERR_INVALID_VALUE, "METAL_MOE_CPU_WORKSPACE_MB: '%s' is not a positive integer", cap_mb);
        }
        cpu->workspace_cap = (size_t)mb << 20;
    }
    const char *isa = options->cpu_isa ? options->cpu_isa : getenv("METAL_MOE_CPU_ISA");
    cpu->kernels = &mm_cpu_kernels_scalar;
    if (isa && *isa && strcmp(isa, "scalar") != 0 && strcmp(isa, "auto") != 0) {
        mm_cpu_destroy(ctx);
        return mm_fail(MM_ERR_INVALID_VALUE, "%s: '%s' is not one of auto, scalar",
                       options->cpu_isa ? "cpu_isa" : "METAL_MOE_CPU_ISA", isa);
    }
#if defined(MM_HAVE_AVX2)
    if (!(isa && strcmp(isa, "scalar") == 0) && mm_cpu_has_avx2()) cpu->kernels = &mm_cpu_kernels_avx2;
#endif
    cpu->pool = mm_pool_create(threads);
    if (!cpu->pool) {
        mm_cpu_destroy(ctx);
        return mm_fail(MM_ERR_BACKEND, "context: cannot start %d worker threads", threads);
    }
    return MM_OK;
}
