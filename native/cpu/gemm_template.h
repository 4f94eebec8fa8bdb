/*
 * gemm_template.h — the ONE template of the CPU kernel families, compiled once per instruction
 * set.  The includer defines the vector primitives below and MM_KERNELS_NAME; this file defines
 * every specialisation and the mm_cpu_kernels table that lists them.
 *
 * Required from the includer
 *   mmv                             an 8-lane float vector
 *   mmv_zero(), mmv_load(p), mmv_broadcast(f), mmv_fma(a, b, c) = a*b + c, mmv_add(a, b)
 *   mmv_round16(v)                  each lane rounded to the nearest fp16 value
 *   mmv_store(p, v)
 *   mm_decode_group(tile, head, tables, KX2, kx2, G, CB, env)   the 8 decoded weights of group G, in
 *                                   lane order (KX2: the compile-time rate or 0; kx2: the rate), each
 *                                   times MM_DECODE_SCALE(CB)
 *   MM_DECODE_SCALE(CB)             a power of two per codebook; the kernels' inputs come multiplied by its
 *                                   inverse (mm_cpu_kernels.input_scale), so every product is the unscaled one
 *   MM_ISA_NAME                     a string for mm_context_simd()
 *
 * Families
 *   group kernels (decode, prefill4, general, large_batch): the weights of one tile are decoded
 *     group by group in registers, and each decoded group vector is multiplied with the matching
 *     group-layout inputs of T tokens (T = tokens per tile): for T = 1 straight into the FMA,
 *     for T > 1 after decoding the whole tile once, in a register-blocked 4-token x 2-column
 *     loop.  Partial sums stay in lane order (4 lanes per output column, each summing a quarter
 *     of the rows) until the end of the k loop, where the 4 are added.  fp32 accumulation keeps them in fp32; fp16 accumulation forms
 *     each lane's share of a 16-row k-slice in fp32 and keeps the running sums as fp16 values
 *     (rounded after every k-slice), as the fragments of an fp16-accumulating MMA would.
 *   micro kernel (simd): each 16x16 tile is decoded and scattered into a row-major panel of 16
 *     rows x 64 columns, and a register-blocked 4-token x 16-column micro-kernel runs over it
 *     with broadcast inputs; fp32 accumulation.
 */
#include <string.h>

#include "cpu_kernels.h"

#define MM_INLINE static inline __attribute__((always_inline))
#define MM_MAX_T 32
#define MM_PREFETCH_TILES 6     /* tiles along k fetched ahead: consecutive k-tiles are a row of tiles apart,
                                   farther than the hardware prefetcher follows */

/* Ask for the (up to 2) cache lines of a tile that will be needed soon. */
MM_INLINE void mm_prefetch_tile(const mm_u32 *tile, int nd)
{
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(tile, 0, 0);
    if (nd > 16) __builtin_prefetch(tile + 16, 0, 0);
#else
    (void)tile;
    (void)nd;
#endif
}

/* The tile's head: its last word, then its first 8, for the groups whose windows wrap around. */
MM_INLINE void mm_build_head(const mm_u32 *tile, int nd, mm_u32 *head)
{
    head[0] = tile[nd - 1];
    memcpy(head + 1, tile, 8 * sizeof *tile);
}

/* Sum of lanes {0,1,4,5} (column c) and {2,3,6,7} (column c+8) of a lane-order vector. */
MM_INLINE void mm_reduce_columns(mmv v, float *col_c, float *col_c8)
{
    float lanes[MM_LANES];
    mmv_store(lanes, v);
    *col_c = (lanes[0] + lanes[1]) + (lanes[4] + lanes[5]);
    *col_c8 = (lanes[2] + lanes[3]) + (lanes[6] + lanes[7]);
}

/* acc and part are [T][8] arrays of the caller's, sized exactly, so that small ones live in registers. */
MM_INLINE void mm_group_kernel_body(const mm_kernel_env *env, const mm_gemm_job *job, const int T, const int F32ACC,
                                    const int KX2, const int CB, mmv (*acc)[8], mmv (*part)[8])
{
    const int kx2 = KX2 ? KX2 : job->kx2;
    const int nd = mm_tile_dwords(kx2);
    /* tokens run in blocks of 4; a last partial block repeats token 0 (its results are dropped) */
    const int tokens = T == 1 ? 1 : (job->ntok + 3) & ~3;
    const float *in[MM_MAX_T];
    for (int t = 0; t < tokens; ++t) in[t] = job->in[t < job->ntok ? t : 0];
    mm_u32 head[MM_HEAD];
    for (int jj = 0; jj < job->nj; ++jj) {
        const int j = job->j0 + jj;
        for (int t = 0; t < tokens; ++t)
            for (int c = 0; c < 8; ++c) acc[t][c] = mmv_zero();
        for (int i = 0; i < job->k_tiles; ++i) {
            const mm_u32 *tile = job->tiles + ((size_t)i * job->n_tiles + j) * nd;
            if (i + MM_PREFETCH_TILES < job->k_tiles)
                mm_prefetch_tile(tile + (size_t)MM_PREFETCH_TILES * job->n_tiles * nd, nd);
            mm_build_head(tile, nd, head);
            if (!F32ACC)
                for (int t = 0; t < tokens; ++t)
                    for (int c = 0; c < 8; ++c) part[t][c] = mmv_zero();
            if (T == 1) {
                /* one token: each decoded group goes straight into its FMA */
#pragma GCC unroll 8
                for (int c = 0; c < 8; ++c) {
#pragma GCC unroll 4
                    for (int a = 0; a < 4; ++a) {
                        const mmv w = mm_decode_group(tile, head, env->tables, KX2, kx2, 4 * c + a, CB, env);
                        const mmv x = mmv_load(in[0] + (size_t)(4 * i + a) * MM_LANES);
                        if (F32ACC) acc[0][c] = mmv_fma(x, w, acc[0][c]);
                        else part[0][c] = mmv_fma(x, w, part[0][c]);
                    }
                }
            } else {
                /* several tokens: the tile is decoded once into 32 vectors, then a register-blocked
                 * loop of 4 tokens x 2 column pairs runs over them (8 partial sums in registers,
                 * 6 loads per 8 FMAs) */
                mmv w[MM_GROUPS];
#pragma GCC unroll 32
                for (int G = 0; G < MM_GROUPS; ++G) w[G] = mm_decode_group(tile, head, env->tables, KX2, kx2, G, CB, env);
                for (int tb = 0; tb < tokens; tb += 4) {
                    for (int cb = 0; cb < 8; cb += 2) {
                        mmv r[4][2];
                        for (int t = 0; t < 4; ++t)
                            for (int h = 0; h < 2; ++h) r[t][h] = F32ACC ? acc[tb + t][cb + h] : part[tb + t][cb + h];
#pragma GCC unroll 4
                        for (int a = 0; a < 4; ++a) {
                            const mmv w0 = w[4 * cb + a], w1 = w[4 * cb + 4 + a];
                            for (int t = 0; t < 4; ++t) {
                                const mmv x = mmv_load(in[tb + t] + (size_t)(4 * i + a) * MM_LANES);
                                r[t][0] = mmv_fma(x, w0, r[t][0]);
                                r[t][1] = mmv_fma(x, w1, r[t][1]);
                            }
                        }
                        for (int t = 0; t < 4; ++t)
                            for (int h = 0; h < 2; ++h) {
                                if (F32ACC) acc[tb + t][cb + h] = r[t][h];
                                else part[tb + t][cb + h] = r[t][h];
                            }
                    }
                }
            }
            if (!F32ACC)
                for (int t = 0; t < tokens; ++t)
                    for (int c = 0; c < 8; ++c) acc[t][c] = mmv_round16(mmv_add(acc[t][c], part[t][c]));
        }
        for (int t = 0; t < job->ntok; ++t) {
            float *out = job->out[t] + 16 * j;
            for (int c = 0; c < 8; ++c) mm_reduce_columns(acc[t][c], out + c, out + c + 8);
            if (job->round_out)
                for (int c = 0; c < 16; ++c) out[c] = mm_round_half(out[c]);
        }
    }
}

/* One specialisation per (tokens, accumulation, rate); the codebook becomes a constant by a switch. */
#define MM_GROUP_INSTANCE(fname, T, F32ACC, KX2)                                                 \
    static void fname(const mm_kernel_env *env, const mm_gemm_job *job)                          \
    {                                                                                            \
        mmv acc[T][8], part[F32ACC ? 1 : T][8];                                                  \
        switch (job->codebook) {                                                                 \
        case MM_CB_3INST: mm_group_kernel_body(env, job, T, F32ACC, KX2, 0, acc, part); break;   \
        case MM_CB_MCG: mm_group_kernel_body(env, job, T, F32ACC, KX2, 1, acc, part); break;     \
        default: mm_group_kernel_body(env, job, T, F32ACC, KX2, 2, acc, part); break;            \
        }                                                                                        \
    }

MM_GROUP_INSTANCE(group_t1_f32, 1, 1, 0)
MM_GROUP_INSTANCE(group_t4_f16, 4, 0, 0)
MM_GROUP_INSTANCE(group_t4_f32, 4, 1, 0)
MM_GROUP_INSTANCE(group_t16_f16, 16, 0, 0)
MM_GROUP_INSTANCE(group_t16_f32, 16, 1, 0)
MM_GROUP_INSTANCE(group_t32_f16, 32, 0, 0)
MM_GROUP_INSTANCE(group_t1_f32_k4, 1, 1, 4)
MM_GROUP_INSTANCE(group_t1_f32_k6, 1, 1, 6)
MM_GROUP_INSTANCE(group_t1_f32_k8, 1, 1, 8)
MM_GROUP_INSTANCE(group_t1_f32_k12, 1, 1, 12)

/* Decode a whole tile into `rows` (row-major 16x16 floats, row stride `stride`). */
MM_INLINE void mm_decode_tile_rows(const mm_kernel_env *env, const mm_u32 *tile, int kx2, const int CB, float *rows,
                                   int stride)
{
    mm_u32 head[MM_HEAD];
    float lanes[MM_LANES];
    mm_build_head(tile, mm_tile_dwords(kx2), head);
    for (int G = 0; G < MM_GROUPS; ++G) {
        mmv_store(lanes, mm_decode_group(tile, head, env->tables, 0, kx2, G, CB, env));
        const int r0 = 2 * (G & 3), c0 = G >> 2;
        for (int l = 0; l < MM_LANES; ++l) rows[(r0 + mm_lane_row[l]) * stride + c0 + mm_lane_col[l]] = lanes[l];
    }
}

#define MM_MR 4          /* micro-kernel tokens */
#define MM_PANEL 4       /* tiles (of 16 columns) per panel */

MM_INLINE void mm_micro_kernel_body(const mm_kernel_env *env, const mm_gemm_job *job, const int CB)
{
    const int nd = mm_tile_dwords(job->kx2);
    float panel[16 * 16 * MM_PANEL];
    float acc_rows[MM_MICRO_TOKENS + MM_MR][16 * MM_PANEL];
    const float *in[MM_MICRO_TOKENS + MM_MR];
    const int padded = (job->ntok + MM_MR - 1) / MM_MR * MM_MR;
    for (int t = 0; t < padded; ++t) in[t] = job->in[t < job->ntok ? t : 0];
    for (int jb = 0; jb < job->nj; jb += MM_PANEL) {
        const int tiles = job->nj - jb < MM_PANEL ? job->nj - jb : MM_PANEL;
        const int width = 16 * tiles;
        for (int t = 0; t < padded; ++t) memset(acc_rows[t], 0, sizeof acc_rows[t]);
        for (int i = 0; i < job->k_tiles; ++i) {
            for (int jj = 0; jj < tiles; ++jj)
                mm_decode_tile_rows(env, job->tiles + ((size_t)i * job->n_tiles + job->j0 + jb + jj) * nd, job->kx2,
                                    CB, panel + 16 * jj, width);
            for (int tb = 0; tb < padded; tb += MM_MR) {
                for (int cb = 0; cb < width; cb += 16) {
                    mmv acc[MM_MR][2];
                    for (int t = 0; t < MM_MR; ++t) {
                        acc[t][0] = mmv_load(acc_rows[tb + t] + cb);
                        acc[t][1] = mmv_load(acc_rows[tb + t] + cb + 8);
                    }
#pragma GCC unroll 4
                    for (int r = 0; r < 16; ++r) {
                        const mmv b0 = mmv_load(panel + r * width + cb), b1 = mmv_load(panel + r * width + cb + 8);
                        for (int t = 0; t < MM_MR; ++t) {
                            const mmv x = mmv_broadcast(in[tb + t][16 * i + r]);
                            acc[t][0] = mmv_fma(x, b0, acc[t][0]);
                            acc[t][1] = mmv_fma(x, b1, acc[t][1]);
                        }
                    }
                    for (int t = 0; t < MM_MR; ++t) {
                        mmv_store(acc_rows[tb + t] + cb, acc[t][0]);
                        mmv_store(acc_rows[tb + t] + cb + 8, acc[t][1]);
                    }
                }
            }
        }
        for (int t = 0; t < job->ntok; ++t) {
            float *out = job->out[t] + 16 * (job->j0 + jb);
            for (int c = 0; c < width; ++c) out[c] = job->round_out ? mm_round_half(acc_rows[t][c]) : acc_rows[t][c];
        }
    }
}

static void micro(const mm_kernel_env *env, const mm_gemm_job *job)
{
    switch (job->codebook) {
    case MM_CB_3INST: mm_micro_kernel_body(env, job, 0); break;
    case MM_CB_MCG: mm_micro_kernel_body(env, job, 1); break;
    default: mm_micro_kernel_body(env, job, 2); break;
    }
}

static void decode_weight(const mm_kernel_env *env, const mm_u32 *tiles, int k_tiles, int n_tiles, int kx2,
                          int codebook, uint16_t *out)
{
    float rows[256];
    const int nd = mm_tile_dwords(kx2);
    for (int i = 0; i < k_tiles; ++i)
        for (int j = 0; j < n_tiles; ++j) {
            const mm_u32 *tile = tiles + ((size_t)i * n_tiles + j) * nd;
            switch (codebook) {
            case MM_CB_3INST: mm_decode_tile_rows(env, tile, kx2, 0, rows, 16); break;
            case MM_CB_MCG: mm_decode_tile_rows(env, tile, kx2, 1, rows, 16); break;
            default: mm_decode_tile_rows(env, tile, kx2, 2, rows, 16); break;
            }
            for (int r = 0; r < 16; ++r)
                for (int c = 0; c < 16; ++c)
                    out[(size_t)(16 * i + r) * (16 * n_tiles) + 16 * j + c] =
                        (uint16_t)mm_float_to_half(rows[16 * r + c] / MM_DECODE_SCALE(codebook));
        }
}

static void round_half_array(float *v, int n)
{
    int k = 0;
    for (; k + MM_LANES <= n; k += MM_LANES) mmv_store(v + k, mmv_round16(mmv_load(v + k)));
    for (; k < n; ++k) v[k] = mm_round_half(v[k]);
}

const mm_cpu_kernels MM_KERNELS_NAME = {
    .isa = MM_ISA_NAME,
    .group_t1_f32 = group_t1_f32,
    .group_t4_f16 = group_t4_f16,
    .group_t4_f32 = group_t4_f32,
    .group_t16_f16 = group_t16_f16,
    .group_t16_f32 = group_t16_f32,
    .group_t32_f16 = group_t32_f16,
    .group_t1_f32_k4 = group_t1_f32_k4,
    .group_t1_f32_k6 = group_t1_f32_k6,
    .group_t1_f32_k8 = group_t1_f32_k8,
    .group_t1_f32_k12 = group_t1_f32_k12,
    .micro = micro,
    .round_half = round_half_array,
    .input_scale = {1.0f / MM_DECODE_SCALE(0), 1.0f / MM_DECODE_SCALE(1), 1.0f / MM_DECODE_SCALE(2)},
    .decode = decode_weight,
};
