// The Metal kernels: one template family, instantiated per variant at the end of this file.
//
// A forward is one command buffer of four dispatches (native/metal/metal_backend.m):
//   1. mm_inputs      per slot: fp16(x * suh) -> Hadamard -> fp16, for gate and up
//   2. mm_gate_up<>   per (tile of up to T slots of one expert, 128 intermediate columns): both GEMMs
//                     with the weights decoded in registers, then the fused epilogue: output Hadamard,
//                     * svh, SwiGLU, * suh_down, the down input Hadamard; writes the fp16 down input
//   3. mm_down<>      per (tile, 128 hidden columns): the down GEMM, output Hadamard, * svh; fp32 out
//   4. mm_combine     per token: sum_j p[t,j] * down[slot] in slot order, * rsf, + shared expert
// Unified memory lets the host group the slots by expert (the same counting sort as the CPU
// backend) before encoding, so the tile list is exact and no routing kernel is needed.
//
// Decoding is the shared header's (shaders/common/mm_exl3.h, MM_ADDR = device): mm_state reads a
// position's 16-bit window straight from the trellis buffer, mm_codebook_value maps it to the
// bit-exact fp16 value.  The CPU and CUDA test suites exercise exactly these functions.
//
// A threadgroup is 8 simdgroups of 32 threads; simdgroup w owns output columns 16w..16w+15 of the
// CTA's 128.  Lane l holds positions 8l..8l+7 of each 16x16 tile (rows 2c, 2c+1, 2c+8, 2c+9 and
// columns g, g+8 with g = l / 4, c = l % 4).  Two engines:
//   FMA    (decode, prefill4, the general tiles, large_batch): each lane multiplies its 8 weights
//          by the T tokens' inputs and keeps per-token sums for its two columns; the 4 lanes of a
//          column are added with simd_shuffle_xor at the end.  fp16 variants keep half sums.
//   MATRIX (simd): the decoded tile goes to threadgroup memory and simdgroup_matrix 8x8
//          multiply-accumulates consume it with the staged inputs (fp32 throughout).
// Tiles are sized for M1..M4: at most 32 KB of threadgroup memory per threadgroup (gate/up keep
// their pre-Hadamard sums as fp16, which the epilogue rounds them to anyway; down keeps fp32).

#include <metal_stdlib>
using namespace metal;

#define MM_ADDR device
#include "mm_exl3.h"

// Each pipeline is specialised for the routed experts' rates and codebooks (function constants
// set by the host's pipeline cache): the decoder's window arithmetic folds to constants.  The
// shared expert, whose rates may differ, reads them from the arguments.
constant int fc_kx2_gate [[function_constant(0)]];
constant int fc_kx2_up [[function_constant(1)]];
constant int fc_kx2_down [[function_constant(2)]];
constant int fc_cb_gate [[function_constant(3)]];
constant int fc_cb_up [[function_constant(4)]];
constant int fc_cb_down [[function_constant(5)]];

// ---- the arguments (one constant buffer; the layout is shared with the host) -------------------
#include "mm_metal_args.h"

constant constexpr int COLS = 128;
constant constexpr int EP_STRIDE = COLS + 4;
constant constexpr int THREADS = 256;

static inline float load_act(device const uchar *p, int dtype, int i)
{
    if (dtype == 2) return ((device const float *)p)[i];
    const ushort h = ((device const ushort *)p)[i];
    if (dtype == 1) return as_type<float>(uint(h) << 16);
    return float(as_type<half>(h));
}

static inline void store_act(device uchar *p, int dtype, int i, float v)
{
    if (dtype == 2) {
        ((device float *)p)[i] = v;
    } else if (dtype == 1) {
        uint u = as_type<uint>(v);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) u |= 0x00400000u;        // NaN stays NaN
        else u += 0x7FFFu + ((u >> 16) & 1u);                         // round to nearest even
        ((device ushort *)p)[i] = ushort(u >> 16);
    } else {
        ((device half *)p)[i] = half(v);
    }
}

static inline float round_half(float v) { return float(half(v)); }

// v[0..4) are elements 4*lane .. 4*lane+3 of a 128-vector held by the simdgroup: v <- v @ H/sqrt(128),
// the same butterflies in the same order as mm_hadamard128.
static inline void simd_hadamard128(thread float *v, uint lane)
{
    float a = v[0], b = v[1], c = v[2], d = v[3];
    v[0] = a + b; v[1] = a - b; v[2] = c + d; v[3] = c - d;
    a = v[0]; b = v[1]; c = v[2]; d = v[3];
    v[0] = a + c; v[1] = b + d; v[2] = a - c; v[3] = b - d;
    for (ushort m = 1; m < 32; m <<= 1) {
        const bool upper = (lane & m) != 0;
        for (int e = 0; e < 4; ++e) {
            const float o = simd_shuffle_xor(v[e], m);
            v[e] = upper ? o - v[e] : v[e] + o;
        }
    }
    for (int e = 0; e < 4; ++e) v[e] *= MM_INV_SQRT_HAD;
}

// The lane's eight decoded weights of tile `words` (the shared header's decoder).
static inline void decode_lane(device const uint *words, int kx2, int cb, uint lane, thread float *w)
{
    const int nd = mm_tile_dwords(kx2);
    for (int j = 0; j < 8; ++j) w[j] = mm_codebook_value(mm_state(words, nd, mm_position_end(8 * int(lane) + j, kx2)), cb);
}

// ---- launch 1: input rotation --------------------------------------------------------------
kernel void mm_inputs(constant mm_metal_args &a [[buffer(0)]],
                      device const uchar *x [[buffer(1)]],
                      device const int *slot_expert [[buffer(2)]],
                      device const half *suh_g [[buffer(3)]], device const half *suh_u [[buffer(4)]],
                      device const half *sh_suh_g [[buffer(5)]], device const half *sh_suh_u [[buffer(6)]],
                      device half *xin [[buffer(7)]],
                      uint slot [[threadgroup_position_in_grid]],
                      uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]])
{
    const int s = int(slot), e = slot_expert[s];
    const bool shared = e == a.experts;
    const int routed = a.tokens * a.top_k;
    const int t = s < routed ? s / a.top_k : s - routed;
    const int H = a.hidden, blocks = H / MM_HAD;
    for (int item = int(sg); item < 2 * blocks; item += THREADS / 32) {
        const int m = item / blocks, k0 = (item % blocks) * MM_HAD + 4 * int(lane);
        device const half *suh = m == 0 ? (shared ? sh_suh_g : suh_g + e * H) : (shared ? sh_suh_u : suh_u + e * H);
        float v[4];
        for (int i = 0; i < 4; ++i) v[i] = round_half(load_act(x, a.x_dtype, t * H + k0 + i) * float(suh[k0 + i]));
        simd_hadamard128(v, lane);
        for (int i = 0; i < 4; ++i) xin[(m * a.slots + s) * H + k0 + i] = half(v[i]);
    }
}

// ---- the GEMM of one threadgroup -------------------------------------------------------------
// NMAT projections (gate+up or down) for the tile's slots, over all of K, into
// ep[m][slot][column] (threadgroup, EP_T).  ENGINE 0 = FMA, 1 = MATRIX.
struct mm_proj {
    device const uint *tiles;   // this expert's first tile
    int kx2, cb, n16;
};

template <bool F32> struct mm_acc { typedef float type; };
template <> struct mm_acc<false> { typedef half type; };

// threadgroup floats the MATRIX engine needs besides ep: per simdgroup a decoded 16x16 tile (which
// later stages its 8x16 results), shared by all the inputs [NMAT][8 TB][16].  Weights and inputs
// are fp16 values held exactly in floats, so the 8x8 products accumulate in fp32.
constexpr int matrix_scratch_floats(int T, int NMAT) { return 8 * 256 + NMAT * ((T + 7) / 8) * 8 * 16; }

template <int T, bool F32, int ENGINE, int NMAT, typename EP_T>
static inline void gemm(thread const mm_proj *proj, device const half *xbase, int mat_stride, int kdim, int col0,
                        threadgroup const int *slot_s, int count, threadgroup EP_T *ep,
                        threadgroup float *scratch, uint tid, uint sg, uint lane)
{
    const int g = int(lane) >> 2, c4 = int(lane) & 3;
    const int jtile = col0 / 16 + int(sg);
    if (ENGINE == 0) {
        typedef typename mm_acc<F32>::type acc_t;
        acc_t acc[NMAT][T][2];
        for (int m = 0; m < NMAT; ++m)
            for (int t = 0; t < T; ++t) acc[m][t][0] = acc[m][t][1] = acc_t(0);
        for (int kt = 0; kt < kdim / 16; ++kt) {
            for (int m = 0; m < NMAT; ++m) {
                const int nd = mm_tile_dwords(proj[m].kx2);
                float w[8];
                decode_lane(proj[m].tiles + (kt * proj[m].n16 + jtile) * nd, proj[m].kx2, proj[m].cb, lane, w);
                const int r0 = kt * 16 + 2 * c4;
                for (int t = 0; t < T && t < count; ++t) {
                    device const half *xr = xbase + m * mat_stride + slot_s[t] * kdim;
                    const float x0 = float(xr[r0]), x1 = float(xr[r0 + 1]), x8 = float(xr[r0 + 8]), x9 = float(xr[r0 + 9]);
                    // positions j: 0 (2c, g) 1 (2c+1, g) 2 (2c+8, g) 3 (2c+9, g), 4..7 the same rows at g+8
                    // the running sum is rounded once per 16-row k-slice (fp16 variants), as on the CPU
                    acc[m][t][0] = acc_t(float(acc[m][t][0]) + (w[0] * x0 + w[1] * x1 + w[2] * x8 + w[3] * x9));
                    acc[m][t][1] = acc_t(float(acc[m][t][1]) + (w[4] * x0 + w[5] * x1 + w[6] * x8 + w[7] * x9));
                }
            }
        }
        for (int m = 0; m < NMAT; ++m) {
            for (int t = 0; t < T && t < count; ++t) {
                for (int h = 0; h < 2; ++h) {
                    float v = float(acc[m][t][h]);
                    v += simd_shuffle_xor(v, 1);
                    v += simd_shuffle_xor(v, 2);
                    if (c4 == 0) ep[(m * T + t) * EP_STRIDE + int(sg) * 16 + g + 8 * h] = EP_T(v);
                }
            }
        }
    } else {
        // MATRIX: tokens in blocks of 8 rows, fp32 accumulators
        constexpr int TB = (T + 7) / 8;
        simdgroup_float8x8 acc[NMAT][TB][2];
        for (int m = 0; m < NMAT; ++m)
            for (int b = 0; b < TB; ++b) acc[m][b][0] = acc[m][b][1] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        threadgroup float *wt = scratch + int(sg) * 256;                         // [16][16] weights
        threadgroup float *st = wt;                                               // [8][16] staging, after the loop
        threadgroup float *xt = scratch + 8 * 256;                                // [NMAT][8 TB][16] inputs
        for (int kt = 0; kt < kdim / 16; ++kt) {
            threadgroup_barrier(mem_flags::mem_threadgroup);                      // xt is free again
            for (int i = int(tid); i < NMAT * 8 * TB * 16; i += THREADS) {
                const int k = i % 16, t = (i / 16) % (8 * TB), m = i / (16 * 8 * TB);
                xt[i] = t < count ? float(xbase[m * mat_stride + slot_s[t] * kdim + kt * 16 + k]) : 0.0f;
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            for (int m = 0; m < NMAT; ++m) {
                const int nd = mm_tile_dwords(proj[m].kx2);
                float w[8];
                decode_lane(proj[m].tiles + (kt * proj[m].n16 + jtile) * nd, proj[m].kx2, proj[m].cb, lane, w);
                for (int j = 0; j < 8; ++j) {
                    const int p = 8 * int(lane) + j;
                    wt[mm_tile_row(p) * 16 + mm_tile_col(p)] = w[j];
                }
                simdgroup_barrier(mem_flags::mem_threadgroup);
                for (int kk = 0; kk < 16; kk += 8) {
                    simdgroup_float8x8 B0, B1;
                    simdgroup_load(B0, wt + kk * 16, 16);
                    simdgroup_load(B1, wt + kk * 16 + 8, 16);
                    for (int b = 0; b < TB; ++b) {
                        simdgroup_float8x8 A;
                        simdgroup_load(A, xt + (m * 8 * TB + b * 8) * 16 + kk, 16);
                        simdgroup_multiply_accumulate(acc[m][b][0], A, B0, acc[m][b][0]);
                        simdgroup_multiply_accumulate(acc[m][b][1], A, B1, acc[m][b][1]);
                    }
                }
                simdgroup_barrier(mem_flags::mem_threadgroup);                    // wt is free again
            }
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (int m = 0; m < NMAT; ++m) {
            for (int b = 0; b < TB; ++b) {
                simdgroup_store(acc[m][b][0], st, 16);
                simdgroup_store(acc[m][b][1], st + 8, 16);
                simdgroup_barrier(mem_flags::mem_threadgroup);
                for (int i = int(lane); i < 8 * 16; i += 32) {
                    const int t = b * 8 + i / 16;
                    if (t < count) ep[(m * T + t) * EP_STRIDE + int(sg) * 16 + i % 16] = EP_T(st[i]);
                }
                simdgroup_barrier(mem_flags::mem_threadgroup);
            }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
}

// ---- launch 2: gate + up + SwiGLU ------------------------------------------------------------
template <int T, bool F32, int ENGINE>
kernel void mm_gate_up(constant mm_metal_args &a [[buffer(0)]],
                       device const half *xin [[buffer(1)]],
                       device const int *order [[buffer(2)]],
                       device const mm_metal_tile *tiles [[buffer(3)]],
                       device const uint *gate [[buffer(4)]], device const uint *up [[buffer(5)]],
                       device const half *svh_g [[buffer(6)]], device const half *svh_u [[buffer(7)]],
                       device const half *suh_d [[buffer(8)]],
                       device const uint *sh_gate [[buffer(9)]], device const uint *sh_up [[buffer(10)]],
                       device const half *sh_svh_g [[buffer(11)]], device const half *sh_svh_u [[buffer(12)]],
                       device const half *sh_suh_d [[buffer(13)]],
                       device half *act [[buffer(14)]],
                       uint2 group [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]])
{
    threadgroup half ep[2 * T * EP_STRIDE];
    threadgroup float scratch[ENGINE ? matrix_scratch_floats(T, 2) : 1];
    threadgroup int slot_s[T];
    const mm_metal_tile tile = tiles[group.x];
    const bool shared = tile.expert == a.experts;
    const int e = shared ? 0 : tile.expert, H = a.hidden, I = a.intermediate, col0 = int(group.y) * COLS;
    if (int(tid) < tile.count) slot_s[tid] = order[tile.first + int(tid)];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mm_proj proj[2];
    proj[0].kx2 = shared ? a.kx2[1][0] : fc_kx2_gate;
    proj[0].cb = shared ? a.codebook[1][0] : fc_cb_gate;
    proj[1].kx2 = shared ? a.kx2[1][1] : fc_kx2_up;
    proj[1].cb = shared ? a.codebook[1][1] : fc_cb_up;
    proj[0].n16 = proj[1].n16 = I / 16;
    proj[0].tiles = (shared ? sh_gate : gate) + ulong(e) * ulong(H / 16) * ulong(I / 16) * ulong(mm_tile_dwords(proj[0].kx2));
    proj[1].tiles = (shared ? sh_up : up) + ulong(e) * ulong(H / 16) * ulong(I / 16) * ulong(mm_tile_dwords(proj[1].kx2));
    gemm<T, F32, ENGINE, 2>(proj, xin, a.slots * H, H, col0, slot_s, tile.count, ep, scratch, tid, sg, lane);
    device const half *sg_ = (shared ? sh_svh_g : svh_g + e * I) + col0;
    device const half *su_ = (shared ? sh_svh_u : svh_u + e * I) + col0;
    device const half *sd_ = (shared ? sh_suh_d : suh_d + e * I) + col0;
    const int cl = 4 * int(lane);
    for (int t = int(sg); t < tile.count; t += THREADS / 32) {
        float gv[4], uv[4], v[4];
        for (int i = 0; i < 4; ++i) {
            gv[i] = float(ep[(0 * T + t) * EP_STRIDE + cl + i]);
            uv[i] = float(ep[(1 * T + t) * EP_STRIDE + cl + i]);
        }
        simd_hadamard128(gv, lane);
        simd_hadamard128(uv, lane);
        for (int i = 0; i < 4; ++i) {
            const float gg = round_half(round_half(gv[i]) * float(sg_[cl + i]));
            const float uu = round_half(round_half(uv[i]) * float(su_[cl + i]));
            v[i] = round_half(round_half(round_half(mm_silu(gg)) * uu) * float(sd_[cl + i]));
        }
        simd_hadamard128(v, lane);
        for (int i = 0; i < 4; ++i) act[slot_s[t] * I + col0 + cl + i] = half(v[i]);
    }
}

// ---- launch 3: down ----------------------------------------------------------------------------
template <int T, bool F32, int ENGINE>
kernel void mm_down(constant mm_metal_args &a [[buffer(0)]],
                    device const half *act [[buffer(1)]],
                    device const int *order [[buffer(2)]],
                    device const mm_metal_tile *tiles [[buffer(3)]],
                    device const uint *down_w [[buffer(4)]], device const half *svh [[buffer(5)]],
                    device const uint *sh_down_w [[buffer(6)]], device const half *sh_svh [[buffer(7)]],
                    device float *down [[buffer(8)]],
                    uint2 group [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]])
{
    threadgroup float ep[T * EP_STRIDE];
    threadgroup float scratch[ENGINE ? matrix_scratch_floats(T, 1) : 1];
    threadgroup int slot_s[T];
    const mm_metal_tile tile = tiles[group.x];
    const bool shared = tile.expert == a.experts;
    const int e = shared ? 0 : tile.expert, H = a.hidden, I = a.intermediate, col0 = int(group.y) * COLS;
    if (int(tid) < tile.count) slot_s[tid] = order[tile.first + int(tid)];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mm_proj proj[1];
    proj[0].kx2 = shared ? a.kx2[1][2] : fc_kx2_down;
    proj[0].cb = shared ? a.codebook[1][2] : fc_cb_down;
    proj[0].n16 = H / 16;
    proj[0].tiles = (shared ? sh_down_w : down_w) + ulong(e) * ulong(I / 16) * ulong(H / 16) * ulong(mm_tile_dwords(proj[0].kx2));
    gemm<T, F32, ENGINE, 1>(proj, act, 0, I, col0, slot_s, tile.count, ep, scratch, tid, sg, lane);
    device const half *sv = (shared ? sh_svh : svh + e * H) + col0;
    const int cl = 4 * int(lane);
    for (int t = int(sg); t < tile.count; t += THREADS / 32) {
        float v[4];
        for (int i = 0; i < 4; ++i) v[i] = ep[t * EP_STRIDE + cl + i];
        simd_hadamard128(v, lane);
        for (int i = 0; i < 4; ++i) down[slot_s[t] * H + col0 + cl + i] = float(sv[cl + i]) * v[i];
    }
}

// ---- launch 4: the weighted combine --------------------------------------------------------------
kernel void mm_combine(constant mm_metal_args &a [[buffer(0)]],
                       device const uchar *p [[buffer(1)]],
                       device const float *down [[buffer(2)]],
                       device uchar *out [[buffer(3)]],
                       uint2 pos [[thread_position_in_grid]])
{
    const int h = int(pos.x), t = int(pos.y), H = a.hidden;
    if (h >= H || t >= a.tokens) return;
    float acc = 0.0f;
    for (int j = 0; j < a.top_k; ++j) {
        const int s = t * a.top_k + j;
        acc += load_act(p, a.p_dtype, s) * down[s * H + h];
    }
    acc *= a.routed_scaling_factor;
    if (a.has_shared) acc += down[(a.tokens * a.top_k + t) * H + h];
    store_act(out, a.out_dtype, t * H + h, acc);
}

// ---- the variants (host names are the registry's; native/metal/metal_backend.m looks them up) ------
#define MM_METAL_VARIANT(NAME, T, F32, ENGINE)                                                                  \
    template [[host_name("mm_gate_up_" NAME)]] kernel void mm_gate_up<T, F32, ENGINE>(                          \
        constant mm_metal_args &, device const half *, device const int *, device const mm_metal_tile *,        \
        device const uint *, device const uint *, device const half *, device const half *, device const half *, \
        device const uint *, device const uint *, device const half *, device const half *, device const half *, \
        device half *, uint2, uint, uint, uint);                                                                 \
    template [[host_name("mm_down_" NAME)]] kernel void mm_down<T, F32, ENGINE>(                                \
        constant mm_metal_args &, device const half *, device const int *, device const mm_metal_tile *,        \
        device const uint *, device const half *, device const uint *, device const half *, device float *,     \
        uint2, uint, uint, uint);

// tokens per decoded tile and accumulation as in native/core/variants.def.  The specialised decodes
// (decode_6_2_3, ...) are the decode functions with their rates as the function constants: on Metal
// every pipeline is specialised for its weights' rates, so they need no functions of their own.
MM_METAL_VARIANT("decode", 1, true, 0)
MM_METAL_VARIANT("prefill4", 4, false, 0)
MM_METAL_VARIANT("prefill4_fp32acc", 4, true, 0)
MM_METAL_VARIANT("general", 16, false, 0)
MM_METAL_VARIANT("general_fp32acc", 16, true, 0)
MM_METAL_VARIANT("large_batch", 32, false, 0)
MM_METAL_VARIANT("simd", 32, true, 1)

// ---- decode one projection (tests and tools): one thread per position ------------------------------
kernel void mm_decode(constant int4 &shape [[buffer(0)]],          // k tiles, n tiles, 2K, codebook
                      device const uint *tiles [[buffer(1)]],
                      device ushort *out [[buffer(2)]],
                      uint gid [[thread_position_in_grid]])
{
    const int n_tiles = shape.y, kx2 = shape.z, tile = int(gid) / MM_POSITIONS, p = int(gid) % MM_POSITIONS;
    if (tile >= shape.x * n_tiles) return;
    const int i = tile / n_tiles, j = tile % n_tiles, nd = mm_tile_dwords(kx2);
    const float v = mm_codebook_value(mm_state(tiles + tile * nd, nd, mm_position_end(p, kx2)), shape.w);
    out[(16 * i + mm_tile_row(p)) * (16 * n_tiles) + 16 * j + mm_tile_col(p)] = ushort(mm_float_to_half(v));
}
