"""Calls for `ncu` (benchmarks/cuda_device.sh profile): per case, one warm-up call then one
profiled call (the launches of the second call are the ones to read).

Cases: batch 1 of each preset with the policy's variant, glm-4.7-flash at batch 64 (policy), deepseek-v3
at 16 and glm-4.7-flash / deepseek-v3 at 512 (policy: the wide shape at 512), glm-4.7-flash at batch
4096 with `large_batch`, and glm-4.7-flash / qwen3-30b-a3b at 4096 with the policy's
`moe_trellis_swiglu_fp32acc` (its wide shape).  `python3 cuda_profile.py CASE...` runs a subset (names below).
"""
import sys

import numpy as np
import torch

import metal_moe as mm
from metal_moe import bench_cuda, reference

CASES = {
    "glm1": ("glm-4.7-flash", 1, None),
    "qwen1": ("qwen3-30b-a3b", 1, None),
    "ds1": ("deepseek-v3", 1, None),
    "glm64": ("glm-4.7-flash", 64, None),
    "ds16": ("deepseek-v3", 16, None),
    "glm512": ("glm-4.7-flash", 512, None),
    "ds512": ("deepseek-v3", 512, None),
    "glm4096": ("glm-4.7-flash", 4096, "moe_trellis_swiglu_large_batch"),
    "glm4096w": ("glm-4.7-flash", 4096, None),
    "qwen4096w": ("qwen3-30b-a3b", 4096, None),
}

weights = {}
for name in sys.argv[1:] or list(CASES):
    preset, batch, kernel = CASES[name]
    pr = mm.PRESETS[preset]
    if preset not in weights:
        weights[preset] = bench_cuda.random_device_weights(pr)
    rng = np.random.default_rng(batch)
    ids, p = reference.route(rng.standard_normal((batch, pr.experts)), pr.top_k, "sigmoid")
    x = torch.randn(batch, pr.hidden, device="cuda", dtype=torch.float16)
    ids, p = torch.from_numpy(ids).cuda(), torch.from_numpy(p).cuda()
    for _ in range(2):
        torch.cuda.nvtx.range_push(name)
        mm.fused_moe(x, ids, p, weights[preset], kernel=kernel)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print(name, preset, batch, mm.api.resolve_kernel(batch, weights[preset], kernel, None, "cuda").name)
