/*
 * A stand-alone check of the wgmma conventions the wgmma wide shape relies on (nvcc
 * -gencode=arch=compute_90a,code=sm_90a benchmarks/probe_wgmma.cu -o probe && ./probe, on an sm_90 GPU):
 * one warpgroup computes D[64 x 128] = A[64 x 16] B[16 x 128] with A in registers in the
 * mma.m16n8k16 A-fragment layout (warp w holds rows 16w..16w+15) and B K-major in shared memory as
 * 8 x 16-byte core matrices, core matrix (k / 8, n / 8) at ((k / 8) * 16 + n / 8) * 128 bytes, read
 * through a descriptor with the given leading (K) and stride (N) byte offsets; D is read back in the
 * m16n8 accumulator layout (d[4f + r]: row g + 8 (r >> 1), column 8 f + 2 c4 + (r & 1)).  Prints the
 * largest error for the assumed descriptor and for the two offsets swapped.
 */
#include <cstdio>
#include <cstdint>
#include <cmath>
#include <cuda_fp16.h>

__global__ void probe(const __half *A, const __half *B, float *D, unsigned lbo, unsigned sbo)
{
    __shared__ __align__(128) __half bs[16 * 128];
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c4 = lane % 4;
    for (int i = tid; i < 16 * 128; i += 128) {           /* B[k][n] -> core matrix layout */
        const int k = i / 128, n = i % 128;
        bs[((k / 8) * 16 + n / 8) * 64 + (n % 8) * 8 + k % 8] = B[k * 128 + n];
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    auto pack = [&](int r, int k) {
        __half2 h = __halves2half2(A[(16 * warp + r) * 16 + k], A[(16 * warp + r) * 16 + k + 1]);
        return *reinterpret_cast<uint32_t *>(&h);
    };
    const uint32_t a0 = pack(g, 2 * c4), a1 = pack(g + 8, 2 * c4), a2 = pack(g, 2 * c4 + 8), a3 = pack(g + 8, 2 * c4 + 8);
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(bs));
    const uint64_t desc = ((addr & 0x3FFFF) >> 4) | (uint64_t)((lbo >> 4) & 0x3FFF) << 16 | (uint64_t)((sbo >> 4) & 0x3FFF) << 32;
    float d[64];
    for (int i = 0; i < 64; ++i) d[i] = 0.0f;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,"
                 "%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,"
                 "%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
    for (int i = 0; i < 64; ++i) {
        const int f = i / 4, r = i % 4;
        D[(16 * warp + g + 8 * (r >> 1)) * 128 + 8 * f + 2 * c4 + (r & 1)] = d[i];
    }
}

int main()
{
    __half hA[64 * 16], hB[16 * 128];
    for (int i = 0; i < 64 * 16; ++i) hA[i] = __float2half((float)((i * 37 % 17) - 8) / 8.0f);
    for (int i = 0; i < 16 * 128; ++i) hB[i] = __float2half((float)((i * 11 % 13) - 6) / 4.0f);
    __half *A, *B;
    float *D, hD[64 * 128];
    cudaMalloc(&A, sizeof hA), cudaMalloc(&B, sizeof hB), cudaMalloc(&D, sizeof hD);
    cudaMemcpy(A, hA, sizeof hA, cudaMemcpyHostToDevice), cudaMemcpy(B, hB, sizeof hB, cudaMemcpyHostToDevice);
    const unsigned layouts[2][2] = {{16 * 128, 128}, {128, 16 * 128}};   /* {LBO, SBO}: assumed, swapped */
    for (int l = 0; l < 2; ++l) {
        cudaMemset(D, 0xFF, sizeof hD);
        probe<<<1, 128>>>(A, B, D, layouts[l][0], layouts[l][1]);
        cudaError_t e = cudaDeviceSynchronize();
        cudaMemcpy(hD, D, sizeof hD, cudaMemcpyDeviceToHost);
        double worst = 0;
        for (int m = 0; m < 64; ++m)
            for (int n = 0; n < 128; ++n) {
                double ref = 0;
                for (int k = 0; k < 16; ++k) ref += (double)__half2float(hA[m * 16 + k]) * __half2float(hB[k * 128 + n]);
                worst = fmax(worst, std::isnan(hD[m * 128 + n]) ? INFINITY : fabs(hD[m * 128 + n] - ref));
            }
        printf("wgmma probe, %s (LBO %u, SBO %u): %s, max |error| %g\n", l ? "offsets swapped" : "assumed layout",
               layouts[l][0], layouts[l][1], cudaGetErrorString(e), worst);
    }
    return 0;
}
