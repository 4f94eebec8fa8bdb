/* The portable CPU kernels: gemm_template.h over an 8-lane vector of plain floats.  Weight values
 * come from the context's codebook tables (built with mm_codebook_value from the shared header),
 * states from the same group tables the AVX2 kernels use. */
#include "cpu_kernels.h"

typedef struct mmv {
    float v[MM_LANES];
} mmv;

#define MMV_MAP(expr)                                  \
    mmv r;                                             \
    for (int l = 0; l < MM_LANES; ++l) r.v[l] = (expr); \
    return r

static inline mmv mmv_zero(void) { MMV_MAP(0.0f); }
static inline mmv mmv_load(const float *p) { MMV_MAP(p[l]); }
static inline mmv mmv_broadcast(float f) { MMV_MAP(f); }
static inline mmv mmv_fma(mmv a, mmv b, mmv c) { MMV_MAP(a.v[l] * b.v[l] + c.v[l]); }
static inline mmv mmv_add(mmv a, mmv b) { MMV_MAP(a.v[l] + b.v[l]); }
static inline mmv mmv_round16(mmv a) { MMV_MAP(mm_round_half(a.v[l])); }
static inline void mmv_store(float *p, mmv a)
{
    for (int l = 0; l < MM_LANES; ++l) p[l] = a.v[l];
}

static inline mmv mm_decode_group(const mm_u32 *tile, const mm_u32 *head, const mm_decode_tables *tables, int KX2,
                                  int kx2, int G, int CB, const mm_kernel_env *env)
{
    (void)KX2;
    const mm_group_table *tab = &tables->lanes[kx2];
    const float *lut = env->lut[CB];
    const mm_u32 *words = (G < 2 && tab->wrap[G] ? head : tile) + tab->base[G];
    mmv w;
    for (int l = 0; l < MM_LANES; ++l) {
        const int q = tab->idx[G][l], sh = tab->sh[G][l];
        /* the next word's bits survive the final shift only when the window crosses into it (sh > 16);
         * otherwise it is not read at all (it may lie past the end of the trellis) */
        const mm_u32 state = ((words[q] << sh) | (sh > 16 ? words[q + 1] >> (32 - sh) : 0u)) >> 16;
        w.v[l] = lut[state];
    }
    return w;
}

#define MM_ISA_NAME "scalar"
#define MM_DECODE_SCALE(CB) 1.0f
#define MM_KERNELS_NAME mm_cpu_kernels_scalar
#include "gemm_template.h"
