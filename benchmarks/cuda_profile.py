"""One glm-4.7-flash batch-1 call and one batch-4096 call, for `ncu` (benchmarks/cuda_device.sh profile)."""
import numpy as np
import torch

import metal_moe as mm
from metal_moe import bench_cuda, reference

pr = mm.PRESETS["glm-4.7-flash"]
w = bench_cuda.random_device_weights(pr)
for batch, kernel in ((1, None), (4096, "moe_trellis_swiglu_large_batch")):
    rng = np.random.default_rng(batch)
    ids, p = reference.route(rng.standard_normal((batch, pr.experts)), pr.top_k, "sigmoid")
    x = torch.randn(batch, pr.hidden, device="cuda", dtype=torch.float16)
    for _ in range(2):
        mm.fused_moe(x, torch.from_numpy(ids).cuda(), torch.from_numpy(p).cuda(), w, kernel=kernel)
    torch.cuda.synchronize()
