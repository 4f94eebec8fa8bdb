/*
 * moe_example.c — metal_moe from C: random EXL3 expert weights, one forward, status checks.
 *
 * Build against an installed metal_moe (the header and the shared library ship in the wheel):
 *   INC=$(python -c "import metal_moe; print(metal_moe.get_include())")
 *   LIB=$(python -c "import metal_moe; print(metal_moe.get_library())")
 *   cc -std=c11 -I"$INC" moe_example.c "$LIB" -Wl,-rpath,"$(dirname "$LIB")" -o moe_example
 *   ./moe_example
 *
 * Exit status 0 when every call behaved as documented (the forward succeeded with finite
 * results, and a bad call was refused with a message naming the argument).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metal_moe.h"

enum { HIDDEN = 256, INTERMEDIATE = 384, EXPERTS = 4, TOP_K = 2, TOKENS = 3 };

static uint32_t rng_state = 12345u;
static uint32_t next_random(void)
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return rng_state >> 8;
}

/* float -> fp16 bits, for the fp16 scale vectors (round to nearest; values here are normal) */
static uint16_t to_half(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xFFu, man = x & 0x7FFFFFu;
    if (exp < 113) return (uint16_t)sign;                 /* tiny: flush to zero */
    uint32_t h = sign | ((exp - 112u) << 10) | (man >> 13);
    if (man & 0x1000u) h += 1u;                           /* round half up: fine for an example */
    return (uint16_t)h;
}

/* One projection of every expert: uniformly random trellis words, random-sign scales. */
static int make_projection(mm_projection *p, int in, int out, int bits)
{
    size_t words = (size_t)EXPERTS * (in / 16) * (out / 16) * 16 * bits;
    int16_t *trellis = malloc(words * sizeof *trellis);
    uint16_t *suh = malloc((size_t)EXPERTS * in * sizeof *suh);
    uint16_t *svh = malloc((size_t)EXPERTS * out * sizeof *svh);
    if (!trellis || !suh || !svh) return 0;
    for (size_t i = 0; i < words; ++i) trellis[i] = (int16_t)(next_random() & 0xFFFF);
    float scale = 1.0f / (1.24371f * sqrtf((float)in));   /* keeps activations O(1) */
    for (int i = 0; i < EXPERTS * in; ++i) suh[i] = to_half((next_random() & 1 ? scale : -scale));
    for (int i = 0; i < EXPERTS * out; ++i) svh[i] = to_half((next_random() & 1 ? 1.0f : -1.0f));
    p->trellis = trellis;
    p->suh = suh;
    p->svh = svh;
    p->bits_x2 = 2 * bits;
    p->codebook = MM_CODEBOOK_MCG;
    return 1;
}

static void free_projection(mm_projection *p)
{
    free((void *)p->trellis);
    free((void *)p->suh);
    free((void *)p->svh);
}

int main(void)
{
    printf("metal_moe %s (ABI %d)\n", mm_version(), mm_abi_version());
    if (mm_abi_version() != MM_ABI_VERSION) {
        fprintf(stderr, "ABI mismatch: header %d, library %d\n", MM_ABI_VERSION, mm_abi_version());
        return 1;
    }
    mm_context *ctx = NULL;
    mm_status s = mm_context_create(MM_BACKEND_CPU, 0, NULL, &ctx);
    if (s != MM_OK) {
        fprintf(stderr, "mm_context_create: %s: %s\n", mm_status_name(s), mm_last_error());
        return 1;
    }
    printf("cpu context: %d threads, kernels %s\n", mm_context_num_threads(ctx), mm_context_simd(ctx));

    mm_weights w;
    memset(&w, 0, sizeof w);
    w.struct_size = sizeof w;
    w.hidden = HIDDEN;
    w.intermediate = INTERMEDIATE;
    w.experts = EXPERTS;
    if (!make_projection(&w.gate, HIDDEN, INTERMEDIATE, 4) || !make_projection(&w.up, HIDDEN, INTERMEDIATE, 2) ||
        !make_projection(&w.down, INTERMEDIATE, HIDDEN, 3)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }

    float x[TOKENS * HIDDEN], y[TOKENS * HIDDEN], p[TOKENS * TOP_K];
    int32_t ids[TOKENS * TOP_K];
    for (int i = 0; i < TOKENS * HIDDEN; ++i) x[i] = (float)(next_random() % 2001) / 1000.0f - 1.0f;
    for (int t = 0; t < TOKENS; ++t)
        for (int j = 0; j < TOP_K; ++j) {
            ids[t * TOP_K + j] = (t + 2 * j) % EXPERTS;
            p[t * TOP_K + j] = 1.0f / TOP_K;
        }
    for (int i = 0; i < TOKENS * HIDDEN; ++i) y[i] = NAN;
    mm_tensor tx = {x, MM_F32, TOKENS, HIDDEN}, tids = {ids, MM_I32, TOKENS, TOP_K};
    mm_tensor tp = {p, MM_F32, TOKENS, TOP_K}, ty = {y, MM_F32, TOKENS, HIDDEN};
    mm_forward_options o;
    mm_forward_options_init(&o);
    o.variant = "moe_trellis_swiglu_prefill4_fp32acc";

    int failures = 0;
    s = mm_moe_forward(ctx, &w, &tx, &tids, &tp, &ty, &o);
    if (s != MM_OK) {
        fprintf(stderr, "mm_moe_forward: %s: %s\n", mm_status_name(s), mm_last_error());
        failures++;
    } else {
        double norm = 0.0;
        int finite = 1;
        for (int i = 0; i < TOKENS * HIDDEN; ++i) {
            finite &= isfinite(y[i]) != 0;
            norm += (double)y[i] * y[i];
        }
        printf("forward ok: %d tokens, |y| = %.4f, finite = %s\n", TOKENS, sqrt(norm), finite ? "yes" : "no");
        failures += !finite || norm == 0.0;
    }

    /* routing from router logits (softmax top-k, renormalised), then the same forward */
    float logits[TOKENS * EXPERTS];
    for (int i = 0; i < TOKENS * EXPERTS; ++i) logits[i] = (float)(next_random() % 2001) / 500.0f - 2.0f;
    mm_tensor tl = {logits, MM_F32, TOKENS, EXPERTS};
    mm_route_options ro;
    mm_route_options_init(&ro);
    ro.top_k = TOP_K;
    ro.scoring = MM_SCORING_SOFTMAX;
    s = mm_route(ctx, &tl, &ro, &tids, &tp);
    if (s == MM_OK) s = mm_moe_forward(ctx, &w, &tx, &tids, &tp, &ty, &o);
    if (s != MM_OK) {
        fprintf(stderr, "mm_route + mm_moe_forward: %s: %s\n", mm_status_name(s), mm_last_error());
        failures++;
    } else {
        int ok = 1;
        for (int t = 0; t < TOKENS; ++t) {
            float sum = 0.0f;
            for (int j = 0; j < TOP_K; ++j) {
                ok &= ids[t * TOP_K + j] >= 0 && ids[t * TOP_K + j] < EXPERTS;
                sum += p[t * TOP_K + j];
            }
            ok &= fabsf(sum - 1.0f) < 1e-5f;
        }
        printf("routed forward ok: ids in range and weights summing to 1 = %s\n", ok ? "yes" : "no");
        failures += !ok;
    }

    /* a bad call: an expert index out of range is refused before any work */
    ids[1] = EXPERTS;
    s = mm_moe_forward(ctx, &w, &tx, &tids, &tp, &ty, &o);
    printf("bad ids: %s: %s\n", mm_status_name(s), mm_last_error());
    failures += s != MM_ERR_INVALID_VALUE || strncmp(mm_last_error(), "ids:", 4) != 0;

    free_projection(&w.gate);
    free_projection(&w.up);
    free_projection(&w.down);
    mm_context_destroy(ctx);
    printf("%s\n", failures ? "FAILED" : "all checks passed");
    return failures ? 1 : 0;
}
