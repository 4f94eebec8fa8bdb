/*
 * The Metal backend (macOS, Apple silicon): device, command queue, the .metallib, a pipeline cache
 * keyed by kernel and specialisation, buffers over the caller's memory, and the four dispatches of
 * a forward (shaders/metal/moe_kernels.metal says what each does).  Objective-C with ARC.
 *
 * Memory: Apple silicon shares memory between CPU and GPU, so the caller's host arrays are wrapped
 * with newBufferWithBytesNoCopy when they start on a page boundary (no copy); an array that does not
 * is copied once into a new buffer (an output is copied back after the GPU is done).  Large NumPy
 * arrays are usually page-aligned; small ones often are not.
 *
 * Routing: the host groups the slots by expert (the CPU backend's counting sort, token order kept)
 * and writes the tile list before encoding, so every dispatch has its exact grid.  A forward is one
 * command buffer; the call waits for it and reports a GPU error through mm_last_error.
 */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <dlfcn.h>
#include <libgen.h>
#include <mach/vm_page_size.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mm_exl3.h"
#include "mm_internal.h"

#include "mm_metal_args.h"          /* the kernels' argument layout (shaders/metal/) */

#define MM_METAL_COLS 128
#define MM_METAL_THREADS 256

@interface MMMetalContext : NSObject
@property(nonatomic, strong) id<MTLDevice> device;
@property(nonatomic, strong) id<MTLCommandQueue> queue;
@property(nonatomic, strong) id<MTLLibrary> library;
@property(nonatomic, strong) NSMutableDictionary<NSString *, id<MTLComputePipelineState>> *pipelines;
@property(nonatomic, strong) NSLock *lock;
@property(nonatomic, strong) id<MTLBuffer> workspace;
@property(nonatomic) char *simd;            /* malloc'ed, freed in dealloc */
@end

@implementation MMMetalContext
- (void)dealloc
{
    free(_simd);
}
@end

static MMMetalContext *mm_metal(const mm_context *ctx) { return (__bridge MMMetalContext *)ctx->impl; }

/* The devices the kernels run on: Apple7 (M1) or newer, which has simdgroup matrices.  Intel and
 * AMD GPUs and the paravirtual device of macOS virtual machines (hosted CI runners) are left out,
 * so `metal_moe.backends()` lists metal only where it can run. */
static NSArray<id<MTLDevice>> *mm_metal_devices(void)
{
    NSMutableArray<id<MTLDevice>> *usable = [NSMutableArray new];
    if (@available(macOS 11.0, *)) {
#if TARGET_OS_OSX
        NSArray<id<MTLDevice>> *all = MTLCopyAllDevices();
#else
        id<MTLDevice> d = MTLCreateSystemDefaultDevice();
        NSArray<id<MTLDevice>> *all = d ? @[ d ] : @[];
#endif
        for (id<MTLDevice> candidate in all)
            if ([candidate supportsFamily:MTLGPUFamilyApple7]) [usable addObject:candidate];
    }
    return usable;
}

int mm_metal_device_count(void)
{
    @autoreleasepool {
        return (int)mm_metal_devices().count;
    }
}

/* The registry variant -> the kernel names' suffix in moe_kernels.metal. */
static const char *mm_metal_suffix(int variant_id)
{
    switch (variant_id) {
    case MM_VARIANT_PREFILL4: return "prefill4";
    case MM_VARIANT_PREFILL4_FP32ACC: return "prefill4_fp32acc";
    case MM_VARIANT_GENERAL: return "general";
    case MM_VARIANT_GENERAL_FP32ACC: return "general_fp32acc";
    case MM_VARIANT_LARGE_BATCH: return "large_batch";
    case MM_VARIANT_SIMD: return "simd";
    default: return "decode";     /* decode and the specialised decodes (function constants) */
    }
}

static int mm_metal_tokens_per_tile(int variant_id) { return mm_variants[variant_id].tokens_per_tile; }

static mm_status mm_metal_error(NSError *error, const char *what)
{
    return mm_fail(MM_ERR_BACKEND, "metal: %s: %s", what,
                   error ? error.localizedDescription.UTF8String : "unknown error");
}

/* A pipeline for `name`, specialised with `constants` (six ints: gate/up/down rates, codebooks) or none. */
static id<MTLComputePipelineState> mm_metal_pipeline(MMMetalContext *m, const char *name, const int32_t *constants,
                                                     mm_status *status)
{
    NSString *key = constants ? [NSString stringWithFormat:@"%s/%d,%d,%d/%d,%d,%d", name, constants[0], constants[1],
                                          constants[2], constants[3], constants[4], constants[5]]
                              : [NSString stringWithUTF8String:name];
    [m.lock lock];
    id<MTLComputePipelineState> p = m.pipelines[key];
    [m.lock unlock];
    if (p) return p;
    NSError *error = nil;
    id<MTLFunction> fn;
    NSString *fname = [NSString stringWithUTF8String:name];
    if (constants) {
        MTLFunctionConstantValues *values = [MTLFunctionConstantValues new];
        for (NSUInteger i = 0; i < 6; ++i) [values setConstantValue:&constants[i] type:MTLDataTypeInt atIndex:i];
        fn = [m.library newFunctionWithName:fname constantValues:values error:&error];
    } else {
        fn = [m.library newFunctionWithName:fname];
    }
    if (!fn) {
        *status = mm_metal_error(error, name);
        return nil;
    }
    p = [m.device newComputePipelineStateWithFunction:fn error:&error];
    if (!p) {
        *status = mm_metal_error(error, "creating a compute pipeline");
        return nil;
    }
    if (p.maxTotalThreadsPerThreadgroup < MM_METAL_THREADS) {   /* the kernels assume 8 simdgroups */
        *status = mm_fail(MM_ERR_UNSUPPORTED, "metal: %s runs at most %lu threads per threadgroup on this device; "
                          "its kernels need %d", name, (unsigned long)p.maxTotalThreadsPerThreadgroup, MM_METAL_THREADS);
        return nil;
    }
    [m.lock lock];
    m.pipelines[key] = p;
    [m.lock unlock];
    return p;
}

/* A buffer over host memory [ptr, ptr + bytes): no copy when ptr is page-aligned, else a copy. */
static id<MTLBuffer> mm_metal_wrap(MMMetalContext *m, const void *ptr, size_t bytes, int *copied)
{
    const size_t page = vm_page_size;
    if (bytes == 0) bytes = 4;
    *copied = 0;
    if (((uintptr_t)ptr % page) == 0) {
        id<MTLBuffer> b = [m.device newBufferWithBytesNoCopy:(void *)ptr length:(bytes + page - 1) / page * page
                                                     options:MTLResourceStorageModeShared deallocator:nil];
        if (b) return b;
    }
    *copied = 1;
    return [m.device newBufferWithBytes:ptr length:bytes options:MTLResourceStorageModeShared];
}

/* Encode one dispatch of `grid` threadgroups of MM_METAL_THREADS: the arguments at index 0, then the
 * buffers (with their offsets) at 1..n. */
static void mm_metal_dispatch(id<MTLComputeCommandEncoder> enc, id<MTLComputePipelineState> pipeline,
                              const mm_metal_args *a, id<MTLBuffer> const __strong *bufs, const NSUInteger *offsets,
                              int n, MTLSize grid)
{
    [enc setComputePipelineState:pipeline];
    [enc setBytes:a length:sizeof *a atIndex:0];
    for (int i = 0; i < n; ++i) [enc setBuffer:bufs[i] offset:offsets[i] atIndex:(NSUInteger)(i + 1)];
    [enc dispatchThreadgroups:grid threadsPerThreadgroup:MTLSizeMake(MM_METAL_THREADS, 1, 1)];
}

static size_t mm_projection_bytes(const mm_projection *p, int in, int out, int experts, int which)
{
    switch (which) {
    case 0: return (size_t)experts * (size_t)(in / 16) * (size_t)(out / 16) * (size_t)mm_tile_dwords(p->bits_x2) * 4;
    case 1: return (size_t)experts * (size_t)in * 2;
    default: return (size_t)experts * (size_t)out * 2;
    }
}

static mm_status mm_metal_forward(mm_context *ctx, const mm_forward_call *call)
{
    @autoreleasepool {
        MMMetalContext *m = mm_metal(ctx);
        const mm_weights *w = call->w;
        const int H = w->hidden, I = w->intermediate, E = w->experts, K = call->top_k;
        const int nexp = E + (w->has_shared ? 1 : 0);
        const int64_t routed = call->tokens * K;
        const int64_t slots = routed + (w->has_shared ? call->tokens : 0);
        if (2 * slots * (H > I ? H : I) >= (1ll << 31))
            return mm_fail(MM_ERR_UNSUPPORTED, "x: too many tokens for one metal call (32-bit offsets); split the batch");
        const int T = mm_metal_tokens_per_tile(call->variant_id);

        /* routing on the host: slot experts, counting sort, tiles */
        int32_t *slot_expert = malloc(sizeof(int32_t) * (size_t)slots);
        int32_t *order = malloc(sizeof(int32_t) * (size_t)slots);
        int64_t *counts = calloc((size_t)nexp + 1, sizeof(int64_t));
        mm_metal_tile *tiles = malloc(sizeof(mm_metal_tile) * (size_t)(slots + nexp));
        if (!slot_expert || !order || !counts || !tiles) {
            free(slot_expert), free(order), free(counts), free(tiles);
            return mm_fail(MM_ERR_OUT_OF_MEMORY, "metal: cannot allocate the routing tables");
        }
        for (int64_t s = 0; s < routed; ++s)
            slot_expert[s] = (int32_t)(call->ids_dtype == MM_I32 ? ((const int32_t *)call->ids)[s]
                                                                  : ((const int64_t *)call->ids)[s]);
        for (int64_t s = routed; s < slots; ++s) slot_expert[s] = E;
        for (int64_t s = 0; s < slots; ++s) counts[slot_expert[s] + 1]++;
        for (int e = 0; e < nexp; ++e) counts[e + 1] += counts[e];
        int ntiles = 0;
        for (int e = 0; e < nexp; ++e)
            for (int64_t first = counts[e]; first < counts[e + 1]; first += T)
                tiles[ntiles++] = (mm_metal_tile){e, (int32_t)first,
                                                   (int32_t)(counts[e + 1] - first < T ? counts[e + 1] - first : T), 0};
        for (int64_t s = 0; s < slots; ++s) order[counts[slot_expert[s]]++] = (int32_t)s;
        free(counts);

        mm_metal_args a;
        memset(&a, 0, sizeof a);
        a.hidden = H, a.intermediate = I, a.experts = E, a.has_shared = w->has_shared ? 1 : 0, a.top_k = K;
        a.tokens = (int32_t)call->tokens, a.slots = (int32_t)slots;
        a.x_dtype = call->x_dtype, a.p_dtype = call->p_dtype, a.out_dtype = call->out_dtype;
        a.routed_scaling_factor = call->routed_scaling_factor;
        const mm_projection *routed_p[3] = {&w->gate, &w->up, &w->down};
        const mm_projection *shared_p[3] = {&w->shared_gate, &w->shared_up, &w->shared_down};
        for (int i = 0; i < 3; ++i) {
            a.kx2[0][i] = routed_p[i]->bits_x2, a.codebook[0][i] = routed_p[i]->codebook;
            const mm_projection *s = w->has_shared ? shared_p[i] : routed_p[i];
            a.kx2[1][i] = s->bits_x2, a.codebook[1][i] = s->codebook;
        }
        const int32_t constants[6] = {a.kx2[0][0], a.kx2[0][1], a.kx2[0][2], a.codebook[0][0], a.codebook[0][1],
                                      a.codebook[0][2]};

        mm_status status = MM_OK;
        char gate_up_name[64], down_name[64];
        snprintf(gate_up_name, sizeof gate_up_name, "mm_gate_up_%s", mm_metal_suffix(call->variant_id));
        snprintf(down_name, sizeof down_name, "mm_down_%s", mm_metal_suffix(call->variant_id));
        id<MTLComputePipelineState> p_inputs = mm_metal_pipeline(m, "mm_inputs", NULL, &status);
        id<MTLComputePipelineState> p_gate_up = p_inputs ? mm_metal_pipeline(m, gate_up_name, constants, &status) : nil;
        id<MTLComputePipelineState> p_down = p_gate_up ? mm_metal_pipeline(m, down_name, constants, &status) : nil;
        id<MTLComputePipelineState> p_combine = p_down ? mm_metal_pipeline(m, "mm_combine", NULL, &status) : nil;
        if (!p_combine) {
            free(slot_expert), free(order), free(tiles);
            return status;
        }

        /* the caller's arrays and the weights (routed, and shared or the routed again as a stand-in) */
        const size_t act_size[3] = {mm_dtype_size(call->x_dtype), mm_dtype_size(call->p_dtype), mm_dtype_size(call->out_dtype)};
        int copied_out = 0, unused = 0;
        id<MTLBuffer> bx = mm_metal_wrap(m, call->x, (size_t)call->tokens * H * act_size[0], &unused);
        id<MTLBuffer> bp = mm_metal_wrap(m, call->p, (size_t)routed * act_size[1], &unused);
        id<MTLBuffer> bout = mm_metal_wrap(m, call->out, (size_t)call->tokens * H * act_size[2], &copied_out);
        id<MTLBuffer> wb[2][3][3];          /* [routed, shared][gate, up, down][trellis, suh, svh] */
        int wrapped = bx && bp && bout;
        for (int r = 0; r < 2; ++r) {
            for (int i = 0; i < 3; ++i) {
                const int in = i == 2 ? I : H, out = i == 2 ? H : I;
                for (int j = 0; j < 3; ++j) {
                    if (r && !w->has_shared) {   /* no shared expert: its slots are never used */
                        wb[r][i][j] = wb[0][i][j];
                        continue;
                    }
                    const mm_projection *pr = r ? shared_p[i] : routed_p[i];
                    const void *ptrs[3] = {pr->trellis, pr->suh, pr->svh};
                    wb[r][i][j] = mm_metal_wrap(m, ptrs[j], mm_projection_bytes(pr, in, out, r ? 1 : E, j), &unused);
                    wrapped &= wb[r][i][j] != nil;
                }
            }
        }
        if (!wrapped) {
            free(slot_expert), free(order), free(tiles);
            return mm_fail(MM_ERR_OUT_OF_MEMORY, "metal: cannot create buffers over the arrays (too large for this "
                           "device, or out of memory)");
        }
        /* workspace: xin [2][slots][H] half, act [slots][I] half, down [slots][H] float, then the tables */
        const size_t off_act = (size_t)2 * slots * H * 2, off_down = off_act + (size_t)slots * I * 2;
        const size_t off_order = off_down + (size_t)slots * H * 4, off_slot = off_order + (size_t)slots * 4;
        const size_t off_tiles = off_slot + (size_t)slots * 4, need = off_tiles + sizeof(mm_metal_tile) * (size_t)(ntiles + 1);
        [m.lock lock];                      /* one forward at a time per context: the workspace is shared */
        if (!m.workspace || m.workspace.length < need)
            m.workspace = [m.device newBufferWithLength:need options:MTLResourceStorageModeShared];
        id<MTLBuffer> ws = m.workspace;
        if (!ws) {
            [m.lock unlock];
            free(slot_expert), free(order), free(tiles);
            return mm_fail(MM_ERR_OUT_OF_MEMORY, "metal: cannot allocate a %zu-byte workspace", need);
        }
        char *base = ws.contents;
        memcpy(base + off_order, order, (size_t)slots * 4);
        memcpy(base + off_slot, slot_expert, (size_t)slots * 4);
        memcpy(base + off_tiles, tiles, sizeof(mm_metal_tile) * (size_t)ntiles);
        free(slot_expert), free(order), free(tiles);

        id<MTLCommandBuffer> cb = [m.queue commandBuffer];
        id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];    /* serial: dispatches run in order */
        {
            id<MTLBuffer> const bufs[] = {bx, ws, wb[0][0][1], wb[0][1][1], wb[1][0][1], wb[1][1][1], ws};
            const NSUInteger offs[] = {0, off_slot, 0, 0, 0, 0, 0};
            mm_metal_dispatch(enc, p_inputs, &a, bufs, offs, 7, MTLSizeMake((NSUInteger)slots, 1, 1));
        }
        {
            id<MTLBuffer> const bufs[] = {ws, ws, ws, wb[0][0][0], wb[0][1][0], wb[0][0][2], wb[0][1][2], wb[0][2][1],
                                          wb[1][0][0], wb[1][1][0], wb[1][0][2], wb[1][1][2], wb[1][2][1], ws};
            const NSUInteger offs[] = {0, off_order, off_tiles, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, off_act};
            mm_metal_dispatch(enc, p_gate_up, &a, bufs, offs, 14, MTLSizeMake((NSUInteger)ntiles, (NSUInteger)(I / MM_METAL_COLS), 1));
        }
        {
            id<MTLBuffer> const bufs[] = {ws, ws, ws, wb[0][2][0], wb[0][2][2], wb[1][2][0], wb[1][2][2], ws};
            const NSUInteger offs[] = {off_act, off_order, off_tiles, 0, 0, 0, 0, off_down};
            mm_metal_dispatch(enc, p_down, &a, bufs, offs, 8, MTLSizeMake((NSUInteger)ntiles, (NSUInteger)(H / MM_METAL_COLS), 1));
        }

        [enc setComputePipelineState:p_combine];
        [enc setBytes:&a length:sizeof a atIndex:0];
        [enc setBuffer:bp offset:0 atIndex:1];
        [enc setBuffer:ws offset:off_down atIndex:2];
        [enc setBuffer:bout offset:0 atIndex:3];
        [enc dispatchThreads:MTLSizeMake((NSUInteger)H, (NSUInteger)call->tokens, 1)
            threadsPerThreadgroup:MTLSizeMake(MM_METAL_THREADS, 1, 1)];
        [enc endEncoding];
        [cb commit];
        [cb waitUntilCompleted];
        [m.lock unlock];
        if (cb.status == MTLCommandBufferStatusError) return mm_metal_error(cb.error, "the forward's command buffer");
        if (copied_out) memcpy(call->out, bout.contents, (size_t)call->tokens * H * act_size[2]);
        return MM_OK;
    }
}

static mm_status mm_metal_decode(mm_context *ctx, const int16_t *trellis, int in_features, int out_features, int kx2,
                                 int codebook, int simd, uint16_t *out)
{
    (void)simd;
    @autoreleasepool {
        MMMetalContext *m = mm_metal(ctx);
        mm_status status = MM_OK;
        id<MTLComputePipelineState> p = mm_metal_pipeline(m, "mm_decode", NULL, &status);
        if (!p) return status;
        const int32_t shape[4] = {in_features / 16, out_features / 16, kx2, codebook};
        const size_t tiles = (size_t)shape[0] * (size_t)shape[1];
        int unused = 0, copied = 0;
        id<MTLBuffer> bt = mm_metal_wrap(m, trellis, tiles * (size_t)mm_tile_dwords(kx2) * 4, &unused);
        id<MTLBuffer> bo = mm_metal_wrap(m, out, (size_t)in_features * out_features * 2, &copied);
        id<MTLCommandBuffer> cb = [m.queue commandBuffer];
        id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
        [enc setComputePipelineState:p];
        [enc setBytes:shape length:sizeof shape atIndex:0];
        [enc setBuffer:bt offset:0 atIndex:1];
        [enc setBuffer:bo offset:0 atIndex:2];
        [enc dispatchThreads:MTLSizeMake(tiles * MM_POSITIONS, 1, 1) threadsPerThreadgroup:MTLSizeMake(MM_METAL_THREADS, 1, 1)];
        [enc endEncoding];
        [cb commit];
        [cb waitUntilCompleted];
        if (cb.status == MTLCommandBufferStatusError) return mm_metal_error(cb.error, "the decode's command buffer");
        if (copied) memcpy(out, bo.contents, (size_t)in_features * out_features * 2);
        return MM_OK;
    }
}

static void mm_metal_destroy(mm_context *ctx)
{
    if (ctx->impl) {
        MMMetalContext *m = (__bridge_transfer MMMetalContext *)ctx->impl;
        (void)m;                             /* released here by ARC */
        ctx->impl = NULL;
    }
}

static int mm_metal_num_threads(const mm_context *ctx) { (void)ctx; return 0; }

static const char *mm_metal_simd(const mm_context *ctx) { return mm_metal(ctx).simd; }

static int mm_metal_has_variant(int variant_id) { return variant_id >= 0 && variant_id < MM_VARIANT_COUNT; }

static const mm_backend_ops mm_metal_ops = {
    .forward = mm_metal_forward,
    .decode = mm_metal_decode,
    .destroy = mm_metal_destroy,
    .num_threads = mm_metal_num_threads,
    .simd = mm_metal_simd,
    .has_variant = mm_metal_has_variant,
    .counters = NULL,
    .route = NULL,
    .alloc = NULL,
    .release = NULL,
    .copy = NULL,
};

/* The .metallib installed next to this library ($METAL_MOE_METALLIB overrides the path). */
static NSString *mm_metal_library_path(void)
{
    const char *env = getenv("METAL_MOE_METALLIB");
    if (env && *env) return [NSString stringWithUTF8String:env];
    Dl_info info;
    if (!dladdr((const void *)&mm_metal_device_count, &info) || !info.dli_fname) return nil;
    char buf[4096];
    strncpy(buf, info.dli_fname, sizeof buf - 1);
    buf[sizeof buf - 1] = '\0';
    return [[NSString stringWithUTF8String:dirname(buf)] stringByAppendingPathComponent:@"metal_moe.metallib"];
}

mm_status mm_metal_context_init(mm_context *ctx, const mm_context_options *options)
{
    (void)options;
    @autoreleasepool {
        NSArray<id<MTLDevice>> *devices = mm_metal_devices();
        if (ctx->device < 0 || (NSUInteger)ctx->device >= devices.count)
            return mm_fail(MM_ERR_INVALID_VALUE, "device: %d is not a Metal device (there are %lu)", ctx->device,
                           (unsigned long)devices.count);
        MMMetalContext *m = [MMMetalContext new];
        m.device = devices[(NSUInteger)ctx->device];      /* Apple7 or newer (mm_metal_devices) */
        m.queue = [m.device newCommandQueue];
        NSString *path = mm_metal_library_path();
        NSError *error = nil;
        m.library = path ? [m.device newLibraryWithURL:[NSURL fileURLWithPath:path] error:&error] : nil;
        if (!m.library || !m.queue)
            return mm_fail(MM_ERR_BACKEND, "metal: cannot load the kernels from %s: %s",
                           path ? path.UTF8String : "(no path)", error ? error.localizedDescription.UTF8String : "");
        m.pipelines = [NSMutableDictionary new];
        m.lock = [NSLock new];
        m.simd = strdup([NSString stringWithFormat:@"metal (%@)", m.device.name].UTF8String);
        ctx->impl = (__bridge_retained void *)m;
        ctx->ops = &mm_metal_ops;
        return MM_OK;
    }
}
