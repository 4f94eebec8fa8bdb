/*
 * CPU kernels: the interface between the CPU backend's driver (cpu_backend.c) and the kernel
 * template (gemm_template.h), which is compiled twice: once portable (cpu_scalar.c) and once for
 * AVX2+FMA+F16C (cpu_avx2.c).  The driver picks one set at context creation.
 *
 * Vocabulary
 *   group   8 consecutive positions 8G..8G+7 of a tile (G = 0..31); decoded as one 8-lane vector
 *   lane order  a group's lanes hold positions 8G + {0,1,4,5,2,3,6,7}: in tile coordinates the rows
 *           {2a, 2a+1, 2a, 2a+1, 2a+8, 2a+9, 2a+8, 2a+9} (a = G mod 4) of the columns
 *           {c, c, c+8, c+8, c, c, c+8, c+8} (c = G div 4).  Every kernel uses it (a group's
 *           lanes then hold two rows of two columns: see gemm_template.h).
 *   group input  the layout of a rotated input vector that matches lane order: for each 16-row
 *           k-tile i and a = 0..3, the 8 values x[16i + row(a, lane)] (2*k floats per token).
 */
#ifndef MM_CPU_KERNELS_H
#define MM_CPU_KERNELS_H

#include <stdint.h>

#include "mm_exl3.h"

#define MM_GROUPS 32            /* groups per tile */
#define MM_LANES 8
#define MM_HEAD 9               /* a tile's last word followed by its first 8 (the tail-biting wrap) */
#define MM_MICRO_TOKENS 32      /* tokens per decoded panel in the simd (micro-kernel) variant */

/* Where the 16-bit states of one group come from, for one rate.  Groups whose windows wrap
 * around the ring (only groups 0 and 1 can) read from the tile's head (its last word, then its
 * first 8); the others from the tile itself, never past its end.
 *   word form (portable kernels): lane l's window is (word base+idx[l] << sh[l]) |
 *     (word base+idx[l]+1 >> (32 - sh[l])), its state the top 16 bits; the next word is read
 *     only when sh > 16, the only case in which its bits reach the state.
 *   byte-shuffle form (AVX2): all 8 lanes come from one 16-byte load at byte offset offset[G]
 *     (broadcast to both 128-bit halves); a byte shuffle puts the 3 stream bytes holding a lane's
 *     window into lane bytes 3, 2, 1; state = (lane << shl) >> 16 (logical shifts). */
typedef struct mm_group_table {
    int32_t wrap[MM_GROUPS];        /* 1: read from the head */
    int32_t base[MM_GROUPS];
    int32_t idx[MM_GROUPS][MM_LANES];
    int32_t sh[MM_GROUPS][MM_LANES];
    int32_t offset[MM_GROUPS];
    uint8_t shuffle[MM_GROUPS][32];
    int32_t shl[MM_GROUPS][MM_LANES];
} mm_group_table;

/* Tables for every rate kx2 = 0..16 (0, 1 unused), lanes in lane order (see above). */
typedef struct mm_decode_tables {
    mm_group_table lanes[MM_KX2_MAX + 1];
} mm_decode_tables;

/* Read-only state shared by all kernels of a context. */
typedef struct mm_kernel_env {
    const mm_decode_tables *tables;
    const float *lut[3];            /* codebook value of every 16-bit state (portable kernels) */
} mm_kernel_env;

/* One work item: columns [16*j0, 16*(j0+nj)) of `ntok` tokens' products with one expert's W_q. */
typedef struct mm_gemm_job {
    const mm_u32 *tiles;            /* the expert's trellis as 32-bit words */
    int k_tiles, n_tiles;           /* in/16, out/16 */
    int kx2, codebook;
    int j0, nj;
    int ntok;                       /* 1..tokens_per_tile of the kernel */
    const float *const *in;         /* per token: the rotated input (group layout, or plain for micro) */
    float *const *out;              /* per token: the output row [out] */
    int round_out;                  /* 1: round results to fp16 */
} mm_gemm_job;

typedef void (*mm_gemm_fn)(const mm_kernel_env *env, const mm_gemm_job *job);

/* The kernels of one instruction set, each a specialisation of gemm_template.h. */
typedef struct mm_cpu_kernels {
    const char *isa;
    /* group-layout kernels: [tokens per tile][fp32 accumulate] with run-time rate */
    mm_gemm_fn group_t1_f32, group_t4_f16, group_t4_f32, group_t16_f16, group_t16_f32, group_t32_f16;
    /* tokens = 1, fp32, compile-time rate kx2 = 4, 6, 8, 12 (the specialised decode triples) */
    mm_gemm_fn group_t1_f32_k4, group_t1_f32_k6, group_t1_f32_k8, group_t1_f32_k12;
    /* the register-blocked micro-kernel (plain input layout) */
    mm_gemm_fn micro;
    /* v[0..n) <- each rounded to the nearest fp16 value */
    void (*round_half)(float *v, int n);
    /* per codebook, the factor the kernels' inputs carry (after their fp16 rounding): the inverse of
     * the decoder's scale of the weights (a power of two, so products are unchanged; fp16-rounded
     * inputs times 2^112 stay below FLT_MAX) */
    float input_scale[3];
    /* decode one [in, out] weight to fp16 W_q (tests) */
    void (*decode)(const mm_kernel_env *env, const mm_u32 *tiles, int k_tiles, int n_tiles, int kx2, int codebook,
                   uint16_t *out);
} mm_cpu_kernels;

extern const mm_cpu_kernels mm_cpu_kernels_scalar;
#if defined(MM_HAVE_AVX2)
extern const mm_cpu_kernels mm_cpu_kernels_avx2;
#endif

/* The group tables' entries as arithmetic, so that a compile-time rate folds them to constants
 * (mm_fill_group_tables uses the same functions).  start = first window bit counted from the head
 * (the tile's last word); only groups 0 and 1 can wrap (a window starts before bit 0 only for
 * positions p < 15). */
static inline int mm_group_start(int G, int pos, int kx2) { return mm_position_end(8 * G + pos, kx2) + 16; }
static inline int mm_group_wraps(int G, int kx2) { return G < 2 && (mm_group_start(G, 0, kx2) >> 5) == 0; }
static inline int mm_group_base(int G, int kx2)
{
    if (mm_group_wraps(G, kx2)) return 0;
    const int first = (mm_group_start(G, 0, kx2) >> 5) - 1, last = mm_tile_dwords(kx2) - 8;
    return first < last ? first : last;
}
static inline int mm_group_idx(int G, int pos, int kx2)
{
    return (mm_group_start(G, pos, kx2) >> 5) - (mm_group_wraps(G, kx2) ? 0 : 1) - mm_group_base(G, kx2);
}
static inline int mm_group_sh(int G, int pos, int kx2) { return mm_group_start(G, pos, kx2) & 31; }

/* Byte view of the stream: stream byte m (MSB-first order) is memory byte 4*(m/4) + 3 - m%4 of the
 * little-endian 32-bit words.  Offsets count from the head (the tile's last word first) for groups
 * that wrap, else from the tile's first byte. */
static inline int mm_stream_byte_in_memory(int m) { return 4 * (m >> 2) + 3 - (m & 3); }
static inline int mm_lane_window_bit(int G, int pos, int kx2)
{
    return mm_group_start(G, pos, kx2) - (mm_group_wraps(G, kx2) ? 0 : 32);
}
/* The group's 16-byte load: from the word holding its first window, clamped to the tile (or head). */
static inline int mm_group_offset(int G, int kx2)
{
    const int offset = 4 * ((mm_lane_window_bit(G, 0, kx2) >> 3) >> 2);
    const int limit = (mm_group_wraps(G, kx2) ? 4 * 9 : 4 * mm_tile_dwords(kx2)) - 16;
    return offset < limit ? offset : limit;
}

/* Lane order: position offset within the group, tile row offset (add 2a) and column offset (add c). */
static const int mm_lane_pos[MM_LANES] = {0, 1, 4, 5, 2, 3, 6, 7};
static const int mm_lane_row[MM_LANES] = {0, 1, 0, 1, 8, 9, 8, 9};
static const int mm_lane_col[MM_LANES] = {0, 0, 8, 8, 0, 0, 8, 8};

#endif
