/* The AVX2 + FMA + F16C CPU kernels: gemm_template.h over __m256.  Compiled with -mavx2 -mfma
 * -mf16c and called only after a run-time check of the processor (cpu_backend.c).
 *
 * Decoding one group of 8 weights (states taken in lane order): one 16-byte load broadcast to both
 * halves, one byte shuffle and one variable shift give the 8 states; 3INST/MCG: one multiply(-add),
 * each fp16 half put into fp32 bits by integer operations (scaled by 2^-112, no conversion
 * instruction), one add and the single fp16 rounding; MUL1: multiply, byte sum, one FMA, rounding.
 * 3INST/MCG weights come out times 2^-112 (MM_DECODE_SCALE), which the kernels' inputs undo (never
 * subnormal: their values are 0 or >= 2^-13); MUL1's (down to 2^-18) are left unscaled. */
#include <immintrin.h>

#include "cpu_kernels.h"

typedef __m256 mmv;

static inline mmv mmv_zero(void) { return _mm256_setzero_ps(); }
static inline mmv mmv_load(const float *p) { return _mm256_loadu_ps(p); }
static inline mmv mmv_broadcast(float f) { return _mm256_set1_ps(f); }
static inline mmv mmv_fma(mmv a, mmv b, mmv c) { return _mm256_fmadd_ps(a, b, c); }
static inline mmv mmv_add(mmv a, mmv b) { return _mm256_add_ps(a, b); }
static inline mmv mmv_round16(mmv a) { return _mm256_cvtph_ps(_mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT)); }
static inline void mmv_store(float *p, mmv a) { _mm256_storeu_ps(p, a); }

/* Round decoded codebook values (|v| < 4; 0 or >= 2^-13 for 3INST/MCG, multiples of 2^-18 for
 * MUL1, so never an fp16 overflow and exact below the fp16 normal range) to fp16 precision in
 * fp32: adding c = 1.5 * 2^(e+13) (e = v's exponent) puts fp16's last place at fp32's, so the
 * fp32 addition rounds to nearest-even exactly as fp16 would; subtracting c is exact.  Four
 * single-uop operations instead of two two-uop conversions.  Relative to v's exponent, so the same
 * on 3INST/MCG values scaled by 2^-112 (then between 2^-125 and 2^-110: still normal fp32). */
static inline mmv mm_round_decoded(mmv v)
{
    const __m256 c = _mm256_castsi256_ps(_mm256_add_epi32(
        _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7F800000)), _mm256_set1_epi32(0x06C00000)));
    return _mm256_sub_ps(_mm256_add_ps(v, c), c);
}

static inline mmv mm_decode_group(const mm_u32 *tile, const mm_u32 *head, const mm_decode_tables *tables, int KX2,
                                  int kx2, int G, int CB, const mm_kernel_env *env)
{
    (void)env;
    const mm_group_table *tab = &tables->lanes[kx2];
    const int wraps = KX2 ? mm_group_wraps(G, KX2) : G < 2 && tab->wrap[G];
    const unsigned char *src = (const unsigned char *)(wraps ? head : tile);
    const int offset = KX2 ? mm_group_offset(G, KX2) : tab->offset[G];   /* compile-time rate: a constant */
    /* one 16-byte load into both halves (a load, no shuffle), one byte shuffle, one variable shift */
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(src + offset)));
    const __m256i lanes = _mm256_shuffle_epi8(bytes, _mm256_loadu_si256((const __m256i *)tab->shuffle[G]));
    const __m256i state = _mm256_srli_epi32(_mm256_sllv_epi32(lanes, _mm256_loadu_si256((const __m256i *)tab->shl[G])), 16);
    __m256 value;
    if (CB == MM_CB_MUL1) {
        const __m256i x = _mm256_mullo_epi32(state, _mm256_set1_epi32((int)MM_MUL1_MUL));
        const __m256i byte_mask = _mm256_set1_epi32(0x00FF00FF);
        const __m256i pairs = _mm256_add_epi32(_mm256_and_si256(x, byte_mask),
                                               _mm256_and_si256(_mm256_srli_epi32(x, 8), byte_mask));
        const __m256i s = _mm256_add_epi32(_mm256_and_si256(pairs, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(pairs, 16));
        const __m256 h = _mm256_cvtepi32_ps(_mm256_add_epi32(s, _mm256_set1_epi32(1024)));
        value = _mm256_fmadd_ps(h, _mm256_set1_ps(MM_MUL1_A), _mm256_set1_ps(MM_MUL1_B));
    } else {
        __m256i x = CB == MM_CB_MCG
                        ? _mm256_mullo_epi32(state, _mm256_set1_epi32((int)MM_MCG_MUL))
                        : _mm256_add_epi32(_mm256_mullo_epi32(state, _mm256_set1_epi32((int)MM_3INST_MUL)),
                                           _mm256_set1_epi32((int)MM_3INST_ADD));
        /* Each fp16 half straight into fp32 bits, scaled by 2^-112: an arithmetic shift by 3 puts a half's
         * exponent and mantissa (bits 30..16) at fp32's 27..13 and its sign on 31..28; the mask keeps the
         * sign and those 15 bits.  Shifts and bitwise operations commute, so the codebook's own mask and
         * xor are folded into that mask (halves' exponents are 12..15 after the xor: never subnormal).
         * The sum of the two halves is exact in fp32, as after the conversions; lanes stay in place, so
         * states are taken in lane order. */
        const __m256i keep = _mm256_set1_epi32((int)0x8FFFE000u);
        const __m256i mask = _mm256_and_si256(_mm256_set1_epi32((int)((MM_HALF_MASK >> 3) | 0xE0000000u)), keep);
        const __m256i flip = _mm256_and_si256(_mm256_set1_epi32((int)(MM_HALF_XOR >> 3)), keep);
        const __m256i hi = _mm256_xor_si256(_mm256_and_si256(_mm256_srai_epi32(x, 3), mask), flip);
        /* the low half sign-extended times 2^13 (one multiply-add of 16-bit pairs) = the same shift of it */
        const __m256i lo = _mm256_xor_si256(_mm256_and_si256(_mm256_madd_epi16(x, _mm256_set1_epi32(1 << 13)), mask), flip);
        value = _mm256_add_ps(_mm256_castsi256_ps(hi), _mm256_castsi256_ps(lo));
    }
    return mm_round_decoded(value);
}

#define MM_ISA_NAME "avx2+fma+f16c"
#define MM_DECODE_SCALE(CB) ((CB) == MM_CB_MUL1 ? 1.0f : 0x1p-112f)   /* see mm_decode_group */
#define MM_KERNELS_NAME mm_cpu_kernels_avx2
#include "gemm_template.h"
