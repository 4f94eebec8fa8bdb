/*
 * The CUDA backend: contexts, the workspace, pointer checks and the three launches of a forward
 * (shaders/cuda/moe_kernels.cuh says what each does).
 *
 * Stream semantics: everything runs on the stream the caller passes (NULL: the legacy default
 * stream); nothing synchronises the host.  The workspace is owned by the context and sized once
 * for the largest call seen: a call that needs more allocates it (outside graph capture only),
 * and buffers are never freed before the context is, so a captured graph stays valid.  Calls on
 * one context are ordered on the device: a call on another stream than the previous call's waits
 * for it with an event (outside capture).  For concurrent streams, use one context per stream.
 */
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

extern "C" {
#include "mm_internal.h"
}
#include "moe_kernels.cuh"

namespace {

/* ---- the variants on CUDA --------------------------------------------------------------------- */
/* How each registry variant is shaped on CUDA (the registry gives accumulation and bit rates). */
constexpr int cuda_orient(int id)
{
    return id == MM_VARIANT_LARGE_BATCH || id == MM_VARIANT_SIMD ? mm::ORIENT_STD : mm::ORIENT_SWAP;
}
constexpr int cuda_tokens(int id, int tokens) { return id == MM_VARIANT_LARGE_BATCH ? 64 : tokens; }
/* The fp32 variants run the small shape below on every GPU: measured on the H200 faster than two
 * k-groups and three weight stages, by 6-14% at batch 4-64 (prefill4_fp32acc, fp32acc: the policy's
 * choices there when hidden >= 1024; batch 2 -11..+3%), and simd's one k-group with two stages of
 * KC = 128 by 4-19% at batch 2-4096 (NOTES-cuda.md, versions 13 and 14).  The fp16 twins keep two
 * k-groups (small: 19-26% slower at batch 2 on glm/qwen, as they cannot split K across CTAs),
 * large_batch its 64 slots (small: 8-23% slower from batch 1024). */
constexpr bool cuda_small_is_own(int id)
{
    return id == MM_VARIANT_PREFILL4_FP32ACC || id == MM_VARIANT_GENERAL_FP32ACC || id == MM_VARIANT_SIMD;
}
/* warps splitting K inside a CTA: the decode variants (one slot) use one group of 8 warps, so that two
 * 256-thread CTAs share an SM and K splits across CTAs instead */
constexpr int cuda_wk(int id, int tokens) { return cuda_orient(id) == mm::ORIENT_STD || tokens == 1 ? 1 : 2; }
constexpr int cuda_kc(int id, int tokens)
{
    return cuda_tokens(id, tokens) >= 64 ? 128 : cuda_tokens(id, tokens) >= 16 ? 256 : 512;
}

/* The wide shape: 128 slots per tile in the std orientation (each decoded weight tile feeding up to
 * 16 MMAs per projection), for a call whose experts have on average many slots (WIDE128_FROM below),
 * where the own shape would decode every weight several times.  Only the fp32 general variant has
 * one (the policy's choice from batch 33 on when hidden >= 1024): its shared memory (135 KB, the
 * fp32 epilogue rows) fits an sm_80 block; an fp16-accumulating twin would need 198 KB (its fp16 rows
 * after the fp32 ones).  Variants without one run their own shape at every batch.  KC = 64 and 2
 * k-tiles per step keep the staged inputs at 72 KB.
 * On sm_90a (H100/H200: compute capability 9.0 running this library's sm_90a code) the wide shape
 * can run the same tile on wgmma instead of mma.sync (mm::ORIENT_WG), with METAL_MOE_CUDA_WGMMA=1:
 * correct, but measured no faster (NOTES-cuda.md, version 10), so not the default. */
constexpr bool cuda_has_wide(int id) { return id == MM_VARIANT_GENERAL_FP32ACC; }
constexpr int WIDE_TOKENS = 128;
/* ... and its narrow twin: 32 slots per tile, the small shape's one k-group, two weight stages and
 * KC = 128 (for the fp32 general variant the same kernels as simd's, so nothing more to compile).
 * By slots per routed expert (measured, NOTES-cuda.md, version 14): below WIDE32_FROM the own shape
 * (16 slots, 1-6% faster at 2-4), from WIDE32_FROM the 32-slot shape (at 8: 0-11% faster than own; at
 * 16-32: 11-35% faster than 128 slots), from WIDE128_FROM the 128-slot one (at 64: 5-6% faster). */
constexpr int WIDE32_TOKENS = 32;
constexpr int WIDE32_FROM = 8;
constexpr int WIDE128_FROM = 64;
/* The small shape, for GPUs that give a block 99 KB of shared memory (sm_86, sm_89; the other shapes
 * need up to 152 KB): one k-group, two weight stages in flight instead of three, at most 32 slots per
 * tile and K chunks of at most 128 from 16 slots on (large_batch 32 slots instead of 64), so that
 * every variant fits in 87 KB.  The one-slot decode variants fit as they are (56 KB) and keep their
 * own shape.  Such a device runs every call on it (no wide shape); METAL_MOE_CUDA_SMALL=1 forces it
 * on any GPU (how the tests check it on an sm_90 machine). */
constexpr int small_tokens(int id, int tokens) { return std::min(cuda_tokens(id, tokens), 32); }
constexpr int small_kc(int id, int tokens) { return small_tokens(id, tokens) >= 16 ? 128 : cuda_kc(id, tokens); }
constexpr int SMALL_STAGES = 2;
/* The fp16-accumulating variants keep their own shapes (two k-groups of warps, three weight stages)
 * while the own shape's gate/up grid (tile bound x column blocks) is short of SMALL_FROM_WAVES waves,
 * where the in-CTA K split is their only one (an fp16 sum is not split across CTAs), and take the
 * small shape from there on.  Measured (H200, NOTES-cuda.md, version 15), small against own: glm/qwen
 * batch 2 (0.7-0.9 waves of the bound) 19-28% slower, glm batch 4 (1.8 waves) 10-12% slower, qwen
 * batch 4 (1.5 waves) 11-12% faster, deepseek-v3 batch 2 (2.2 waves) 3-5% faster and every preset
 * from batch 8 (2.9 waves and more) 1-16% faster: two waves is the least count at which small never
 * lost.  large_batch (64 slots per tile, small: 32) takes its small shape from one wave of its own
 * grid and below LARGE_SMALL_UNTIL routed slots per expert: small 10-19% faster at 0.25-16 slots per
 * expert once the grid fills a wave, 29-31% slower at glm/qwen batch 2 (0.7-0.9 waves), 2-5% slower
 * at 32 and 8-10% at 64 slots per expert. */
constexpr int SMALL_FROM_WAVES = 2;
constexpr int LARGE_SMALL_UNTIL = 32;

enum { SHAPE_OWN = 0, SHAPE_WIDE = 1, SHAPE_WIDE_WGMMA = 2, SHAPE_SMALL = 3, SHAPE_WIDE32 = 4, SHAPES = 5 };
const char *const shape_names[SHAPES] = {"own", "wide", "wide (wgmma)", "small", "wide"};

struct Launcher {
    void (*gate_up)(const mm_cuda_args);
    void (*down)(const mm_cuda_args);
    size_t smem_gate_up, smem_down;
    int threads, tokens;
    int step_tiles;                         /* k-tiles per CTA step: split K in whole steps */
    bool splittable;                        /* fp32 accumulation: K may be split across CTAs */
};

template <class C>
constexpr Launcher make_launcher()
{
    return {mm::mm_gate_up<C>, mm::mm_down<C>, C::smem_bytes(2), C::smem_bytes(1), C::THREADS, C::T, C::WK * C::U, C::F32};
}

/* [variant][SHAPE_*]: its own shape; its wide shapes (its own again where it has none); its small shape */
template <int ID, class Own, class Wide>
constexpr Launcher wide_launcher()
{
    if constexpr (cuda_has_wide(ID)) return make_launcher<Wide>();
    else return make_launcher<Own>();
}

constexpr int MAX_SPLIT = 4;                /* K splits per output block that choose_splits considers */
constexpr int MAX_FORCED_SPLIT = 8;         /* ... and that METAL_MOE_CUDA_SPLIT may force (to measure) */
constexpr int MAX_SPLIT_ITEMS = 4096;       /* (tile, column block) items that may be split */
constexpr double SPLIT_GAIN = 0.2;          /* the least share of the unsplit waves a split must save */

/* Own_: the full-size shape (cuda_tokens, cuda_wk, cuda_kc, three weight stages); Small_: the small
 * shape (for the one-slot variants their Own_, which fits); Cfg_: the shape a variant runs by
 * default, its Small_ where cuda_small_is_own */
#define MM_VARIANT(ID, name, tile_n, tokens, fp32, g, u, d, FALLBACK)                                            \
    using Own_##ID = mm::Config<cuda_orient(MM_VARIANT_##ID), cuda_tokens(MM_VARIANT_##ID, tokens), (fp32) != 0, \
                                cuda_wk(MM_VARIANT_##ID, tokens), cuda_kc(MM_VARIANT_##ID, tokens), g, u, d>;             \
    using Small_##ID = std::conditional_t<                                                                      \
        (tokens) == 1, Own_##ID,                                                                                \
        mm::Config<cuda_orient(MM_VARIANT_##ID), small_tokens(MM_VARIANT_##ID, tokens), (fp32) != 0, 1,           \
                   small_kc(MM_VARIANT_##ID, tokens), g, u, d, 4, SMALL_STAGES>>;                                 \
    using Cfg_##ID = std::conditional_t<cuda_small_is_own(MM_VARIANT_##ID), Small_##ID, Own_##ID>;              \
    using Wide_##ID = mm::Config<mm::ORIENT_STD, WIDE_TOKENS, (fp32) != 0, 1, 64, g, u, d, 2>;               \
    using WideWG_##ID = mm::Config<mm::ORIENT_WG, WIDE_TOKENS, (fp32) != 0, 1, 64, g, u, d, 2>;                \
    using Wide32_##ID = mm::Config<mm::ORIENT_STD, WIDE32_TOKENS, (fp32) != 0, 1, 128, g, u, d, 4, SMALL_STAGES>;
#include "variants.def"
#undef MM_VARIANT

const Launcher launchers[MM_VARIANT_COUNT][SHAPES] = {
#define MM_VARIANT(ID, name, tile_n, tokens, fp32, g, u, d, FALLBACK)                     \
    {make_launcher<Cfg_##ID>(), wide_launcher<MM_VARIANT_##ID, Cfg_##ID, Wide_##ID>(), \
     wide_launcher<MM_VARIANT_##ID, Cfg_##ID, WideWG_##ID>(), make_launcher<Small_##ID>(),   \
     wide_launcher<MM_VARIANT_##ID, Cfg_##ID, Wide32_##ID>()},
#include "variants.def"
#undef MM_VARIANT
};

struct Buffer {
    void *ptr = nullptr;
    size_t bytes = 0;
};

struct CudaContext {
    int device = 0;
    cudaDeviceProp props{};
    char simd[320] = "";
    std::mutex lock;
    Buffer workspace;                       /* the current one */
    Buffer out_tickets;                     /* the combine's [tokens][hidden / 128] tickets, zero between calls */
    std::vector<Buffer> retired;            /* outgrown, kept alive for captured graphs */
    unsigned long long *counters = nullptr; /* device: [0] fp32 re-runs, [1] invalid ids */
    cudaEvent_t last_done = nullptr;
    int32_t *tickets = nullptr;             /* split K: MAX_SPLIT_ITEMS counters, zero between calls */
    int blocks_per_sm[MM_VARIANT_COUNT][SHAPES][2] = {};   /* [variant][shape][gate_up, down] */
    cudaStream_t last_stream = nullptr;
    bool has_last = false;
    bool pdl = false;                       /* programmatic dependent launches (sm_90+) */
    bool wgmma = false;                     /* sm_90a code runs: the wide shape on wgmma */
    int launches = 3;                       /* < 3: a timing diagnostic (METAL_MOE_CUDA_LAUNCHES) */
    int wide = -1;                          /* METAL_MOE_CUDA_WIDE: -1 by the slots per expert, 0 own, 1 128, 2 32 slots */
    int split = 0;                          /* METAL_MOE_CUDA_SPLIT: 0 chosen per call, 1..MAX_FORCED_SPLIT forced */
    bool trace = false;                     /* METAL_MOE_CUDA_TRACE=1: each forward's launch plan on stderr */
    bool small = false;                     /* every call in SHAPE_SMALL (99 KB devices, METAL_MOE_CUDA_SMALL=1) */
    bool small_rule = true;                 /* fp16 variants' small shape by grid size (METAL_MOE_CUDA_SMALL=0: off) */
};

mm_status cuda_fail(cudaError_t err, const char *what)
{
    return mm_fail(MM_ERR_BACKEND, "cuda: %s failed: %s (%s)", what, cudaGetErrorName(err), cudaGetErrorString(err));
}

/* Make `device` current for the scope, restoring the caller's. */
struct DeviceGuard {
    int previous = -1;
    cudaError_t err = cudaSuccess;
    explicit DeviceGuard(int device)
    {
        if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
        if (previous != device) err = cudaSetDevice(device);
    }
    ~DeviceGuard()
    {
        int now = -1;
        if (previous >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
    }
};

CudaContext *impl(mm_context *ctx) { return static_cast<CudaContext *>(ctx->impl); }

void cuda_destroy(mm_context *ctx)
{
    CudaContext *c = impl(ctx);
    if (!c) return;
    {
        DeviceGuard guard(c->device);
        cudaDeviceSynchronize();            /* work still queued may use the workspace */
        cudaFree(c->workspace.ptr);
        cudaFree(c->out_tickets.ptr);
        for (Buffer &b : c->retired) cudaFree(b.ptr);
        cudaFree(c->counters);
        cudaFree(c->tickets);
        if (c->last_done) cudaEventDestroy(c->last_done);
    }
    delete c;
    ctx->impl = nullptr;
}

int cuda_num_threads(const mm_context *) { return 0; }

const char *cuda_simd(const mm_context *ctx) { return static_cast<const CudaContext *>(ctx->impl)->simd; }

int cuda_has_variant(int id) { return id >= 0 && id < MM_VARIANT_COUNT; }

/* ---- pointer checks ----------------------------------------------------------------------------- */
mm_status check_device_pointer(const void *ptr, int device, const char *name)
{
    if (!ptr) return MM_OK;                 /* NULL with zero size was accepted by the core */
    cudaPointerAttributes attr;
    cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
    if (err != cudaSuccess) {
        cudaGetLastError();
        return mm_fail(MM_ERR_INVALID_VALUE, "%s: %p is not memory the CUDA runtime knows (%s)", name, ptr,
                       cudaGetErrorString(err));
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
        return mm_fail(MM_ERR_INVALID_VALUE,
                       "%s: is host memory, but the 'cuda' backend reads device memory (copy it to device %d "
                       "first, e.g. MoEWeights.to('cuda') / torch .cuda())",
                       name, device);
    if (attr.type == cudaMemoryTypeDevice && attr.device != device)
        return mm_fail(MM_ERR_INVALID_VALUE, "%s: is on CUDA device %d, but the context is on device %d", name,
                       attr.device, device);
    return MM_OK;
}

mm_status check_projection_pointers(const mm_projection *p, int device, const char *name)
{
    char what[64];
    mm_status s;
    snprintf(what, sizeof what, "%s.trellis", name);
    if ((s = check_device_pointer(p->trellis, device, what))) return s;
    snprintf(what, sizeof what, "%s.suh", name);
    if ((s = check_device_pointer(p->suh, device, what))) return s;
    snprintf(what, sizeof what, "%s.svh", name);
    return check_device_pointer(p->svh, device, what);
}

size_t align_up(size_t n) { return (n + 255) & ~static_cast<size_t>(255); }

/* One launch on `stream`; `after_previous`: a programmatic dependent launch, which may start
 * before the previous kernel on the stream ends (the kernel waits for it: griddepcontrol.wait). */
cudaError_t launch(void (*kernel)(const mm_cuda_args), dim3 grid, unsigned threads, size_t smem, cudaStream_t stream,
                   bool after_previous, const mm_cuda_args &a)
{
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = after_previous ? 1 : 0;
    cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, a);
    if (err != cudaSuccess && after_previous) {   /* refused for this stream: an ordinary launch */
        cudaGetLastError();
        cfg.numAttrs = 0;
        err = cudaLaunchKernelEx(&cfg, kernel, a);
    }
    return err;
}

/* At most this many tiles of `tokens` slots hold `slots` slots of `experts` experts (each expert's last
 * tile may be partial). */
int64_t tile_bound(int64_t slots, int tokens, int experts)
{
    return std::min<int64_t>(slots, slots / tokens + std::min<int64_t>(experts, slots));
}

/* How many CTAs share the K loop of each output block: the split count in 2..MAX_SPLIT that minimises
 * waves / splits of `items` (tiles x column blocks), but only where that saves at least SPLIT_GAIN of
 * the unsplit waves; otherwise 1.  Writing and adding the partial sums is not free: splits that saved
 * 2-11% of the modelled waves made glm and qwen up to 2x slower (NOTES-cuda.md, version 9).
 * forced > 0 (METAL_MOE_CUDA_SPLIT): that count wherever splitting is possible, capped at the steps. */
int choose_splits(const Launcher &L, int64_t items, int ktiles, int capacity, int forced)
{
    if (!L.splittable || items > MAX_SPLIT_ITEMS) return 1;
    const int steps = ktiles / L.step_tiles;
    if (forced > 0) return std::max(1, std::min(forced, steps));
    int best = 1;
    const double unsplit = static_cast<double>((items + capacity - 1) / capacity);
    double best_cost = unsplit;
    for (int s = 2; s <= MAX_SPLIT && s <= steps; ++s) {
        const double cost = static_cast<double>((items * s + capacity - 1) / capacity) / s;
        if (cost < best_cost - 1e-9) best = s, best_cost = cost;
    }
    return best_cost <= (1.0 - SPLIT_GAIN) * unsplit ? best : 1;
}

mm_cuda_proj view(const mm_projection &p, int in, int out)
{
    mm_cuda_proj v;
    v.tiles = reinterpret_cast<const uint32_t *>(p.trellis);
    v.suh = p.suh;
    v.svh = p.svh;
    v.expert_words = static_cast<int64_t>(in / 16) * (out / 16) * mm_tile_dwords(p.bits_x2);
    v.kx2 = p.bits_x2;
    v.codebook = p.codebook;
    return v;
}

/* Make `buf` hold at least `need` bytes (zeroed on `stream` if `zero`, before any kernel of the call).
 * An outgrown buffer is retired, not freed: captured graphs may still use it.  A capture must not
 * allocate: cudaErrorStreamCaptureUnsupported then. */
cudaError_t grow(CudaContext *c, Buffer &buf, size_t need, bool capturing, bool zero, cudaStream_t stream)
{
    if (buf.bytes >= need) return cudaSuccess;
    if (capturing) return cudaErrorStreamCaptureUnsupported;
    Buffer b;
    cudaError_t err = cudaMalloc(&b.ptr, need);
    if (err == cudaSuccess && zero) err = cudaMemsetAsync(b.ptr, 0, need, stream);
    if (err != cudaSuccess) {
        cudaGetLastError();
        cudaFree(b.ptr);
        return err;
    }
    b.bytes = need;
    if (buf.ptr) c->retired.push_back(buf);
    buf = b;
    return cudaSuccess;
}

mm_status grow_failed(cudaError_t err, const char *what, size_t need, int device)
{
    if (err == cudaErrorStreamCaptureUnsupported)
        return mm_fail(MM_ERR_UNSUPPORTED,
                       "workspace: this call needs %zu bytes of %s and the stream is being captured into a graph, "
                       "where nothing may be allocated; run one call of at least this batch size before capturing "
                       "(the workspace is sized once per context)", need, what);
    return mm_fail(MM_ERR_OUT_OF_MEMORY, "workspace: cannot allocate %zu bytes of %s on CUDA device %d (%s)", need,
                   what, device, cudaGetErrorString(err));
}

mm_status cuda_forward(mm_context *ctx, const mm_forward_call *call)
{
    CudaContext *c = impl(ctx);
    const mm_weights *w = call->w;
    DeviceGuard guard(c->device);
    if (guard.err != cudaSuccess) return cuda_fail(guard.err, "cudaSetDevice");
    mm_status s;
    const int dev = c->device;
    if ((s = check_device_pointer(call->x, dev, "x")) || (s = check_device_pointer(call->ids, dev, "ids")) ||
        (s = check_device_pointer(call->p, dev, "p")) || (s = check_device_pointer(call->out, dev, "out")) ||
        (s = check_projection_pointers(&w->gate, dev, "weights.gate")) ||
        (s = check_projection_pointers(&w->up, dev, "weights.up")) ||
        (s = check_projection_pointers(&w->down, dev, "weights.down")))
        return s;
    if (w->has_shared &&
        ((s = check_projection_pointers(&w->shared_gate, dev, "weights.shared_gate")) ||
         (s = check_projection_pointers(&w->shared_up, dev, "weights.shared_up")) ||
         (s = check_projection_pointers(&w->shared_down, dev, "weights.shared_down"))))
        return s;
    const int nexp = w->experts + (w->has_shared ? 1 : 0);
    if (nexp > mm::MAX_EXPERTS)
        return mm_fail(MM_ERR_UNSUPPORTED, "weights.experts: the cuda backend groups at most %d experts (with the "
                       "shared one) per call, got %d", mm::MAX_EXPERTS, nexp);
    const int H = w->hidden, I = w->intermediate;
    const int64_t routed_slots = call->tokens * call->top_k;
    const int64_t slots = routed_slots + (w->has_shared ? call->tokens : 0);
    /* 0: own shape, 1: 128-slot wide, 2: 32-slot wide, by slots per routed expert (WIDE32_FROM above) */
    const int64_t experts = w->experts;
    const int wide = !cuda_has_wide(call->variant_id) ? 0
                     : c->wide >= 0 ? c->wide
                     : routed_slots < WIDE32_FROM * experts ? 0 : routed_slots < WIDE128_FROM * experts ? 2 : 1;
    int shape = c->small ? SHAPE_SMALL : wide == 0 ? SHAPE_OWN : wide == 2 ? SHAPE_WIDE32
                : c->wgmma ? SHAPE_WIDE_WGMMA : SHAPE_WIDE;
    const int sms = c->props.multiProcessorCount;
    const Launcher &own = launchers[call->variant_id][SHAPE_OWN];
    if (shape == SHAPE_OWN && c->small_rule && launchers[call->variant_id][SHAPE_SMALL].gate_up != own.gate_up) {
        const bool large = call->variant_id == MM_VARIANT_LARGE_BATCH;
        const int64_t own_items = tile_bound(slots, own.tokens, nexp) * (I / mm::COLS);
        const int64_t wave = static_cast<int64_t>(sms) * c->blocks_per_sm[call->variant_id][SHAPE_OWN][0];
        if (own_items >= (large ? 1 : SMALL_FROM_WAVES) * wave &&
            (!large || routed_slots < LARGE_SMALL_UNTIL * experts))
            shape = SHAPE_SMALL;
    }
    const Launcher &L = launchers[call->variant_id][shape];
    if (2 * slots * (H > I ? H : I) >= (1ll << 31))
        return mm_fail(MM_ERR_UNSUPPORTED, "x: %lld tokens x %d slots is too many for one cuda call (the workspace "
                       "is indexed with 32-bit offsets); split the batch", (long long)call->tokens,
                       (int)(slots / call->tokens));
    const int64_t max_tiles = tile_bound(slots, L.tokens, nexp);
    const int *occupancy = c->blocks_per_sm[call->variant_id][shape];
    const int64_t items_gu = max_tiles * (I / mm::COLS), items_dn = max_tiles * (H / mm::COLS);
    int split_gu = choose_splits(L, items_gu, H / 16, sms * occupancy[0], c->split);
    int split_dn = choose_splits(L, items_dn, I / 16, sms * occupancy[1], c->split);
    if (c->trace)
        std::fprintf(stderr, "metal_moe cuda: %lld tokens, variant %d, %s shape (%d slots per tile), <= %lld tiles; "
                     "gate_up %lld items, %d CTAs per wave, K split %d; down %lld items, %d per wave, K split %d\n",
                     (long long)call->tokens, call->variant_id, shape_names[shape], L.tokens, (long long)max_tiles,
                     (long long)items_gu, sms * occupancy[0], split_gu, (long long)items_dn, sms * occupancy[1], split_dn);
    size_t partial_floats = std::max<size_t>(
        split_gu > 1 ? 2ull * items_gu * split_gu * L.tokens * mm::COLS : 0,
        split_dn > 1 ? 1ull * items_dn * split_dn * L.tokens * mm::COLS : 0);

    /* workspace layout */
    const size_t off_xin = 0;
    const size_t off_act = off_xin + align_up(2ull * slots * H * 2);
    const size_t off_down = off_act + align_up(1ull * slots * I * 2);
    const size_t off_order = off_down + align_up(1ull * slots * H * 4);
    const size_t off_tiles = off_order + align_up(1ull * slots * 4);
    const size_t off_ntiles = off_tiles + align_up(1ull * max_tiles * sizeof(mm_cuda_tile));
    const size_t off_partial = off_ntiles + 256;
    size_t need = off_partial + align_up(partial_floats * 4);

    cudaStream_t stream = static_cast<cudaStream_t>(call->stream);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cudaError_t err = cudaStreamIsCapturing(stream, &capture);
    if (err != cudaSuccess) return cuda_fail(err, "cudaStreamIsCapturing");
    const bool capturing = capture != cudaStreamCaptureStatusNone;

    std::lock_guard<std::mutex> hold(c->lock);
    if (capturing && c->workspace.bytes < need && c->workspace.bytes >= off_partial) {
        /* a capture must not allocate: a call whose only extra need is split-K partials (a small
         * batch after a warm-up at a larger one) runs unsplit instead */
        split_gu = split_dn = 1;
        partial_floats = 0;
        need = off_partial;
    }
    if ((err = grow(c, c->workspace, need, capturing, false, stream)) != cudaSuccess)
        return grow_failed(err, "workspace", need, dev);
    const size_t ticket_bytes = 4ull * call->tokens * (H / mm::COLS);
    if ((err = grow(c, c->out_tickets, ticket_bytes, capturing, true, stream)) != cudaSuccess)
        return grow_failed(err, "combine tickets", ticket_bytes, dev);
    if (!capturing && c->has_last && c->last_stream != stream) {
        err = cudaStreamWaitEvent(stream, c->last_done, 0);
        if (err != cudaSuccess) return cuda_fail(err, "cudaStreamWaitEvent");
    }
    char *ws = static_cast<char *>(c->workspace.ptr);

    mm_cuda_args a;
    memset(&a, 0, sizeof a);
    a.hidden = H;
    a.intermediate = I;
    a.experts = w->experts;
    a.has_shared = w->has_shared ? 1 : 0;
    a.top_k = call->top_k;
    a.tokens_per_tile = L.tokens;
    a.tokens = call->tokens;
    a.slots = slots;
    a.x = call->x;
    a.ids = call->ids;
    a.p = call->p;
    a.out = call->out;
    a.x_dtype = call->x_dtype;
    a.ids_dtype = call->ids_dtype == MM_I32 ? mm::DT_I32 : MM_I64;
    a.p_dtype = call->p_dtype;
    a.out_dtype = call->out_dtype;
    a.routed_scaling_factor = call->routed_scaling_factor;
    a.proj[0][0] = view(w->gate, H, I);
    a.proj[0][1] = view(w->up, H, I);
    a.proj[0][2] = view(w->down, I, H);
    if (w->has_shared) {
        a.proj[1][0] = view(w->shared_gate, H, I);
        a.proj[1][1] = view(w->shared_up, H, I);
        a.proj[1][2] = view(w->shared_down, I, H);
    } else {
        a.proj[1][0] = a.proj[0][0];
        a.proj[1][1] = a.proj[0][1];
        a.proj[1][2] = a.proj[0][2];
    }
    a.xin = reinterpret_cast<uint16_t *>(ws + off_xin);
    a.act = reinterpret_cast<uint16_t *>(ws + off_act);
    a.down = reinterpret_cast<float *>(ws + off_down);
    a.order = reinterpret_cast<int32_t *>(ws + off_order);
    a.tiles = reinterpret_cast<mm_cuda_tile *>(ws + off_tiles);
    a.ntiles = reinterpret_cast<int32_t *>(ws + off_ntiles);
    a.partial = reinterpret_cast<float *>(ws + off_partial);
    a.tickets = c->tickets;
    a.out_tickets = static_cast<int32_t *>(c->out_tickets.ptr);
    a.counters = c->counters;
    /* mm_prep: the routing block (none for direct tiles), then enough blocks per slot that a small
     * batch's rotation covers about two blocks per SM (8 warps a block, one Hadamard block a warp) */
    const int route_blocks = L.tokens == 1 ? 0 : 1;
    const int64_t had_blocks = 2ll * H / MM_HAD, warps = mm::PREP_THREADS / 32;
    a.rotate_blocks = static_cast<int32_t>(
        std::max<int64_t>(1, std::min<int64_t>((had_blocks + warps - 1) / warps, 2ll * sms / slots)));

    const bool pdl = c->pdl;
    if ((err = launch(mm::mm_prep, dim3(static_cast<unsigned>(route_blocks + slots * a.rotate_blocks)),
                      mm::PREP_THREADS, 0, stream, false, a)) != cudaSuccess)
        return cuda_fail(err, "launch of mm_prep");
    if (c->launches >= 2 &&
        (err = launch(L.gate_up, dim3(static_cast<unsigned>(max_tiles), I / mm::COLS, split_gu), L.threads,
                      L.smem_gate_up, stream, pdl, a)) != cudaSuccess)
        return cuda_fail(err, "launch of mm_gate_up");
    if (c->launches >= 3 &&
        (err = launch(L.down, dim3(static_cast<unsigned>(max_tiles), H / mm::COLS, split_dn), L.threads, L.smem_down,
                      stream, pdl, a)) != cudaSuccess)
        return cuda_fail(err, "launch of mm_down");
    if (!capturing) {
        if ((err = cudaEventRecord(c->last_done, stream)) != cudaSuccess) return cuda_fail(err, "cudaEventRecord");
        c->last_stream = stream;
        c->has_last = true;
    }
    return MM_OK;
}

mm_status cuda_decode(mm_context *ctx, const int16_t *trellis, int in_features, int out_features, int kx2,
                      int codebook, int simd, uint16_t *out)
{
    (void)simd;
    CudaContext *c = impl(ctx);
    DeviceGuard guard(c->device);
    if (guard.err != cudaSuccess) return cuda_fail(guard.err, "cudaSetDevice");
    mm_status s;
    if ((s = check_device_pointer(trellis, c->device, "trellis")) || (s = check_device_pointer(out, c->device, "out")))
        return s;
    const int64_t tiles = static_cast<int64_t>(in_features / 16) * (out_features / 16);
    const int per_block = 8;
    mm::mm_decode<<<static_cast<unsigned>((tiles + per_block - 1) / per_block), 32 * per_block>>>(
        reinterpret_cast<const uint32_t *>(trellis), in_features / 16, out_features / 16, kx2, codebook, out);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return cuda_fail(err, "launch of mm_decode");
    if ((err = cudaStreamSynchronize(nullptr)) != cudaSuccess) return cuda_fail(err, "mm_decode");
    return MM_OK;
}

mm_status cuda_counters(mm_context *ctx, uint64_t *values, int n)
{
    CudaContext *c = impl(ctx);
    DeviceGuard guard(c->device);
    unsigned long long host[2] = {0, 0};
    cudaError_t err = cudaMemcpy(host, c->counters, sizeof host, cudaMemcpyDeviceToHost);
    if (err != cudaSuccess) return cuda_fail(err, "reading the counters");
    for (int i = 0; i < n && i < 2; ++i) values[i] = host[i];
    return MM_OK;
}

mm_status cuda_alloc(mm_context *ctx, size_t bytes, void **ptr)
{
    DeviceGuard guard(impl(ctx)->device);
    cudaError_t err = guard.err == cudaSuccess ? cudaMalloc(ptr, bytes) : guard.err;
    if (err != cudaSuccess) {
        cudaGetLastError();
        *ptr = nullptr;
        return mm_fail(MM_ERR_OUT_OF_MEMORY, "cuda: cannot allocate %zu bytes on device %d (%s)", bytes,
                       impl(ctx)->device, cudaGetErrorString(err));
    }
    return MM_OK;
}

mm_status cuda_release(mm_context *ctx, void *ptr)
{
    DeviceGuard guard(impl(ctx)->device);
    cudaError_t err = cudaFree(ptr);
    return err == cudaSuccess ? MM_OK : cuda_fail(err, "cudaFree");
}

mm_status cuda_copy(mm_context *ctx, void *dst, const void *src, size_t bytes)
{
    DeviceGuard guard(impl(ctx)->device);
    cudaError_t err = cudaMemcpy(dst, src, bytes, cudaMemcpyDefault);
    return err == cudaSuccess ? MM_OK : cuda_fail(err, "cudaMemcpy");
}

mm_status cuda_route(mm_context *ctx, const mm_tensor *logits, const mm_route_options *o, const mm_tensor *ids,
                     const mm_tensor *p)
{
    CudaContext *c = impl(ctx);
    DeviceGuard guard(c->device);
    if (guard.err != cudaSuccess) return cuda_fail(guard.err, "cudaSetDevice");
    mm_status s;
    if ((s = check_device_pointer(logits->data, c->device, "logits")) ||
        (s = check_device_pointer(ids->data, c->device, "ids")) || (s = check_device_pointer(p->data, c->device, "p")) ||
        (s = check_device_pointer(o->bias, c->device, "bias")))
        return s;
    if (logits->cols > 32 * mm::ROUTE_MAX_PER_LANE)
        return mm_fail(MM_ERR_UNSUPPORTED, "logits: the cuda router takes at most %d experts, got %lld",
                       32 * mm::ROUTE_MAX_PER_LANE, (long long)logits->cols);
    if (o->top_k > mm::ROUTE_MAX_TOP_K)
        return mm_fail(MM_ERR_UNSUPPORTED, "top_k: the cuda router takes at most %d, got %d", mm::ROUTE_MAX_TOP_K,
                       o->top_k);
    if (logits->rows == 0) return MM_OK;
    mm::RouteArgs r;
    r.logits = logits->data;
    r.bias = o->bias;
    r.ids = static_cast<int32_t *>(ids->data);
    r.p = static_cast<float *>(p->data);
    r.tokens = logits->rows;
    r.experts = static_cast<int32_t>(logits->cols);
    r.top_k = o->top_k;
    r.dtype = logits->dtype;
    r.sigmoid = o->scoring == MM_SCORING_SIGMOID;
    r.renormalize = o->renormalize != 0;
    const int64_t threads = 32 * logits->rows;
    mm::mm_route_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, static_cast<cudaStream_t>(o->stream)>>>(r);
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? MM_OK : cuda_fail(err, "launch of mm_route_kernel");
}

const mm_backend_ops cuda_ops = {
    cuda_forward, cuda_decode, cuda_destroy, cuda_num_threads, cuda_simd, cuda_has_variant, cuda_counters,
    cuda_route,   cuda_alloc,  cuda_release, cuda_copy,
};

}  // namespace

extern "C" int mm_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

/* A one-digit environment setting: its value if it is exactly one digit in lo..hi, else `unset`. */
static int env_digit(const char *name, int lo, int hi, int unset)
{
    const char *v = getenv(name);
    return v && v[0] >= '0' + lo && v[0] <= '0' + hi && !v[1] ? v[0] - '0' : unset;
}

extern "C" mm_status mm_cuda_context_init(mm_context *ctx, const mm_context_options *options)
{
    (void)options;
    CudaContext *c = new (std::nothrow) CudaContext;
    if (!c) return mm_fail(MM_ERR_OUT_OF_MEMORY, "context: out of memory");
    c->device = ctx->device;
    ctx->impl = c;
    ctx->ops = &cuda_ops;
    DeviceGuard guard(c->device);
    cudaError_t err = guard.err;
    if (err == cudaSuccess) err = cudaGetDeviceProperties(&c->props, c->device);
    if (err != cudaSuccess) {
        cuda_destroy(ctx);
        return cuda_fail(err, "opening the device");
    }
    if (c->props.major < 8) {
        const int major = c->props.major, minor = c->props.minor;
        cuda_destroy(ctx);
        return mm_fail(MM_ERR_UNSUPPORTED, "device: compute capability %d.%d; the cuda kernels need 8.0 or newer",
                       major, minor);
    }
    /* Diagnostics for measurements, read once per context: METAL_MOE_CUDA_PDL=0 turns the programmatic
     * dependent launches off (A/B in one run); METAL_MOE_CUDA_LAUNCHES=1..2 issues only the first
     * launches of each forward (the output is then NOT written), to time each launch's share of a
     * graph replay; METAL_MOE_CUDA_WIDE=0 / 1 / 2 takes a variant's own / 128-slot wide / 32-slot wide
     * shape (where it has them) instead of choosing by slots per expert; METAL_MOE_CUDA_SPLIT=1..8
     * splits K that many ways wherever a call may split (fp32 accumulation) instead of choosing by
     * occupancy;
     * METAL_MOE_CUDA_TRACE=1 prints each forward's shape, tile bound, capacity and splits to stderr;
     * METAL_MOE_CUDA_WGMMA=1 runs the wide shape on wgmma where the sm_90a code runs (else mma.sync);
     * METAL_MOE_CUDA_SMALL=1 runs every call in the small shapes of 99 KB devices (read further down), =0
     * keeps the fp16-accumulating variants in their own shapes at every batch. */
    c->pdl = c->props.major >= 9 && env_digit("METAL_MOE_CUDA_PDL", 0, 0, 1) != 0;
    c->launches = env_digit("METAL_MOE_CUDA_LAUNCHES", 1, 2, 3);
    c->wide = env_digit("METAL_MOE_CUDA_WIDE", 0, 2, -1);
    c->split = env_digit("METAL_MOE_CUDA_SPLIT", 1, MAX_FORCED_SPLIT, 0);
    c->trace = env_digit("METAL_MOE_CUDA_TRACE", 1, 1, 0) == 1;
    if ((err = cudaMalloc(&c->counters, 2 * sizeof(unsigned long long))) != cudaSuccess ||
        (err = cudaMemset(c->counters, 0, 2 * sizeof(unsigned long long))) != cudaSuccess ||
        (err = cudaEventCreateWithFlags(&c->last_done, cudaEventDisableTiming)) != cudaSuccess ||
        (err = cudaMalloc(&c->tickets, MAX_SPLIT_ITEMS * sizeof(int32_t))) != cudaSuccess) {
        cuda_destroy(ctx);
        return cuda_fail(err, "creating the context");
    }
    /* wgmma (off unless asked for: measured 1-5% slower than mma.sync at batch 4096, NOTES-cuda.md,
     * version 10): compute capability 9.0 exactly (sm_90a code runs on no other), and the probe kernel
     * says the code the driver loaded is that (not the compute_90 PTX, e.g. under
     * CUDA_FORCE_PTX_JIT=1); it writes into the split tickets, zeroed next */
    const bool sm90 = c->props.major == 9 && c->props.minor == 0;
    const bool want_wgmma = sm90 && env_digit("METAL_MOE_CUDA_WGMMA", 0, 1, 0) == 1;
    int wgmma_code = 0;
    if (want_wgmma) {
        mm::mm_wgmma_probe<<<1, 1>>>(c->tickets);
        if ((err = cudaGetLastError()) == cudaSuccess)
            err = cudaMemcpy(&wgmma_code, c->tickets, sizeof wgmma_code, cudaMemcpyDeviceToHost);
    }
    if (err != cudaSuccess || (err = cudaMemset(c->tickets, 0, MAX_SPLIT_ITEMS * sizeof(int32_t))) != cudaSuccess ||
        (err = cudaDeviceSynchronize()) != cudaSuccess) {          /* zeroed before any stream uses them */
        cuda_destroy(ctx);
        return cuda_fail(err, "creating the context");
    }
    /* every kernel of the shapes this device runs must get its shared memory, dynamic + static: the own
     * and wide shapes need up to 152 KB (sm_80 and sm_90 give 163 and 227 KB per block), the small
     * ones at most 87 KB (sm_86/89 give 99 KB) */
    size_t smem_need[SHAPES] = {};
    for (int v = 0; v < SHAPES * MM_VARIANT_COUNT; ++v) {
        const Launcher &L = launchers[v / SHAPES][v % SHAPES];
        cudaFuncAttributes gu{}, dn{};
        if ((err = cudaFuncGetAttributes(&gu, L.gate_up)) != cudaSuccess ||
            (err = cudaFuncGetAttributes(&dn, L.down)) != cudaSuccess) {
            cuda_destroy(ctx);
            return cuda_fail(err, "reading the kernels' attributes");
        }
        size_t &need = smem_need[v % SHAPES];
        need = std::max({need, L.smem_gate_up + gu.sharedSizeBytes, L.smem_down + dn.sharedSizeBytes});
    }
    const size_t have = c->props.sharedMemPerBlockOptin;
    const size_t need_big = std::max({smem_need[SHAPE_OWN], smem_need[SHAPE_WIDE], smem_need[SHAPE_WIDE_WGMMA],
                                      smem_need[SHAPE_WIDE32]});
    const int small_code = env_digit("METAL_MOE_CUDA_SMALL", 0, 1, -1);
    c->small = need_big > have || small_code == 1;
    c->small_rule = small_code != 0;
    if (c->small && smem_need[SHAPE_SMALL] > have) {
        const int major = c->props.major, minor = c->props.minor;
        cuda_destroy(ctx);
        return mm_fail(MM_ERR_UNSUPPORTED, "device: compute capability %d.%d allows %zu bytes of shared memory per "
                       "block; the cuda kernels need %zu (their small shapes; the others %zu)", major, minor, have,
                       smem_need[SHAPE_SMALL], need_big);
    }
    c->wgmma = wgmma_code == 1 && !c->small;
    for (int v = 0; v < SHAPES * MM_VARIANT_COUNT; ++v) {
        if (c->small && v % SHAPES != SHAPE_SMALL) continue;         /* a shape this context never runs */
        const Launcher &L = launchers[v / SHAPES][v % SHAPES];
        if ((err = cudaFuncSetAttribute(L.gate_up, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(L.smem_gate_up))) != cudaSuccess ||
            (err = cudaFuncSetAttribute(L.down, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(L.smem_down))) != cudaSuccess) {
            cuda_destroy(ctx);
            return cuda_fail(err, "setting the kernels' shared-memory limits");
        }
        for (int k = 0; k < 2; ++k) {
            int n = 0;
            err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k ? L.down : L.gate_up, L.threads,
                                                                k ? L.smem_down : L.smem_gate_up);
            if (err != cudaSuccess) {
                cuda_destroy(ctx);
                return cuda_fail(err, "reading the kernels' occupancy");
            }
            c->blocks_per_sm[v / SHAPES][v % SHAPES][k] = n > 0 ? n : 1;
        }
    }
    char split_text[32] = "", small_text[80] = "";
    if (c->split) snprintf(split_text, sizeof split_text, ", K split forced to %d", c->split);
    if (c->small)
        snprintf(small_text, sizeof small_text, ", small shapes (%zu KB of shared memory per block)", have / 1024);
    else if (!c->small_rule)
        snprintf(small_text, sizeof small_text, ", fp16 variants in their own shapes only");
    snprintf(c->simd, sizeof c->simd, "sm_%d%d (%s, %d SMs%s%s%s%s%s%s)", c->props.major, c->props.minor,
             c->props.name, c->props.multiProcessorCount, c->pdl ? ", programmatic launches" : "",
             c->wgmma ? ", wgmma wide tiles" : c->small ? "" : want_wgmma ? ", wgmma unavailable (no sm_90a code loaded)"
                                              : sm90 ? ", wgmma off" : "",
             small_text, c->small ? "" : c->wide == 0 ? ", wide tiles off" : c->wide == 1 ? ", wide tiles always"
                                        : c->wide == 2 ? ", 32-slot wide tiles always" : "",
             split_text,
             c->launches < 3 ? ", TIMING ONLY: first launches of each forward, no output" : "");
    return MM_OK;
}
