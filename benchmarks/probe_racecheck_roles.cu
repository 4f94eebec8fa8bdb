/*
 * Does compute-sanitizer racecheck pair barriers by id?  (NOTES-cuda.md, versions 16 and 17: racecheck
 * reported hazards between two roles' shared-memory accesses that a __syncthreads separates, after the
 * roles had run their own named barriers different numbers of times.)  Stand-alone:
 *   nvcc -arch=native benchmarks/probe_racecheck_roles.cu -o probe_roles   (sm_80 code alone does not run on sm_90)
 *   compute-sanitizer --tool racecheck ./probe_roles
 * 384 threads: warps 0-7 ("MMA") run `bar.sync 1, 256` n1 times, warps 8-11 ("decoders") `bar.sync 2, 128`
 * n2 times; then all threads __syncthreads, the decoders write a shared array, __syncthreads, the MMA
 * threads read it.  The program is race-free, so any hazard racecheck reports is the tool's, and the
 * output (the sum the MMA threads read, checked here) is right either way.
 */
#include <cstdio>

__global__ void roles(int n1, int n2, int *out)
{
    __shared__ int cell[256];
    const int tid = threadIdx.x;
    if (tid < 256) {
        for (int i = 0; i < n1; ++i) asm volatile("bar.sync 1, 256;\n" ::: "memory");
    } else {
        for (int i = 0; i < n2; ++i) asm volatile("bar.sync 2, 128;\n" ::: "memory");
    }
    __syncthreads();
    if (tid >= 256) {
        cell[tid - 256] = tid;
        cell[tid - 128] = tid + 128;
    }
    __syncthreads();
    if (tid < 256) atomicAdd(out, cell[tid]);
}

int main()
{
    int *out = nullptr, failures = 0;
    cudaMalloc(&out, sizeof(int));
    const int runs[][2] = {{3, 3}, {3, 6}, {6, 3}, {0, 5}};
    for (const auto &r : runs) {
        cudaMemset(out, 0, sizeof(int));
        roles<<<1, 384>>>(r[0], r[1], out);
        int got = 0;
        cudaError_t err = cudaGetLastError();
        if (err == cudaSuccess) err = cudaMemcpy(&got, out, sizeof got, cudaMemcpyDeviceToHost);
        if (err != cudaSuccess) {
            printf("launch failed: %s\n", cudaGetErrorString(err));
            return 1;
        }
        const int want = (256 + 511) * 256 / 2;                   /* the cells hold 256 .. 511 */
        printf("n1 %d, n2 %d: sum %d (%s)\n", r[0], r[1], got, got == want ? "right" : "WRONG");
        failures += got != want;
    }
    cudaFree(out);
    return failures ? 1 : 0;
}
