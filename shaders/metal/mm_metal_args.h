/*
 * The arguments of the Metal kernels: plain C, included by the shaders (moe_kernels.metal) and by
 * the host runtime (native/metal/metal_backend.m), so both see one layout (32-bit fields only).
 */
#ifndef MM_METAL_ARGS_H
#define MM_METAL_ARGS_H

typedef struct mm_metal_args {
    int hidden, intermediate, experts, has_shared, top_k;
    int tokens, slots;
    int x_dtype, p_dtype, out_dtype;          /* mm_dtype: 0 f16, 1 bf16, 2 f32 */
    float routed_scaling_factor;
    int kx2[2][3];                            /* [routed, shared][gate, up, down] */
    int codebook[2][3];
} mm_metal_args;

/* A work item: up to tokens-per-tile slots of one expert (experts = the shared expert). */
typedef struct mm_metal_tile {
    int expert, first, count, unused;
} mm_metal_tile;

#endif
