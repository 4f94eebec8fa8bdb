/*
 * mm_exl3.h — the EXL3 trellis format for every backend (C11, CUDA, Metal Shading Language).
 *
 * ONE definition of the format (docs/FORMAT.md): constants, the tensor-core position
 * permutation, bit-stream windows (16-bit states), the three codebooks, fp16 conversion and the
 * 128-point Hadamard.  Every kernel includes this header; no backend carries its own copy of
 * the decode logic.
 *
 * Language subset: plain C expressions on 32-bit unsigned integers and floats, no library calls
 * except one exp(), no type punning except through MM_F2U / MM_U2F below.  Pointers carry the
 * address-space qualifier MM_ADDR (empty in C and CUDA; a Metal includer defines it, e.g.
 * `#define MM_ADDR thread` before including).
 *
 * Conventions: bits per weight are passed as `kx2` = 2*K (2..16; odd values are the half-integer
 * rates 1.5/2.5/3.5, valid only with MUL1).  A tile's words are read as little-endian 32-bit
 * words u[q] = w16[2q] | w16[2q+1] << 16, i.e. the int16 trellis array reinterpreted as uint32.
 */
#ifndef MM_EXL3_H
#define MM_EXL3_H

#if defined(__METAL_VERSION__)
  #define MM_FN static inline
  typedef uint mm_u32;
  typedef int mm_i32;
  #define MM_F2U(f) as_type<uint>(f)
  #define MM_U2F(u) as_type<float>(u)
  #define MM_EXPF(x) metal::exp(x)
#elif defined(__CUDACC__)
  #define MM_FN static __host__ __device__ __forceinline__
  typedef unsigned int mm_u32;
  typedef int mm_i32;
  #if defined(__CUDA_ARCH__)
    #define MM_F2U(f) __float_as_uint(f)
    #define MM_U2F(u) __uint_as_float(u)
  #else
    #define MM_F2U(f) mm_host_f2u(f)
    #define MM_U2F(u) mm_host_u2f(u)
  #endif
  #define MM_EXPF(x) expf(x)
#else
  #include <stdint.h>
  #include <math.h>
  #define MM_FN static inline
  typedef uint32_t mm_u32;
  typedef int32_t mm_i32;
  #define MM_F2U(f) mm_host_f2u(f)
  #define MM_U2F(u) mm_host_u2f(u)
  #define MM_EXPF(x) expf(x)
#endif

#ifndef MM_ADDR
  #define MM_ADDR
#endif

#if !defined(__METAL_VERSION__) && !defined(__CUDA_ARCH__)
/* Bit casts for host code: a union is the defined way in C (and what every C++ compiler we
 * target accepts for host code). */
MM_FN mm_u32 mm_host_f2u(float f) { union { float f; mm_u32 u; } v; v.f = f; return v.u; }
MM_FN float mm_host_u2f(mm_u32 u) { union { float f; mm_u32 u; } v; v.u = u; return v.f; }
#endif

/* ---- format constants --------------------------------------------------------------------- */
#define MM_TILE 16                    /* a tile is 16x16 weights */
#define MM_POSITIONS 256              /* positions per tile */
#define MM_HAD 128                    /* Hadamard block, both sides */
#define MM_KX2_MIN 2                  /* K = 1 */
#define MM_KX2_MAX 16                 /* K = 8 */
#define MM_INV_SQRT_HAD 0.08838834764831845f

#define MM_CB_3INST 0
#define MM_CB_MCG 1
#define MM_CB_MUL1 2

#define MM_3INST_MUL 89226354u
#define MM_3INST_ADD 64248484u
#define MM_MCG_MUL 0xCBAC1FEDu
#define MM_MUL1_MUL 0x83DCD12Du
#define MM_HALF_MASK 0x8FFF8FFFu
#define MM_HALF_XOR 0x3B603B60u
#define MM_MUL1_A 0.00676727294921875f   /* half 0x1EEE */
#define MM_MUL1_B (-10.3828125f)         /* half 0xC931 */

/* Is kx2 (= 2K) a valid rate for this codebook?  Integers 1..8 everywhere; 1.5/2.5/3.5 MUL1 only. */
MM_FN int mm_kx2_valid(int kx2, int codebook)
{
    if (codebook < MM_CB_3INST || codebook > MM_CB_MUL1) return 0;
    if (kx2 < MM_KX2_MIN || kx2 > MM_KX2_MAX) return 0;
    if (kx2 & 1) return codebook == MM_CB_MUL1 && kx2 <= 7;
    return 1;
}

/* 32-bit words per tile: 16*K int16 words = 8*K = 4*kx2 uint32 words. */
MM_FN int mm_tile_dwords(int kx2) { return 4 * kx2; }

/* ---- positions ------------------------------------------------------------------------------ */
/* Tile row (input dim) and column (output dim) of position p (FORMAT.md 2.2). */
MM_FN int mm_tile_row(int p)
{
    int t = p >> 3, j = p & 7;
    return 2 * (t & 3) + (j & 1) + 8 * ((j >> 1) & 1);
}
MM_FN int mm_tile_col(int p)
{
    int t = p >> 3, j = p & 7;
    return (t >> 2) + 8 * (j >> 2);
}

/* Exclusive end, in stream bits, of position p's own bits (FORMAT.md 2.4, 2.5). */
MM_FN int mm_position_end(int p, int kx2)
{
    int ka = kx2 >> 1;
    return (kx2 & 1) ? ka * (p + 1) + ((p + 1) >> 1) : ka * (p + 1);
}

/* The 16-bit state whose window ends (exclusively) at stream bit `end` of a tile whose stream is
 * `u[0..ndwords)`: bits [end-16, end) modulo the ring, first bit = MSB.  Tail-biting: windows of
 * the first positions wrap to the end of the same tile. */
MM_FN mm_u32 mm_state(const MM_ADDR mm_u32 *u, int ndwords, int end)
{
    int ring = 32 * ndwords;
    int start = end - 16;
    if (start < 0) start += ring;
    int q = start >> 5, off = start & 31;
    int q1 = q + 1 == ndwords ? 0 : q + 1;
    mm_u32 hi = u[q] << off;
    mm_u32 lo = off ? u[q1] >> (32 - off) : 0u;
    return (hi | lo) >> 16;
}

/* ---- fp16 ----------------------------------------------------------------------------------- */
MM_FN float mm_half_to_float(mm_u32 h)
{
    mm_u32 sign = (h & 0x8000u) << 16;
    mm_u32 exp = (h >> 10) & 0x1Fu;
    mm_u32 man = h & 0x3FFu;
    if (exp == 0x1Fu) return MM_U2F(sign | 0x7F800000u | (man << 13));          /* inf / nan */
    if (exp != 0u) return MM_U2F(sign | ((exp + 112u) << 23) | (man << 13));     /* normal */
    /* zero / subnormal: man * 2^-24, exact in float */
    float v = (float)man * 5.9604644775390625e-8f;
    return (sign != 0u) ? -v : v;
}

/* float -> fp16 bits, round to nearest even; overflow -> inf; NaN stays NaN. */
MM_FN mm_u32 mm_float_to_half(float f)
{
    mm_u32 x = MM_F2U(f);
    mm_u32 sign = (x >> 16) & 0x8000u;
    mm_u32 ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u);
    if (ax >= 0x477FF000u) return sign | 0x7C00u;          /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {                                 /* below 2^-14: subnormal or zero */
        if (ax < 0x33000000u) return sign;                  /* < 2^-25: rounds to zero */
        mm_u32 e = ax >> 23;                                 /* 102..112 */
        mm_u32 man = (ax & 0x7FFFFFu) | 0x800000u;
        mm_u32 shift = 126u - e;                             /* 14..24 */
        mm_u32 hb = man >> shift;                            /* (`half` is a type in Metal) */
        mm_u32 rest = man & ((1u << shift) - 1u);
        mm_u32 mid = 1u << (shift - 1u);
        if (rest > mid || (rest == mid && (hb & 1u))) hb += 1u;
        return sign | hb;
    }
    mm_u32 r = ax - 0x38000000u;                             /* rebias exponent 127 -> 15 */
    mm_u32 hb = r >> 13;
    mm_u32 rest = r & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (hb & 1u))) hb += 1u;
    return sign | hb;
}

/* Round a float to the nearest fp16 value, returned as float. */
MM_FN float mm_round_half(float f) { return mm_half_to_float(mm_float_to_half(f)); }

/* ---- codebooks (FORMAT.md 3) ------------------------------------------------------------------ */
/* 3INST / MCG: the 32-bit word holding two fp16 halves whose sum is the value. */
MM_FN mm_u32 mm_two_halves(mm_u32 state, int codebook)
{
    mm_u32 x = codebook == MM_CB_MCG ? state * MM_MCG_MUL : state * MM_3INST_MUL + MM_3INST_ADD;
    return (x & MM_HALF_MASK) ^ MM_HALF_XOR;
}

/* MUL1: the byte sum s (0..1020) of state * MUL; value = fp16((1024 + s) * A + B). */
MM_FN mm_u32 mm_mul1_bytesum(mm_u32 state)
{
    mm_u32 x = state * MM_MUL1_MUL;
    mm_u32 pairs = (x & 0x00FF00FFu) + ((x >> 8) & 0x00FF00FFu);
    return (pairs & 0xFFFFu) + (pairs >> 16);
}

/* The decoded fp16 value of a 16-bit state, as a float (exactly representable).  The sums below
 * are exact in float (3INST/MCG halves lie in [0.125, 2) in magnitude; MUL1's h*A + B needs 22
 * significant bits), so rounding to fp16 once gives the bit-exact EXL3 value. */
MM_FN float mm_codebook_value(mm_u32 state, int codebook)
{
    if (codebook == MM_CB_MUL1) {
        float h = 1024.0f + (float)mm_mul1_bytesum(state);
        return mm_round_half(h * MM_MUL1_A + MM_MUL1_B);
    }
    mm_u32 x = mm_two_halves(state, codebook);
    return mm_round_half(mm_half_to_float(x & 0xFFFFu) + mm_half_to_float(x >> 16));
}

/* ---- Hadamard and activation ------------------------------------------------------------------ */
/* In place: v[0..128) <- v @ H/sqrt(128), the natural-order Sylvester matrix (symmetric). */
MM_FN void mm_hadamard128(MM_ADDR float *v)
{
    for (int h = 1; h < MM_HAD; h <<= 1) {
        for (int i = 0; i < MM_HAD; i += 2 * h) {
            for (int j = i; j < i + h; ++j) {
                float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
    }
    for (int i = 0; i < MM_HAD; ++i) v[i] *= MM_INV_SQRT_HAD;
}

MM_FN float mm_silu(float g) { return g / (1.0f + MM_EXPF(-g)); }

#endif /* MM_EXL3_H */
