/*
 * The CUDA kernels: one template family, specialised per variant in native/cuda/cuda_backend.cu.
 *
 * A forward is three launches on the caller's stream:
 *   1. mm_prep       block 0 groups the slots by expert (counting sort in shared memory) and writes
 *                    the tile list (not for direct tiles, below); the other blocks, one or more per
 *                    slot, rotate the slots' inputs for gate and up: fp16(x * suh) -> Hadamard -> fp16.
 *                    (Both only need ids, so they share a launch.)
 *   2. mm_gate_up<>  per (tile of up to T slots of one expert, 128 intermediate columns): the gate and
 *                    up GEMMs with weights decoded in registers and consumed by tensor-core MMAs, then
 *                    the fused epilogue: output Hadamard, * svh, SwiGLU, * suh_down, the down input
 *                    Hadamard; writes the fp16 down input.
 *   3. mm_down<>     per (tile, 128 hidden columns): the down GEMM, output Hadamard, * svh; fp32 rows;
 *                    then the combine of those 128 columns of each token whose last slot this CTA
 *                    delivered (a ticket per token and column block): sum_j p[t,j] * down[slot] in
 *                    slot order, * rsf, + shared expert -- the same sums in the same order whichever
 *                    CTA arrives last.  (Tokens with no valid slot get their NaN row from mm_prep.)
 * Launch 3 needs every intermediate column of a slot (its Hadamard input), so it cannot start
 * before launch 2 ends: three is the fewest for this split.
 * On sm_90 launches 2-3 are programmatic dependent launches: each kernel lets its successor start at
 * once (griddepcontrol.launch_dependents), and the successor does whatever does not read its
 * predecessor's results (its tile, the first weight steps into shared memory) before it waits for
 * them (griddepcontrol.wait, which returns when the predecessor has finished and its writes are
 * visible).  Launch gaps and pipeline fills then overlap the previous kernel's tail.
 * Tiles of one slot (T = 1, the decode variants) need no grouping: CTA x takes slot x ("direct
 * tiles"), so mm_prep only rotates inputs and the GEMM kernels know their expert from ids alone.
 *
 * Decoding (FORMAT.md 2, 3; constants and the window arithmetic from shaders/common/mm_exl3.h): lane
 * l of a warp owns positions 8l..8l+7 of a 16x16 tile, i.e. exactly an m16n8k16 MMA fragment.  It
 * reads the three 32-bit words that hold the 7K+16 stream bits of its eight 16-bit states, extracts
 * them with funnel shifts, and turns pairs of states into packed fp16 pairs: 3INST/MCG with one
 * multiply-add, one LOP3 and one HADD2 (the sum of the two halves, rounded once), MUL1 with one
 * multiply, one DP4A (the byte sum) and one HFMA2 (h * A + B, rounded once).  Bit exact.
 *
 * Two MMA orientations:
 *   weights as A ("swap", few tokens): mma(A = W^T tile (m = 16 output columns, k = 16 inputs),
 *       B = x^T (k = 16 inputs, n = 8 tokens)): tokens pad to 8.
 *   weights as B ("std", many tokens): mma(A = x (m = 16 tokens, k = 16), B = W (k = 16, n = 8
 *       columns)) twice per tile: tokens pad to 16.  The format's native orientation.
 * A variant may have a second, "wide" shape (cuda_backend.cu: 128 slots, std orientation) that the
 * host takes when its experts average more slots than one tile of its own shape holds; on sm_90a
 * the wide shape can be the swap orientation on wgmma instead (METAL_MOE_CUDA_WGMMA=1) (ORIENT_WG: the warpgroup's A = the
 * decoded W^T tiles from registers, B = x^T of 32, 64 or 128 slots read from shared memory by the
 * tensor cores, so no instruction loads an input fragment).  MMA
 * fragments wholly past a tile's slots are skipped (main_loop: quarter / half / all, per step).
 * Inputs are staged per K chunk in shared memory with cp.async (double-buffered); the weight words
 * of each step (U k-tiles per k-group of warps x the CTA's 8 column tiles) too, three steps in flight
 * (main_loop).  When tiles x column blocks would leave SMs idle (small batches), K is split across
 * CTAs (gridDim.z) and the last CTA of each output block adds the partial sums in a fixed order
 * (reduce_splits).  Accumulation: fp32 MMA accumulators, or fp16 ones (the
 * running sum rounded after every 16-row k-slice).  An fp16-accumulating tile whose sums are not
 * finite is re-run in the same launch with fp32 accumulators for the slots that overflowed (per
 * slot, so the result never depends on which slots share a tile), and counted.
 */
#ifndef MM_MOE_KERNELS_CUH
#define MM_MOE_KERNELS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mm_cuda_args.h"
#include "mm_exl3.h"

namespace mm {

/* ORIENT_WG: the swap orientation on sm_90a's warpgroup MMA (wgmma, below) */
enum { ORIENT_SWAP = 0, ORIENT_STD = 1, ORIENT_WG = 2 };
constexpr int COLS = 128;            /* output columns per CTA: one Hadamard block */
constexpr int NWARP_N = COLS / 16;   /* warps across the columns (one 16-column tile each) */
constexpr int EP_STRIDE = COLS + 4;  /* floats per epilogue row */
constexpr int DT_F16 = 0, DT_BF16 = 1, DT_F32 = 2, DT_I32 = 3;   /* mm_dtype values */

/* The compile-time shape of a variant on CUDA. */
template <int ORIENT_, int T_, bool F32_, int WK_, int KC_, int KG_, int KU_, int KD_, int U_ = 4, int S_ = 3>
struct Config {
    static constexpr int ORIENT = ORIENT_;
    static constexpr int T = T_;             /* slots per tile (tokens sharing one decode) */
    static constexpr bool F32 = F32_;        /* fp32 accumulators */
    static constexpr int WK = WK_;           /* warps splitting K (partial sums added in fixed order) */
    static constexpr int KC = KC_;           /* K columns staged per chunk */
    static constexpr int KG = KG_, KU = KU_, KD = KD_;   /* compile-time 2K, 0 = run-time */
    static constexpr int U = U_;             /* k-tiles per warp per step */
    static constexpr int THREADS = 32 * NWARP_N * WK;
    static constexpr bool SWAPPED = ORIENT != ORIENT_STD;          /* weights as the MMA's A operand */
    static constexpr int TP = SWAPPED ? (T + 7) / 8 * 8 : (T + 15) / 16 * 16;
    static_assert(SWAPPED || T % 16 == 0, "std orientation needs whole m16 blocks");
    static_assert(ORIENT != ORIENT_WG || (T == 128 && WK == 1 && F32), "wgmma: 128 slots, one k-group, fp32 sums");
    static_assert(KC % (16 * WK * U) == 0 && COLS % (16 * WK * U) == 0, "chunks hold whole warp steps");
    static constexpr int STEP_TILES = WK * U;   /* k-tiles per CTA step */
    static constexpr int WSTAGES = S_;          /* weight steps in flight in shared memory (2 or 3) */
    static constexpr int STEPS_PER_CHUNK = KC / 16 / STEP_TILES;
    static_assert(STEPS_PER_CHUNK >= WSTAGES - 1, "an input chunk's buffer must be free when its copy is issued");
    /* shared memory: the staged inputs (double-buffered chunks) and WSTAGES steps of weight tiles,
     * aliased by the fp32 epilogue rows; fp16-accumulating variants keep their rows in a
     * half-precision region after all of it, so that the fp32 re-run of overflowed slots leaves the
     * other slots' results in place.  A staged weight tile is its words followed by copies of its
     * first two (the lane windows wrap around the tile), TILE_WORDS apart, sized for 8 bits. */
    static constexpr int TILE_WORDS = 4 * 16 + 4;
    static constexpr int XS = ORIENT == ORIENT_WG ? KC : KC + 8;   /* halves per staged input row */
    static constexpr size_t stage_bytes(int nmat) { return 2ull * nmat * T * XS * 2; }
    static constexpr size_t wstage_bytes(int nmat) { return 4ull * nmat * STEP_TILES * NWARP_N * TILE_WORDS; }
    static constexpr size_t inputs_bytes(int nmat) { return stage_bytes(nmat) + WSTAGES * wstage_bytes(nmat); }
    static constexpr size_t ep32_bytes(int nmat) { return 4ull * WK * nmat * T * EP_STRIDE; }
    static constexpr size_t ep16_offset(int nmat)
    {
        return inputs_bytes(nmat) > ep32_bytes(nmat) ? inputs_bytes(nmat) : ep32_bytes(nmat);
    }
    static constexpr size_t smem_bytes(int nmat) { return ep16_offset(nmat) + (F32 ? 0 : ep32_bytes(nmat) / 2); }
    /* 16-byte weight copies per thread per projection and step, at most (main_loop's copy plan) */
    static constexpr int COPIES = (STEP_TILES * NWARP_N * 16 + THREADS - 1) / THREADS;
    static_assert(STEP_TILES * NWARP_N <= THREADS, "one 8-byte copy per thread and step");
};

/* ---- small helpers -------------------------------------------------------------------------- */
__device__ __forceinline__ float load_act(const void *p, int dtype, int64_t i)
{
    if (dtype == DT_F32) return static_cast<const float *>(p)[i];
    const uint16_t h = static_cast<const uint16_t *>(p)[i];
    if (dtype == DT_BF16) return __uint_as_float(static_cast<uint32_t>(h) << 16);
    return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ void store_act(void *p, int dtype, int64_t i, float v)
{
    if (dtype == DT_F32) static_cast<float *>(p)[i] = v;
    else if (dtype == DT_BF16) static_cast<__nv_bfloat16 *>(p)[i] = __float2bfloat16_rn(v);
    else static_cast<__half *>(p)[i] = __float2half_rn(v);
}

__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half_rn(v)); }

__device__ __forceinline__ float half_bits(uint16_t h) { return __half2float(__ushort_as_half(h)); }

/* v[0..4) are elements 4*lane .. 4*lane+3 of a 128-vector held by the warp: v <- v @ H/sqrt(128).
 * The same butterflies in the same order as mm_hadamard128, so the results are identical. */
__device__ __forceinline__ void warp_hadamard128(float v[4])
{
    const int lane = threadIdx.x & 31;
    float a = v[0], b = v[1], c = v[2], d = v[3];
    v[0] = a + b, v[1] = a - b, v[2] = c + d, v[3] = c - d;                 /* h = 1 */
    a = v[0], b = v[1], c = v[2], d = v[3];
    v[0] = a + c, v[1] = b + d, v[2] = a - c, v[3] = b - d;                 /* h = 2 */
#pragma unroll
    for (int m = 1; m < 32; m <<= 1) {                                       /* h = 4 .. 64 */
        const bool upper = lane & m;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float o = __shfl_xor_sync(0xffffffffu, v[e], m);
            v[e] = upper ? o - v[e] : v[e] + o;
        }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] *= MM_INV_SQRT_HAD;
}

/* The slot of expert-group position `i` of routed slot s: token and expert. */
__device__ __forceinline__ int64_t slot_token(const mm_cuda_args &a, int64_t s)
{
    const int64_t routed = a.tokens * a.top_k;
    return s < routed ? s / a.top_k : s - routed;
}

__device__ __forceinline__ int slot_expert(const mm_cuda_args &a, int64_t s)
{
    const int64_t routed = a.tokens * a.top_k;
    if (s >= routed) return a.experts;                                       /* the shared expert */
    const int64_t e = a.ids_dtype == DT_I32 ? static_cast<const int32_t *>(a.ids)[s]
                                            : static_cast<const int64_t *>(a.ids)[s];
    return e >= 0 && e < a.experts ? static_cast<int>(e) : -1;               /* -1: invalid */
}

/* ---- decoding ------------------------------------------------------------------------------- */
/* Per lane: which words hold its window and where the window starts. */
struct LaneWindow {
    int q0, q1, q2, b;
};

__device__ __forceinline__ LaneWindow lane_window(int kx2, int lane)
{
    const int nd = mm_tile_dwords(kx2), ring = 32 * nd;
    int start = mm_position_end(8 * lane, kx2) - 16;
    if (start < 0) start += ring;
    LaneWindow w;
    w.q0 = start >> 5;
    w.b = start & 31;
    w.q1 = w.q0 + 1 == nd ? 0 : w.q0 + 1;
    w.q2 = w.q1 + 1 == nd ? 0 : w.q1 + 1;
    return w;
}

/* Offset of position 8l+j's window from position 8l's (mm_position_end differences). */
__device__ __forceinline__ int lane_offset(int kx2, int j) { return (kx2 * j + (kx2 & j & 1)) >> 1; }

struct Codebook {
    int cb;
    uint32_t mul, add;
};

__device__ __forceinline__ Codebook codebook(int cb)
{
    Codebook c;
    c.cb = cb;
    c.mul = cb == MM_CB_MCG ? MM_MCG_MUL : cb == MM_CB_MUL1 ? MM_MUL1_MUL : MM_3INST_MUL;
    c.add = cb == MM_CB_3INST ? MM_3INST_ADD : 0u;
    return c;
}

/* (x & MM_HALF_MASK) ^ MM_HALF_XOR as one LOP3 (the compiler splits the C expression in two). */
__device__ __forceinline__ uint32_t half_pattern(uint32_t x)
{
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0x6A;\n" : "=r"(r) : "r"(x), "n"(MM_HALF_MASK), "n"(MM_HALF_XOR));
    return r;
}

/* Eight states -> four packed fp16 pairs {s0,s1}, {s2,s3}, {s4,s5}, {s6,s7}.  LCG: the caller
 * knows the codebook is 3INST or MCG (no branch on it). */
template <bool LCG>
__device__ __forceinline__ void decode_pairs(const uint32_t s[8], const Codebook &c, uint32_t out[4])
{
    if (!LCG && c.cb == MM_CB_MUL1) {
        const __half2 A = __half2half2(__ushort_as_half(0x1EEE)), B = __half2half2(__ushort_as_half(0xC931));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t ha = __dp4a(s[2 * i] * MM_MUL1_MUL, 0x01010101u, 0x6400u);
            const uint32_t hb = __dp4a(s[2 * i + 1] * MM_MUL1_MUL, 0x01010101u, 0x6400u);
            const uint32_t h = __byte_perm(ha, hb, 0x5410);
            const __half2 v = __hfma2(*reinterpret_cast<const __half2 *>(&h), A, B);
            out[i] = *reinterpret_cast<const uint32_t *>(&v);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t xa = half_pattern(s[2 * i] * c.mul + c.add);
            const uint32_t xb = half_pattern(s[2 * i + 1] * c.mul + c.add);
            const uint32_t lo = __byte_perm(xa, xb, 0x5410), hi = __byte_perm(xa, xb, 0x7632);
            const __half2 v = __hadd2(*reinterpret_cast<const __half2 *>(&lo), *reinterpret_cast<const __half2 *>(&hi));
            out[i] = *reinterpret_cast<const uint32_t *>(&v);
        }
    }
}

/* Rates whose eight windows (offsets up to 7K + 1 bits, 16 bits each) lie in the lane's first two
 * aligned words: 2K <= 13. */
constexpr int KX2_TWO_WORDS = 13;

/* The lane's eight fp16 weights of one tile from its three words. KX2 = 0: run-time rate.  FAST:
 * the caller knows kx2 <= KX2_TWO_WORDS and an LCG codebook, so no branch remains per tile. */
template <int KX2, bool FAST>
__device__ __forceinline__ void decode_lane(uint32_t w0, uint32_t w1, uint32_t w2, int b, int kx2, const Codebook &c,
                                            uint32_t out[4])
{
    const uint32_t A0 = __funnelshift_l(w1, w0, b), A1 = __funnelshift_l(w2, w1, b);
    uint32_t s[8];
    const int k = KX2 ? KX2 : kx2;
    if (FAST || (KX2 ? KX2 <= KX2_TWO_WORDS : kx2 <= KX2_TWO_WORDS)) {
        /* every window lies in the 64 bits A0:A1: one 64-bit funnel shift and one shift per state */
        const uint64_t V = (static_cast<uint64_t>(A0) << 32) | A1;
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j] = static_cast<uint32_t>((V << lane_offset(k, j)) >> 48);
    } else {
        const uint32_t A2 = w2 << b;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int d = lane_offset(k, j);
            const uint32_t hi = d < 32 ? A0 : A1, lo = d < 32 ? A1 : A2;
            s[j] = __funnelshift_l(lo, hi, d) >> 16;
        }
    }
    decode_pairs<FAST>(s, c, out);
}

/* ---- MMA ------------------------------------------------------------------------------------ */
/* A lane's decoded pairs {s0s1}, {s2s3}, {s4s5}, {s6s7} as the A fragment of the swap orientation
 * (W^T as A: rows = output columns), whose registers are {s0s1}, {s4s5}, {s2s3}, {s6s7}. */
__device__ __forceinline__ void weights_as_a(const uint32_t P[4], uint32_t a[4])
{
    a[0] = P[0], a[1] = P[2], a[2] = P[1], a[3] = P[3];
}

__device__ __forceinline__ void mma_f32(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_f16(uint32_t c[2], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, {%0,%1};\n"
                 : "+r"(c[0]), "+r"(c[1])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* ---- warpgroup MMA (sm_90a) -------------------------------------------------------------------
 * wgmma.mma_async m64nNk16, fp16 inputs, fp32 accumulators: the warpgroup's 4 warps each give the
 * 16 rows of A they hold in registers, exactly as an mma.m16n8k16 A fragment (warp w % 4: rows
 * 16 (w % 4) ..), and B (16 x N) is read from shared memory through a descriptor: 8 x 8 core
 * matrices of 16 contiguous bytes per row (a row = one B column = one slot's 8 k values), without
 * swizzle, LBO bytes apart along K and SBO bytes apart along N.  D per warp: n8 block j in d[4j ..
 * 4j + 3], in the m16n8 accumulator order.  benchmarks/probe_wgmma.cu checked these conventions on
 * the H200 (exact; swapped offsets fault).  Only sm_90a code has the instruction: elsewhere (sm_80,
 * the compute_90 PTX) the WG shape is compiled to a trap, and the host takes it only where its probe
 * kernel found sm_90a code running (cuda_backend.cu). */
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr bool HAVE_WGMMA = false;
#else
constexpr bool HAVE_WGMMA = true;            /* the host pass, and sm_90a */
#endif

__device__ __forceinline__ uint64_t wgmma_desc(unsigned smem_byte, unsigned lbo, unsigned sbo)
{
    return ((smem_byte & 0x3FFFFu) >> 4) | static_cast<uint64_t>(lbo >> 4) << 16 | static_cast<uint64_t>(sbo >> 4) << 32;
}

#define MM_WG_R16 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
#define MM_WG_R32 MM_WG_R16 ",%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define MM_WG_R64 MM_WG_R32 ",%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51," \
                            "%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define MM_WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                    "+f"(d[i + 6]), "+f"(d[i + 7])
#define MM_WG_D64 MM_WG_D8(0), MM_WG_D8(8), MM_WG_D8(16), MM_WG_D8(24), MM_WG_D8(32), MM_WG_D8(40), MM_WG_D8(48), \
                  MM_WG_D8(56)
/* One m64nNk16 (N = 32, 64, 128: d[0 .. N / 2) are its accumulators; all 64 are operands, so that the
 * compiler keeps them in place whatever N), d += A B. */
#define MM_WG_MMA(N, REGS)                                                                                           \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 {" \
                 REGS "}, {%64,%65,%66,%67}, %68, p, 1, 1, 0;\n}\n"                                                  \
                 : MM_WG_D64                                                                                         \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
template <int N>
__device__ __forceinline__ void wgmma_f32(float d[64], const uint32_t a[4], uint64_t desc)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if constexpr (N == 32) MM_WG_MMA(32, MM_WG_R16);
    else if constexpr (N == 64) MM_WG_MMA(64, MM_WG_R32);
    else MM_WG_MMA(128, MM_WG_R64);
#else
    (void)d, (void)a, (void)desc;
    __trap();
#endif
}
#undef MM_WG_MMA
#undef MM_WG_D64
#undef MM_WG_D8
#undef MM_WG_R64
#undef MM_WG_R32
#undef MM_WG_R16

/* Register writes before a wgmma reads them (wgmma.fence); the wgmmas issued since the last commit as
 * one group; waiting until at most N groups are in flight.  The accumulators and A registers must not
 * be touched between the MMA and the wait. */
__device__ __forceinline__ void wgmma_fence()
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit()
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait()
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
/* cp.async (generic proxy) writes to shared memory made visible to wgmma's reads (async proxy) */
__device__ __forceinline__ void fence_proxy_async()
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/* v is read here: keeps a register (an in-flight wgmma's operand) from being reused before this point */
__device__ __forceinline__ void keep_register(uint32_t v) { asm volatile("" ::"r"(v)); }
__device__ __forceinline__ void keep_register(float &v) { asm volatile("" : "+f"(v)::"memory"); }

__device__ __forceinline__ unsigned smem_address(const void *p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
/* s: a shared-space byte address */
__device__ __forceinline__ void cp_async16(unsigned s, const void *gmem)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async8(unsigned s, const void *gmem)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ uint32_t lds32(const uint16_t *p) { return *reinterpret_cast<const uint32_t *>(p); }

/* Programmatic dependent launch (sm_90): both are no-ops when the kernel was launched without the
 * attribute, and compiled out for older architectures, where launches are plainly stream-ordered. */
__device__ __forceinline__ void wait_prior_grid()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* ---- the main loop -------------------------------------------------------------------------- */
template <int N>
struct Frags {                               /* a compile-time fragment count, passed to a generic lambda */
    static constexpr int value = N;
};

/* One GEMM pass of a CTA: NMAT projections (gate+up, or down) for the tile's slots over all of K,
 * accumulated per warp and stored into ep[kgroup][mat][slot][column]: floats (F32) or halves in the
 * fp16 region.  Rows whose fp16 sums are not finite are flagged in `bad`.
 *
 * Pipeline: a step is STEP_TILES k-tiles of the CTA's 8 column tiles of every projection.  The
 * weight words of a step are copied to shared memory with 16-byte cp.async (one group per step,
 * WSTAGES - 1 steps ahead); the inputs of a K chunk travel in the group of the chunk's first step.
 * Each lane then reads its three words of a tile with three LDS at fixed offsets.  With direct
 * tiles (T = 1) the prologue issues the first WSTAGES - 1 weight steps before it waits for the
 * previous kernel (the inputs are its output), then the first input chunk as a group of its own;
 * otherwise load_tile has waited already and chunk 0 travels with step 0.  FAST: every projection
 * has an LCG codebook and 2K <= KX2_TWO_WORDS (decode_lane without branches). */
template <class C, int NMAT, bool F32, int KX2A, int KX2B, bool FAST>
__device__ __forceinline__ void main_loop(const mm_cuda_proj *const proj[NMAT], int expert, const uint16_t *xbase,
                                          int64_t mat_stride, int kdim, int ncols, int col0, const int *slot_s,
                                          int count, char *smem, int *bad)
{
    constexpr int T = C::T, TP = C::TP, KC = C::KC, WK = C::WK, U = C::U, S = C::WSTAGES;
    constexpr int XS = C::XS;                                    /* halves per staged row */
    constexpr bool WG = C::ORIENT == ORIENT_WG;
    constexpr int NFRAG = C::SWAPPED ? TP / 8 : TP / 16;         /* WG: n8 blocks of the wgmma's N */
    constexpr int NACC = C::SWAPPED ? NFRAG * 4 : NFRAG * 8;     /* floats per mat */
    constexpr int FRAG_ROWS = C::SWAPPED ? 8 : 16;               /* slots per fragment */
    constexpr int STEP_TILES = C::STEP_TILES, SPC = C::STEPS_PER_CHUNK;
    constexpr int TW = C::TILE_WORDS, MAT_WORDS = STEP_TILES * NWARP_N * TW;
    uint16_t *xs = reinterpret_cast<uint16_t *>(smem);          /* [2][NMAT][T][XS] */
    uint32_t *ws = reinterpret_cast<uint32_t *>(smem + C::stage_bytes(NMAT));   /* [S][NMAT][tile][TW] */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wn = warp % NWARP_N, kg = warp / NWARP_N;
    const int g = lane >> 2, c4 = lane & 3;
    const int n16 = ncols / 16;

    /* this CTA's share of K: split blockIdx.z of gridDim.z, in whole steps */
    const int steps_total = kdim / 16 / STEP_TILES;
    const int s0 = static_cast<int>(blockIdx.z) * steps_total / static_cast<int>(gridDim.z);
    const int s1 = (static_cast<int>(blockIdx.z) + 1) * steps_total / static_cast<int>(gridDim.z);
    const int kbeg = s0 * STEP_TILES * 16, kend = s1 * STEP_TILES * 16;
    const int nchunks = (kend - kbeg + KC - 1) / KC, nsteps = s1 - s0;

    /* per projection: words of the CTA's first tile of step 0, the k-tile stride, and the lane's
     * window (its first word as a shared-memory word offset inside a staged tile) */
    const uint32_t *wsrc[NMAT];
    int kx2s[NMAT], nd[NMAT], kstride[NMAT];
    LaneWindow lw[NMAT];
    Codebook cbk[NMAT];
    uint32_t lane_word[NMAT];
#pragma unroll
    for (int m = 0; m < NMAT; ++m) {
        const int ct = m == 0 ? KX2A : KX2B;
        kx2s[m] = ct ? ct : proj[m]->kx2;
        nd[m] = mm_tile_dwords(kx2s[m]);
        kstride[m] = n16 * nd[m];
        lw[m] = lane_window(kx2s[m], lane);
        cbk[m] = codebook(proj[m]->codebook);
        wsrc[m] = proj[m]->tiles + static_cast<int64_t>(expert) * proj[m]->expert_words +
                  static_cast<int64_t>(col0 / 16) * nd[m] + static_cast<int64_t>(s0) * STEP_TILES * kstride[m];
        lane_word[m] = m * MAT_WORDS + (kg * NWARP_N + wn) * TW + lw[m].q0;
    }

    /* The staged input rows this lane reads: row g (+ 8 per swap fragment, + 16 per std fragment, and
     * g + 8 for a std fragment's second half) at columns 2 c4, i.e. compile-time offsets from one
     * base.  Rows past the tile's slots hold stale values (no copy writes them), but a row of the
     * inputs reaches only its own slot's sums, which are never stored.  Tiles of fewer slots than a
     * fragment (T = 1, 4; then NFRAG = 1) clamp to their own rows, so that no lane reads past them into
     * buffers that other threads' copies are filling. */
    static_assert(T == TP || NFRAG == 1, "only single-fragment tiles are narrower than a fragment");
    const int lane_row = (T < TP ? min(g, T - 1) : g) * XS + 2 * c4;

    /* WG: the inputs in wgmma's B layout, piece (r, v) (slot r, halves 8v .. 8v + 7 of the chunk) at byte
     * ((v T / 8 + r / 8) 8 + r % 8) 16: core matrix (r / 8, v) is 128 contiguous bytes.  Thread tid
     * copies piece v = (tid / 8) % VPR of rows r0 + 8 WG_ROW_GROUPS j, r0 = tid % 8 + 8 (tid / (8 VPR)):
     * a warp's 32 copies fill 4 core matrices whole (no bank conflicts), and which pieces a thread
     * copies is the same in every chunk, so their offsets are planned once here (the slot lookups
     * and address arithmetic of a copy loop would cost ~20 instructions per copy). */
    constexpr int VPR = KC / 8;
    constexpr int WG_ROW_GROUPS = WG ? C::THREADS / (8 * VPR) : 1;      /* row groups of 8 per pass */
    constexpr int WG_COPIES = WG ? T / (8 * WG_ROW_GROUPS) : 1;         /* copies per thread and mat */
    static_assert(!WG || (C::THREADS % (8 * VPR) == 0 && T % (8 * WG_ROW_GROUPS) == 0), "whole passes");
    constexpr unsigned NO_COPY = 0xFFFFFFFFu;
    const int wg_piece = (tid >> 3) & (VPR - 1), wg_row0 = (tid & 7) + 8 * (tid / (8 * VPR));
    const unsigned wg_dst = 16u * ((wg_piece * (T / 8) + (wg_row0 >> 3)) * 8 + (wg_row0 & 7));
    unsigned wg_src[WG_COPIES];                  /* halves from the chunk's first column; NO_COPY: none */
#pragma unroll
    for (int j = 0; j < WG_COPIES; ++j) {
        const int r = wg_row0 + 8 * WG_ROW_GROUPS * j;
        wg_src[j] = WG && r < count ? static_cast<unsigned>(slot_s[r]) * kdim + 8 * wg_piece : NO_COPY;
    }

    float accf[NMAT][F32 ? NACC : 1];
    uint32_t acch[NMAT][F32 ? 1 : NACC / 2];
#pragma unroll
    for (int m = 0; m < NMAT; ++m) {
#pragma unroll
        for (int i = 0; i < (F32 ? NACC : 1); ++i) accf[m][i] = 0.0f;
#pragma unroll
        for (int i = 0; i < (F32 ? 1 : NACC / 2); ++i) acch[m][i] = 0u;
    }

    /* chunk `chunk` of the tile's input rows (rows past count are never read): VPR = KC / 8 16-byte
     * pieces per full row, a power of two, so no run-time division; a short last chunk copies nvec */
    auto stage_inputs = [&](int chunk) {
        static_assert((VPR & (VPR - 1)) == 0, "KC / 8 is a power of two");
        const int k0 = kbeg + chunk * KC, nvec = min(KC, kend - k0) / 8;
        const unsigned dst = smem_address(xs + (chunk & 1) * NMAT * T * XS);
#pragma unroll
        for (int m = 0; m < NMAT; ++m) {
            if constexpr (WG) {
                const uint16_t *src = xbase + m * mat_stride + k0;
#pragma unroll
                for (int j = 0; j < WG_COPIES; ++j)
                    if (wg_src[j] != NO_COPY && wg_piece < nvec)
                        cp_async16(dst + 2u * m * T * XS + wg_dst + 128u * WG_ROW_GROUPS * j, src + wg_src[j]);
            } else {
                for (int i = tid; i < count * VPR; i += C::THREADS) {
                    const int r = i / VPR, v = i % VPR;
                    if (v < nvec)
                        cp_async16(dst + 2u * ((m * T + r) * XS + 8 * v),
                                   xbase + m * mat_stride + static_cast<int64_t>(slot_s[r]) * kdim + k0 + 8 * v);
                }
            }
        }
    };

    /* A step's weights, per projection: STEP_TILES x 8 tiles of nd words (nd / 4 = kx2 16-byte
     * pieces each), then each tile's first two words again after it.  Which pieces this thread
     * copies is the same for every step: planned once here, in registers (the divisions by the
     * run-time piece count would otherwise cost ~100 instructions per step), as (source byte offset
     * from the step's first tile, staged byte offset), unsigned so that an address is one wide
     * multiply-add; NO_COPY: none. */
    constexpr int CP = C::COPIES;
    uint2 plan[NMAT][CP + 1];
#pragma unroll
    for (int m = 0; m < NMAT; ++m) {
        const int pieces = kx2s[m], total = STEP_TILES * NWARP_N * pieces;
#pragma unroll
        for (int r = 0; r <= CP; ++r) {
            int word = -1, staged = 0;
            if (r < CP) {
                const int i = tid + r * C::THREADS;
                if (i < total) {
                    const int tile = i / pieces, c = i - tile * pieces;
                    word = (tile / NWARP_N) * kstride[m] + (tile % NWARP_N) * nd[m] + 4 * c;
                    staged = tile * TW + 4 * c;
                }
            } else if (tid < STEP_TILES * NWARP_N) {
                word = (tid / NWARP_N) * kstride[m] + (tid % NWARP_N) * nd[m];
                staged = tid * TW + nd[m];
            }
            plan[m][r] = make_uint2(word < 0 ? NO_COPY : 4u * word, 4u * staged);
        }
    }
    const unsigned ws_address = smem_address(ws);

    /* step t's weights into stage buffer `buf` */
    auto stage_weights = [&](int t, int buf) {
#pragma unroll
        for (int m = 0; m < NMAT; ++m) {
            const char *src = reinterpret_cast<const char *>(wsrc[m] + static_cast<int64_t>(t) * STEP_TILES * kstride[m]);
            const unsigned dst = ws_address + 4u * ((buf * NMAT + m) * MAT_WORDS);
#pragma unroll
            for (int r = 0; r <= CP; ++r) {
                const uint2 e = plan[m][r];
                if (e.x != NO_COPY) {
                    if (r < CP) cp_async16(dst + e.y, src + e.x);
                    else cp_async8(dst + e.y, src + e.x);
                }
            }
        }
    };

    /* Direct tiles stage chunk 0's inputs after the weight prologue, in a group of their own */
    constexpr bool LATE_CHUNK0 = T == 1;
    auto issue = [&](int t) {                                  /* group t: step t's weights (+ inputs) */
        if (t < nsteps) {
            stage_weights(t, t % S);
            if (t % SPC == 0 && (t > 0 || !LATE_CHUNK0) && t / SPC < nchunks) stage_inputs(t / SPC);
        }
        cp_async_commit();
    };

    /* the lane's eight weights of k-tile u of this step, projection m */
    auto decode_tile = [&](const uint32_t *wbuf, int u, int m, uint32_t P[4]) {
        const uint32_t *tw = wbuf + lane_word[m] + u * WK * NWARP_N * TW;
        if (m == 0) decode_lane<KX2A, FAST>(tw[0], tw[1], tw[2], lw[m].b, kx2s[m], cbk[m], P);
        else decode_lane<KX2B, FAST>(tw[0], tw[1], tw[2], lw[m].b, kx2s[m], cbk[m], P);
    };

    /* NF::value fragments (of NFRAG) hold the tile's slots: the rest are not computed (see below) */
    auto compute_step = [&](auto nf, const uint32_t *wbuf, int step, const uint16_t *xchunk, int k0chunk) {
        constexpr int NF = decltype(nf)::value;
        if constexpr (WG) {
            /* per k-tile: decode every projection's A, then one m64n(8 NF)k16 per projection, as one
             * group (the next k-tile's decode overlaps it); all done before the step ends, when the
             * barrier frees the staged inputs for the next copies */
            static_assert(F32, "wgmma accumulates in fp32");
            uint32_t a[U][NMAT][4];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int kl = ((s0 + step) * STEP_TILES + u) * 16 - k0chunk;
#pragma unroll
                for (int m = 0; m < NMAT; ++m) {
                    uint32_t P[4];
                    decode_tile(wbuf, u, m, P);
                    weights_as_a(P, a[u][m]);
                }
                wgmma_fence();
#pragma unroll
                for (int m = 0; m < NMAT; ++m)
                    wgmma_f32<8 * NF>(accf[m], a[u][m],
                                      wgmma_desc(smem_address(xchunk + m * T * XS) + 2u * kl * T, 16u * T, 128u));
                wgmma_commit();
            }
            wgmma_wait<0>();
#pragma unroll
            for (int u = 0; u < U; ++u)
#pragma unroll
                for (int m = 0; m < NMAT; ++m)
#pragma unroll
                    for (int i = 0; i < 4; ++i) keep_register(a[u][m][i]);
#pragma unroll
            for (int m = 0; m < NMAT; ++m)
#pragma unroll
                for (int i = 0; i < NACC; ++i) keep_register(accf[m][i]);
        } else {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int kt = (s0 + step) * STEP_TILES + u * WK + kg;
                const int kl = kt * 16 - k0chunk;                    /* column inside the chunk */
#pragma unroll
                for (int m = 0; m < NMAT; ++m) {
                    uint32_t P[4];
                    decode_tile(wbuf, u, m, P);
                    const uint16_t *xm = xchunk + m * T * XS + kl;
                    if (C::SWAPPED) {
                        uint32_t a[4];
                        weights_as_a(P, a);
#pragma unroll
                        for (int f = 0; f < NF; ++f) {
                            const uint16_t *xr = xm + lane_row + 8 * f * XS;
                            const uint32_t b0 = lds32(xr), b1 = lds32(xr + 8);
                            if constexpr (F32) mma_f32(&accf[m][4 * f], a, b0, b1);
                            else mma_f16(&acch[m][2 * f], a, b0, b1);
                        }
                    } else {
#pragma unroll
                        for (int f = 0; f < NF; ++f) {
                            const uint16_t *xa = xm + lane_row + 16 * f * XS, *xb = xa + 8 * XS;
                            const uint32_t a[4] = {lds32(xa), lds32(xb), lds32(xa + 8), lds32(xb + 8)};
                            if constexpr (F32) {
                                mma_f32(&accf[m][8 * f], a, P[0], P[1]);         /* columns 0..7 */
                                mma_f32(&accf[m][8 * f + 4], a, P[2], P[3]);     /* columns 8..15 */
                            } else {
                                mma_f16(&acch[m][4 * f], a, P[0], P[1]);
                                mma_f16(&acch[m][4 * f + 2], a, P[2], P[3]);
                            }
                        }
                    }
                }
            }
        }
    };

#pragma unroll
    for (int t = 0; t < S - 1; ++t) issue(t);                  /* T > 1: load_tile waited already */
    if constexpr (LATE_CHUNK0) {
        wait_prior_grid();
        stage_inputs(0);
        cp_async_commit();
    }
    int buf = 0;
    for (int step = 0; step < nsteps; ++step) {
        if (LATE_CHUNK0 && step == 0) cp_async_wait<0>();        /* the prologue's groups (chunk 0 is last) */
        else cp_async_wait<S - 2>();                             /* group `step` has landed (this thread's) */
        if constexpr (WG) fence_proxy_async();                   /* ... for wgmma's reads too */
        __syncthreads();                                         /* ... everyone's; step-1's buffers are free */
        issue(step + S - 1);
        const int chunk = step / SPC;
        const uint32_t *wbuf = ws + buf * NMAT * MAT_WORDS;
        const uint16_t *xchunk = xs + (chunk & 1) * NMAT * T * XS;
        /* Fragments wholly past the tile's slots are skipped: the step runs with a quarter, half or all
         * of them (compile-time counts, chosen per CTA), never with a test per fragment (measured
         * together with ldmatrix inputs: 12-29% slower in the std orientation; NOTES-cuda.md, version 8) */
        const int k0chunk = kbeg + chunk * KC;
        if (NFRAG >= 4 && count <= NFRAG / 4 * FRAG_ROWS)
            compute_step(Frags<(NFRAG >= 4 ? NFRAG / 4 : 1)>(), wbuf, step, xchunk, k0chunk);
        else if (NFRAG >= 2 && count <= NFRAG / 2 * FRAG_ROWS)
            compute_step(Frags<(NFRAG >= 2 ? NFRAG / 2 : 1)>(), wbuf, step, xchunk, k0chunk);
        else
            compute_step(Frags<NFRAG>(), wbuf, step, xchunk, k0chunk);
        buf = buf + 1 == S ? 0 : buf + 1;
    }
    cp_async_wait<0>();
    __syncthreads();                                             /* the staging buffers become ep */

    /* accumulators -> ep[kg][m][slot][col] */
    float *ep = reinterpret_cast<float *>(smem);
    __half *ep16 = reinterpret_cast<__half *>(smem + C::ep16_offset(NMAT));
#pragma unroll
    for (int m = 0; m < NMAT; ++m) {
        const int row0 = (kg * NMAT + m) * T * EP_STRIDE + wn * 16;
#pragma unroll
        for (int i = 0; i < NACC; ++i) {
            int tok, col;
            if (C::SWAPPED) {                          /* C[m = col][n = token] */
                const int f = i / 4, r = i % 4;
                tok = 8 * f + 2 * c4 + (r & 1);
                col = g + 8 * (r >> 1);
            } else {                                   /* C[m = token][n = col], two n8 halves */
                const int f = i / 8, h = (i / 4) % 2, r = i % 4;
                tok = 16 * f + g + 8 * (r >> 1);
                col = 8 * h + 2 * c4 + (r & 1);
            }
            if (tok < count) {
                if constexpr (F32) {
                    ep[row0 + tok * EP_STRIDE + col] = accf[m][i];
                } else {
                    const __half2 hv = *reinterpret_cast<const __half2 *>(&acch[m][i / 2]);
                    const __half v = (i & 1) ? __high2half(hv) : __low2half(hv);
                    ep16[row0 + tok * EP_STRIDE + col] = v;
                    if (__hisinf(v) || __hisnan(v)) bad[tok] = 1;
                }
            }
        }
    }
}

/* Split K (gridDim.z > 1, fp32 accumulation only): every CTA of a (tile, column block) writes its
 * partial sums to the workspace; the last one to arrive (an atomic ticket) adds them in split
 * order into ep, so the result does not depend on which CTA finished first, and resets the
 * ticket for the next call.  Returns false for the CTAs that are done. */
template <class C, int NMAT>
__device__ __forceinline__ bool reduce_splits(const mm_cuda_args &a, int count, char *smem)
{
    const int splits = static_cast<int>(gridDim.z);
    if (splits == 1) return true;
    __shared__ int last;
    float *ep = reinterpret_cast<float *>(smem);
    const int64_t item = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
    constexpr int ROW = NMAT * C::T * COLS;                      /* floats of one split's partial */
    float *mine = a.partial + (item * splits + blockIdx.z) * ROW;
    for (int i = threadIdx.x; i < NMAT * count * COLS; i += C::THREADS) {
        const int col = i % COLS, t = (i / COLS) % count, m = i / (COLS * count);
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < C::WK; ++k) v += ep[((k * NMAT + m) * C::T + t) * EP_STRIDE + col];
        mine[(m * C::T + t) * COLS + col] = v;
    }
    __threadfence();
    __syncthreads();
    /* atomicInc wraps to 0 after splits - 1: the ticket is back at zero for the next call even if an
     * earlier one was interrupted */
    if (threadIdx.x == 0)
        last = atomicInc(reinterpret_cast<unsigned *>(&a.tickets[item]), static_cast<unsigned>(splits - 1)) ==
               static_cast<unsigned>(splits - 1);
    __syncthreads();
    if (!last) return false;
    __threadfence();
    const float *all = a.partial + item * splits * ROW;
    for (int i = threadIdx.x; i < NMAT * count * COLS; i += C::THREADS) {
        const int col = i % COLS, t = (i / COLS) % count, m = i / (COLS * count);
        float v = 0.0f;
        for (int z = 0; z < splits; ++z) v += __ldcg(all + z * ROW + (m * C::T + t) * COLS + col);
        ep[((0 * NMAT + m) * C::T + t) * EP_STRIDE + col] = v;
#pragma unroll
        for (int k = 1; k < C::WK; ++k) ep[((k * NMAT + m) * C::T + t) * EP_STRIDE + col] = 0.0f;
    }
    __syncthreads();
    return true;
}

/* Whether every projection of this pass can take main_loop's FAST path. */
template <int NMAT, int KX2A, int KX2B>
__device__ __forceinline__ bool fast_path(const mm_cuda_proj *const proj[NMAT])
{
    bool fast = true;
#pragma unroll
    for (int m = 0; m < NMAT; ++m) {
        const int ct = m == 0 ? KX2A : KX2B;
        fast = fast && proj[m]->codebook != MM_CB_MUL1 && (ct ? ct : proj[m]->kx2) <= KX2_TWO_WORDS;
    }
    return fast;
}

template <class C, int NMAT, bool F32, int KX2A, int KX2B>
__device__ __forceinline__ void run_main_loop(bool fast, const mm_cuda_proj *const proj[NMAT], int expert,
                                              const uint16_t *xbase, int64_t mat_stride, int kdim, int ncols, int col0,
                                              const int *slot_s, int count, char *smem, int *bad)
{
    if constexpr (C::ORIENT == ORIENT_WG && !HAVE_WGMMA) {
        (void)fast, (void)proj, (void)expert, (void)xbase, (void)mat_stride, (void)kdim, (void)ncols, (void)col0,
            (void)slot_s, (void)count, (void)smem, (void)bad;
        __trap();                                                /* never launched: no wgmma here */
    } else if (fast)
        main_loop<C, NMAT, F32, KX2A, KX2B, true>(proj, expert, xbase, mat_stride, kdim, ncols, col0, slot_s, count,
                                                  smem, bad);
    else
        main_loop<C, NMAT, F32, KX2A, KX2B, false>(proj, expert, xbase, mat_stride, kdim, ncols, col0, slot_s, count,
                                                   smem, bad);
}

/* Runs the main loop and, for fp16 accumulation, the fp32 re-run of the slots that overflowed;
 * with split K, the reduction.  Returns true (ep filled, the CTA synchronised) for the CTA that
 * runs the epilogue. */
template <class C, int NMAT, int KX2A, int KX2B>
__device__ __forceinline__ bool gemm(const mm_cuda_args &a, const mm_cuda_proj *const proj[NMAT], int expert,
                                     const uint16_t *xbase, int64_t mat_stride, int kdim, int ncols, int col0,
                                     const int *slot_s, int count, char *smem, int *bad)
{
    const bool fast = fast_path<NMAT, KX2A, KX2B>(proj);
    run_main_loop<C, NMAT, C::F32, KX2A, KX2B>(fast, proj, expert, xbase, mat_stride, kdim, ncols, col0, slot_s,
                                               count, smem, bad);
    if constexpr (!C::F32) {
        __syncthreads();
        if (__syncthreads_or(threadIdx.x < count && bad[threadIdx.x])) {
            if (threadIdx.x == 0) atomicAdd(&a.counters[0], 1ull);
            run_main_loop<C, NMAT, true, KX2A, KX2B>(fast, proj, expert, xbase, mat_stride, kdim, ncols, col0,
                                                     slot_s, count, smem, bad);
        }
    }
    __syncthreads();
    if constexpr (C::F32) return reduce_splits<C, NMAT>(a, count, smem);
    return true;
}

/* Epilogue input: the sum over k-groups of row `t`, column `col` of projection m; fp32 rows where
 * the slot was re-run (or the variant accumulates in fp32), else the fp16 rows. */
template <class C, int NMAT>
__device__ __forceinline__ float ep_value(const char *smem, const int *bad, int m, int t, int col)
{
    const float *ep = reinterpret_cast<const float *>(smem);
    const __half *ep16 = reinterpret_cast<const __half *>(smem + C::ep16_offset(NMAT));
    const bool f32 = C::F32 || bad[t];
    float v = 0.0f;
#pragma unroll
    for (int k = 0; k < C::WK; ++k) {
        const int i = ((k * NMAT + m) * C::T + t) * EP_STRIDE + col;
        v += f32 ? ep[i] : __half2float(ep16[i]);
    }
    return v;
}

/* The tile of this CTA; false if the CTA has no work (the grid is sized for the worst case).  Direct
 * tiles (T = 1): slot blockIdx.x, known from ids alone, so before waiting for mm_prep; otherwise
 * entry blockIdx.x of mm_prep's tile list, after. */
template <class C>
__device__ __forceinline__ bool load_tile(const mm_cuda_args &a, int *slot_s, int *bad, int &expert, int &count)
{
    if constexpr (C::T == 1) {
        const int64_t s = blockIdx.x;
        expert = s < a.slots ? slot_expert(a, s) : -1;
        if (expert < 0) return false;                     /* an invalid id: mm_prep counted it */
        count = 1;
        if (threadIdx.x == 0) slot_s[0] = static_cast<int>(s), bad[0] = 0;
    } else {
        wait_prior_grid();
        if (static_cast<int>(blockIdx.x) >= *a.ntiles) return false;
        const mm_cuda_tile t = a.tiles[blockIdx.x];
        expert = t.expert;
        count = t.count;
        if (threadIdx.x < C::T) {
            slot_s[threadIdx.x] = threadIdx.x < t.count ? a.order[t.first + threadIdx.x] : -1;
            bad[threadIdx.x] = 0;
        }
    }
    __syncthreads();
    return true;
}

/* ---- launch 2: gate + up + SwiGLU ------------------------------------------------------------- */
/* Both kernels give ptxas only the block size: an explicit minimum of CTAs per SM, even 1, changes
 * its register choices (measured: 3 for the one-slot kernels gained nothing at batch 1, and 1 for
 * the others cost the 512-thread down kernels half their occupancy; NOTES-cuda.md, version 12). */
template <class C>
__global__ void __launch_bounds__(C::THREADS) mm_gate_up(const mm_cuda_args a)
{
    extern __shared__ __align__(16) char smem[];
    __shared__ int slot_s[C::T], bad[C::T];
    allow_next_grid();                                   /* mm_down may start: it waits for this grid */
    int expert, count;
    if (!load_tile<C>(a, slot_s, bad, expert, count)) return;
    const int shared = expert == a.experts;
    const mm_cuda_proj *proj[2] = {&a.proj[shared][0], &a.proj[shared][1]};
    const int H = a.hidden, I = a.intermediate, col0 = blockIdx.y * COLS;
    const int64_t ex = shared ? 0 : expert;
    expert = static_cast<int>(ex);                       /* the shared expert's arrays hold one expert */
    const bool ct = (C::KG == 0 || proj[0]->kx2 == C::KG) && (C::KU == 0 || proj[1]->kx2 == C::KU);
    bool epilogue;
    if constexpr (C::KG || C::KU) {
        if (ct) epilogue = gemm<C, 2, C::KG, C::KU>(a, proj, expert, a.xin, a.slots * H, H, I, col0, slot_s, count, smem, bad);
        else epilogue = gemm<C, 2, 0, 0>(a, proj, expert, a.xin, a.slots * H, H, I, col0, slot_s, count, smem, bad);
    } else {
        epilogue = gemm<C, 2, 0, 0>(a, proj, expert, a.xin, a.slots * H, H, I, col0, slot_s, count, smem, bad);
    }
    if (!epilogue) return;
    /* epilogue, one warp per slot: Hadamard, * svh, SwiGLU, * suh_down, Hadamard */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cl = 4 * lane;
    const uint16_t *svh_g = proj[0]->svh + ex * I + col0, *svh_u = proj[1]->svh + ex * I + col0;
    const uint16_t *suh_d = a.proj[shared][2].suh + ex * I + col0;
    for (int t = warp; t < count; t += C::THREADS / 32) {
        float gv[4], uv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            gv[e] = round_half(ep_value<C, 2>(smem, bad, 0, t, cl + e));
            uv[e] = round_half(ep_value<C, 2>(smem, bad, 1, t, cl + e));
        }
        warp_hadamard128(gv);
        warp_hadamard128(uv);
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float gg = round_half(round_half(gv[e]) * half_bits(svh_g[cl + e]));
            const float uu = round_half(round_half(uv[e]) * half_bits(svh_u[cl + e]));
            v[e] = round_half(round_half(round_half(mm_silu(gg)) * uu) * half_bits(suh_d[cl + e]));
        }
        warp_hadamard128(v);
        __align__(8) __half out[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) out[e] = __float2half_rn(v[e]);
        *reinterpret_cast<uint2 *>(a.act + static_cast<int64_t>(slot_s[t]) * I + col0 + cl) =
            *reinterpret_cast<const uint2 *>(out);
    }
}

/* Columns h0..h0+3 of token t's output: sum_j p[t,j] * down[t*top_k + j] in slot order (NaN if an id
 * is invalid), * rsf, + the shared expert's row.  L2 loads: other CTAs wrote the rows. */
__device__ __forceinline__ void combine_columns(const mm_cuda_args &a, int64_t t, int h0)
{
    const int H = a.hidden;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < a.top_k; ++j) {
        const int64_t s = t * a.top_k + j;
        const float p = load_act(a.p, a.p_dtype, s);
        if (slot_expert(a, s) < 0) {                       /* an invalid id: the token's row is NaN */
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[i] = __int_as_float(0x7fc00000);
            continue;
        }
        const float4 d = __ldcg(reinterpret_cast<const float4 *>(a.down + s * H + h0));
        acc[0] += p * d.x, acc[1] += p * d.y, acc[2] += p * d.z, acc[3] += p * d.w;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] *= a.routed_scaling_factor;
    if (a.has_shared) {
        const float4 d = __ldcg(reinterpret_cast<const float4 *>(a.down + (a.tokens * a.top_k + t) * H + h0));
        acc[0] += d.x, acc[1] += d.y, acc[2] += d.z, acc[3] += d.w;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) store_act(a.out, a.out_dtype, t * H + h0 + i, acc[i]);
}

/* Slots of token t that reach mm_down: its valid routed slots and the shared expert's. */
__device__ __forceinline__ int token_arrivals(const mm_cuda_args &a, int64_t t)
{
    int n = a.has_shared;
    for (int j = 0; j < a.top_k; ++j) n += slot_expert(a, t * a.top_k + j) >= 0;
    return n;
}

/* ---- launch 3: down, then the combine ------------------------------------------------------------ */
template <class C>
__global__ void __launch_bounds__(C::THREADS) mm_down(const mm_cuda_args a)
{
    extern __shared__ __align__(16) char smem[];
    __shared__ int slot_s[C::T], bad[C::T];
    int expert, count;
    if (!load_tile<C>(a, slot_s, bad, expert, count)) return;
    const int shared = expert == a.experts;
    const mm_cuda_proj *proj[1] = {&a.proj[shared][2]};
    const int H = a.hidden, I = a.intermediate, col0 = blockIdx.y * COLS;
    if (shared) expert = 0;                              /* the shared expert's arrays hold one expert */
    bool epilogue;
    if constexpr (C::KD != 0) {
        if (proj[0]->kx2 == C::KD) epilogue = gemm<C, 1, C::KD, 0>(a, proj, expert, a.act, 0, I, H, col0, slot_s, count, smem, bad);
        else epilogue = gemm<C, 1, 0, 0>(a, proj, expert, a.act, 0, I, H, col0, slot_s, count, smem, bad);
    } else {
        epilogue = gemm<C, 1, 0, 0>(a, proj, expert, a.act, 0, I, H, col0, slot_s, count, smem, bad);
    }
    if (!epilogue) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, cl = 4 * lane;
    const uint16_t *svh = proj[0]->svh + static_cast<int64_t>(expert) * H + col0;
    for (int t = warp; t < count; t += C::THREADS / 32) {
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = ep_value<C, 1>(smem, bad, 0, t, cl + e);
        warp_hadamard128(v);
        float4 o;
        o.x = half_bits(svh[cl + 0]) * v[0];
        o.y = half_bits(svh[cl + 1]) * v[1];
        o.z = half_bits(svh[cl + 2]) * v[2];
        o.w = half_bits(svh[cl + 3]) * v[3];
        *reinterpret_cast<float4 *>(a.down + static_cast<int64_t>(slot_s[t]) * H + col0 + cl) = o;
    }
    /* the rows are out; the CTA that delivers a token's last slot of this column block combines it
     * (atomicInc wraps the ticket back to 0 for the next call) */
    __shared__ int last_s[C::T];
    __threadfence();
    __syncthreads();
    if (threadIdx.x < count) {
        const int64_t tok = slot_token(a, slot_s[threadIdx.x]);
        const unsigned n = static_cast<unsigned>(token_arrivals(a, tok));
        unsigned *ticket = reinterpret_cast<unsigned *>(a.out_tickets + tok * gridDim.y + blockIdx.y);
        last_s[threadIdx.x] = atomicInc(ticket, n - 1) == n - 1;
    }
    __syncthreads();
    __threadfence();
    for (int t = warp; t < count; t += C::THREADS / 32)
        if (last_s[t]) combine_columns(a, slot_token(a, slot_s[t]), col0 + cl);
}

/* ---- launch 1: routing (block 0) and input rotation (blocks 1..slots) --------------------------- */
constexpr int PREP_THREADS = 256;
constexpr int MAX_EXPERTS = 1024;            /* routed + shared experts one CUDA call can group */

/* Exclusive prefix sums of v[0..n) (n <= 4 * PREP_THREADS) in place; returns the total. */
__device__ int block_exclusive_scan(int *v, int n, int *warp_sums)
{
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int local[4], sum = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int idx = 4 * tid + i;
        local[i] = idx < n ? v[idx] : 0;
        sum += local[i];
    }
    int incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (tid == 0) {
        int run = 0;
        for (int w = 0; w < PREP_THREADS / 32; ++w) {
            const int s = warp_sums[w];
            warp_sums[w] = run;
            run += s;
        }
        warp_sums[PREP_THREADS / 32] = run;
    }
    __syncthreads();
    int run = warp_sums[warp] + incl - sum;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int idx = 4 * tid + i;
        if (idx < n) v[idx] = run;
        run += local[i];
    }
    const int total = warp_sums[PREP_THREADS / 32];
    __syncthreads();
    return total;
}

/* f(s, expert of s) for every slot s of this thread (s = threadIdx.x + k * PREP_THREADS), the
 * experts of ROUTE_ILP slots loaded before any is used: one block walks all slots, so the loop is
 * bound by the latency of its loads. */
constexpr int ROUTE_ILP = 8;
template <class F>
__device__ __forceinline__ void for_slots(const mm_cuda_args &a, F f)
{
    for (int64_t s0 = threadIdx.x; s0 < a.slots; s0 += ROUTE_ILP * PREP_THREADS) {
        int e[ROUTE_ILP];
#pragma unroll
        for (int i = 0; i < ROUTE_ILP; ++i) {
            const int64_t s = s0 + i * PREP_THREADS;
            e[i] = s < a.slots ? slot_expert(a, s) : -2;
        }
#pragma unroll
        for (int i = 0; i < ROUTE_ILP; ++i)
            if (e[i] != -2) f(s0 + i * PREP_THREADS, e[i]);
    }
}

__device__ void route(const mm_cuda_args &a)
{
    __shared__ int cnt[MAX_EXPERTS], base[MAX_EXPERTS], tbase[MAX_EXPERTS], warp_sums[PREP_THREADS / 32 + 1];
    const int nexp = a.experts + a.has_shared, T = a.tokens_per_tile;
    for (int e = threadIdx.x; e < nexp; e += PREP_THREADS) cnt[e] = 0;
    __syncthreads();
    for_slots(a, [&](int64_t, int e) {
        if (e >= 0) atomicAdd(&cnt[e], 1);
        else atomicAdd(&a.counters[1], 1ull);
    });
    __syncthreads();
    for (int e = threadIdx.x; e < nexp; e += PREP_THREADS) {
        base[e] = cnt[e];
        tbase[e] = (cnt[e] + T - 1) / T;
    }
    __syncthreads();
    block_exclusive_scan(base, nexp, warp_sums);
    const int ntiles = block_exclusive_scan(tbase, nexp, warp_sums);
    for (int e = threadIdx.x; e < nexp; e += PREP_THREADS) {
        for (int i = 0; i * T < cnt[e]; ++i) {
            mm_cuda_tile t;
            t.expert = e;
            t.first = base[e] + i * T;
            t.count = min(T, cnt[e] - i * T);
            t.unused = 0;
            a.tiles[tbase[e] + i] = t;
        }
    }
    __syncthreads();
    for_slots(a, [&](int64_t s, int e) {                                 /* base[] becomes a cursor */
        if (e >= 0) a.order[atomicAdd(&base[e], 1)] = static_cast<int>(s);
    });
    if (threadIdx.x == 0) *a.ntiles = ntiles;
}

/* Blocks [0, route_blocks): the routing (none for direct tiles); then a.rotate_blocks blocks per
 * slot, each rotating a share of the slot's 2 x hidden / 128 Hadamard blocks (several per slot when
 * the slots are few, so that a small batch's rotation is spread over the SMs). */
__global__ void __launch_bounds__(PREP_THREADS) mm_prep(const mm_cuda_args a)
{
    allow_next_grid();                                     /* mm_gate_up may start: it waits for this grid */
    const int route_blocks = a.tokens_per_tile == 1 ? 0 : 1;
    if (static_cast<int>(blockIdx.x) < route_blocks) {
        route(a);
        return;
    }
    const int rb = a.rotate_blocks;
    const int64_t s = (blockIdx.x - route_blocks) / rb;
    const int part = static_cast<int>((blockIdx.x - route_blocks) % rb);
    const int e = slot_expert(a, s);
    if (e < 0) {                                           /* never read: the slot is in no tile */
        if (!route_blocks && part == 0 && threadIdx.x == 0) atomicAdd(&a.counters[1], 1ull);
        const int64_t routed = a.tokens * a.top_k;
        if (part == 0 && s < routed && s % a.top_k == 0 && token_arrivals(a, s / a.top_k) == 0)
            for (int h = threadIdx.x; h < a.hidden; h += PREP_THREADS)   /* no slot reaches mm_down */
                store_act(a.out, a.out_dtype, (s / a.top_k) * a.hidden + h, __int_as_float(0x7fc00000));
        return;
    }
    const int shared = e == a.experts;
    const int64_t ex = shared ? 0 : e, t = slot_token(a, s);
    const int H = a.hidden, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int item = part * (PREP_THREADS / 32) + warp; item < 2 * (H / MM_HAD); item += rb * (PREP_THREADS / 32)) {
        const int m = item / (H / MM_HAD), k0 = (item % (H / MM_HAD)) * MM_HAD + 4 * lane;
        const uint16_t *suh = a.proj[shared][m].suh + ex * H;
        float v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = round_half(load_act(a.x, a.x_dtype, t * H + k0 + i) * half_bits(suh[k0 + i]));
        warp_hadamard128(v);
        __align__(8) __half out[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) out[i] = __float2half_rn(v[i]);
        *reinterpret_cast<uint2 *>(a.xin + (m * a.slots + s) * H + k0) = *reinterpret_cast<const uint2 *>(out);
    }
}

/* ---- routing: top-k from router logits, one warp per token (mm_route) ----------------------------- */
/* Double precision, as metal_moe.reference.route: softmax or sigmoid scores, the experts with the
 * largest score + bias in decreasing order (ties to the lower index), their scores renormalised.
 * The logits are not checked (the host router refuses non-finite ones): a non-finite logit gives
 * that token NaN weights, and ids the forward counts as invalid (its output row is then NaN). */
constexpr int ROUTE_MAX_PER_LANE = 32;       /* experts <= 1024 */
constexpr int ROUTE_MAX_TOP_K = 64;

struct RouteArgs {
    const void *logits;
    const float *bias;                       /* NULL or [experts] */
    int32_t *ids;
    float *p;
    int64_t tokens;
    int32_t experts, top_k, dtype, sigmoid, renormalize;
};

__global__ void __launch_bounds__(256) mm_route_kernel(const RouteArgs r)
{
    const int lane = threadIdx.x & 31;
    const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    if (t >= r.tokens) return;
    double score[ROUTE_MAX_PER_LANE];
    double top = -INFINITY;
#pragma unroll
    for (int i = 0; i < ROUTE_MAX_PER_LANE; ++i) {
        const int e = lane + 32 * i;
        score[i] = e < r.experts ? load_act(r.logits, r.dtype, t * r.experts + e) : -INFINITY;
        top = fmax(top, score[i]);
    }
    for (int o = 16; o; o >>= 1) top = fmax(top, __shfl_xor_sync(0xffffffffu, top, o));
    double sum = 0.0;
#pragma unroll
    for (int i = 0; i < ROUTE_MAX_PER_LANE; ++i) {
        const int e = lane + 32 * i;
        if (e < r.experts) {
            score[i] = r.sigmoid ? 1.0 / (1.0 + exp(-score[i])) : exp(score[i] - top);
            sum += score[i];
        }
    }
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (!r.sigmoid) {
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_PER_LANE; ++i) score[i] /= sum;
    }
    unsigned taken = 0;                      /* per lane: bit i = expert lane + 32 i chosen */
    double picked = 0.0, sel[ROUTE_MAX_TOP_K];
    for (int j = 0; j < r.top_k; ++j) {
        double best = -INFINITY;
        int best_e = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_PER_LANE; ++i) {
            const int e = lane + 32 * i;
            if (e >= r.experts || (taken >> i) & 1u) continue;
            const double choice = score[i] + (r.bias ? static_cast<double>(r.bias[e]) : 0.0);
            if (choice > best) best = choice, best_e = e;    /* e increases with i: ties keep the lower */
        }
        for (int o = 16; o; o >>= 1) {
            const double ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
            if (ob > best || (ob == best && oe < best_e)) best = ob, best_e = oe;
        }
        double s = 0.0;
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_PER_LANE; ++i)
            if (lane + 32 * i == best_e) s = score[i], taken |= 1u << i;
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);   /* one lane holds it */
        picked += s;
        sel[j] = s;
        if (lane == 0) r.ids[t * r.top_k + j] = best_e;
    }
    if (lane == 0) {
        const double norm = r.renormalize ? (picked > 1e-20 ? picked : 1e-20) : 1.0;
        for (int j = 0; j < r.top_k; ++j) r.p[t * r.top_k + j] = static_cast<float>(sel[j] / norm);
    }
}

/* 1 where the code running is sm_90a's (it has wgmma), 0 elsewhere (sm_80 code, JIT-compiled PTX) */
__global__ void mm_wgmma_probe(int *out) { *out = HAVE_WGMMA ? 1 : 0; }

/* ---- decode one projection (tests and tools) ------------------------------------------------------ */
__global__ void mm_decode(const uint32_t *tiles, int k_tiles, int n_tiles, int kx2, int cb, uint16_t *out)
{
    const int64_t tile = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    if (tile >= static_cast<int64_t>(k_tiles) * n_tiles) return;
    const int lane = threadIdx.x & 31, i = static_cast<int>(tile / n_tiles), j = static_cast<int>(tile % n_tiles);
    const uint32_t *t = tiles + tile * mm_tile_dwords(kx2);
    const LaneWindow w = lane_window(kx2, lane);
    uint32_t P[4];
    decode_lane<0, false>(t[w.q0], t[w.q1], t[w.q2], w.b, kx2, codebook(cb), P);
    const int64_t n = 16ll * n_tiles;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        const int p = 8 * lane + q;
        const uint16_t v = static_cast<uint16_t>(q & 1 ? P[q / 2] >> 16 : P[q / 2] & 0xFFFFu);
        out[(16ll * i + mm_tile_row(p)) * n + 16ll * j + mm_tile_col(p)] = v;
    }
}

}  // namespace mm

#endif
