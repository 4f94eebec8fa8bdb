/*
 * The argument struct of one CUDA forward: plain C, shared by the host driver
 * (native/cuda/cuda_backend.cu) and the kernels (shaders/cuda/moe_kernels.cuh), passed by value.
 */
#ifndef MM_CUDA_ARGS_H
#define MM_CUDA_ARGS_H

#include <stdint.h>

/* One projection (all experts): trellis as 32-bit words, expert e at tiles + e * expert_words. */
typedef struct mm_cuda_proj {
    const uint32_t *tiles;
    const uint16_t *suh;            /* [experts, in] fp16 bits */
    const uint16_t *svh;            /* [experts, out] fp16 bits */
    int64_t expert_words;
    int32_t kx2;                    /* 2K */
    int32_t codebook;               /* MM_CB_* */
} mm_cuda_proj;

/* A work item of the GEMM kernels: up to `tokens_per_tile` slots of one expert. */
typedef struct mm_cuda_tile {
    int32_t expert;                 /* experts = the shared expert */
    int32_t first;                  /* index of its first slot in `order` */
    int32_t count;                  /* slots in the tile (1..tokens_per_tile) */
    int32_t unused;
} mm_cuda_tile;

typedef struct mm_cuda_args {
    int32_t hidden, intermediate, experts, has_shared, top_k, tokens_per_tile;
    int32_t rotate_blocks;          /* mm_prep blocks per slot rotating its input */
    int64_t tokens, slots;          /* slots = tokens * top_k (+ tokens for the shared expert) */
    const void *x;                  /* [tokens, hidden] x_dtype */
    const void *ids;                /* [tokens, top_k] int32 / int64 */
    const void *p;                  /* [tokens, top_k] p_dtype */
    void *out;                      /* [tokens, hidden] out_dtype */
    int32_t x_dtype, ids_dtype, p_dtype, out_dtype;   /* mm_dtype values */
    float routed_scaling_factor;
    mm_cuda_proj proj[2][3];        /* [routed, shared][gate, up, down] */
    /* workspace (per stream) */
    uint16_t *xin;                  /* [2][slots][hidden] fp16: rotated inputs of gate, up */
    uint16_t *act;                  /* [slots][intermediate] fp16: rotated input of down */
    float *down;                    /* [slots][hidden] fp32: down outputs, Hadamard and svh applied */
    int32_t *order;                 /* [slots] slots grouped by expert */
    mm_cuda_tile *tiles;            /* [max_tiles] */
    int32_t *ntiles;                /* [1] */
    float *partial;                 /* split K: [max_tiles * column blocks * splits][mat][T][128] */
    int32_t *tickets;               /* split K: [max_tiles * column blocks], zero between calls */
    int32_t *out_tickets;           /* the combine: [tokens][hidden / 128] arrivals, zero between calls */
    unsigned long long *counters;   /* per context: [0] tiles re-run in fp32, [1] invalid expert ids */
} mm_cuda_args;

#endif
