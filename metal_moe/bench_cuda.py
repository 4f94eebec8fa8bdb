"""The CUDA benchmark behind ``metal-moe bench --backend cuda`` (needs torch with CUDA).

Method
  * Weights: random EXL3 weights of the preset's full shape, generated on the device (uniform random
    trellis words, random-sign scales) and wrapped without a copy (:meth:`DeviceWeights.from_arrays`).
    ``copies`` of them are made so that one cycle of calls touches more than 4x the L2 (60 MB on
    the H200): no call finds its weights in L2 from an earlier call.
  * Routings: the preset's router on random logits, a different one for each call of the cycle.
  * Timing: one CUDA graph holds the whole cycle of R calls; it is replayed ``repeats`` times after
    warm-up, each replay timed with CUDA events; time per call = median replay / R.
  * Baseline, same run, same shapes and routings: the expert block in torch bfloat16 on dense random
    weights, slots grouped by expert and the three projections as ``torch._grouped_mm`` (silu * up,
    the weighted combine by ``index_add_``, the shared expert dense), captured the same way.
  * Ceiling: a device-to-device copy of a 2 GiB buffer, bytes read + bytes written over time.
  * Reported per batch and variant: time, unique-expert weight bytes / time (GB/s and % of the copy
    ceiling), TFLOP/s (6 * hidden * intermediate per routed or shared slot), speed-up over bf16.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import policy, reference
from .api import resolve_kernel, fused_moe
from .device import DeviceWeights
from .format import check_codebook
from .weights import PRESETS

__all__ = ["copy_bandwidth", "random_device_weights", "run"]

L2_BYTES = 60 << 20


def _torch():
    try:
        import torch
    except ImportError:
        raise SystemExit("metal-moe bench --backend cuda needs torch with CUDA (for graphs and the bf16 baseline)")
    if not torch.cuda.is_available():
        raise SystemExit("metal-moe bench --backend cuda: torch sees no CUDA device")
    return torch


def _time_graph(torch, fn, repeats, warmup=3):
    """Capture fn() in a CUDA graph and return the replay times in seconds (CUDA events)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()                                            # warm-up outside the graph (workspaces, handles)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del graph
    return np.array(times)


def copy_bandwidth(torch, nbytes=2 << 30, repeats=10):
    """Device-to-device copy bandwidth (bytes read + written per second), median of `repeats`."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    times = _time_graph(torch, lambda: b.copy_(a), repeats)
    del a, b
    return 2 * nbytes / float(np.median(times))


def random_device_weights(preset, device=0, seed=0, torch=None):
    """Random EXL3 weights of `preset` made on the device (no host copy)."""
    torch = torch or _torch()
    pr = PRESETS[preset] if isinstance(preset, str) else preset
    gen = torch.Generator(device="cuda").manual_seed(seed)
    H, I, E = pr.hidden, pr.intermediate, pr.experts

    def proj(i, o, bits, experts):
        lead = () if experts is None else (experts,)
        words = torch.randint(-32768, 32768, lead + (i // 16, o // 16, int(16 * bits)), generator=gen,
                              dtype=torch.int32, device="cuda").to(torch.int16)

        def scale(n, mag):
            sign = torch.where(torch.rand(lead + (n,), generator=gen, device="cuda") < 0.5, -1.0, 1.0)
            return (sign * mag * (0.5 + torch.rand(lead + (n,), generator=gen, device="cuda"))).to(torch.float16)

        return words, scale(i, 1.0 / math.sqrt(i)), scale(o, 1.0)

    gb, ub, db = pr.bits
    routed = [proj(H, I, gb, E), proj(H, I, ub, E), proj(I, H, db, E)]
    shared = [proj(H, I, gb, None), proj(H, I, ub, None), proj(I, H, db, None)] if pr.shared else None
    return DeviceWeights.from_arrays(*routed, codebook=pr.codebook, shared=shared, device=device, preset=pr)


class Bf16Baseline:
    """The expert block in torch bfloat16 with torch._grouped_mm on dense random weights."""

    def __init__(self, torch, pr, seed=0):
        self.torch = torch
        gen = torch.Generator(device="cuda").manual_seed(seed + 1)
        H, I, E = pr.hidden, pr.intermediate, pr.experts

        def w(e, k, n):          # [e, k, n] with K-major storage (what the grouped GEMM wants)
            shape = (n, k) if e is None else (e, n, k)
            t = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
            return t.transpose(-2, -1)

        self.gate, self.up, self.down = w(E, H, I), w(E, H, I), w(E, I, H)
        self.shared = (w(None, H, I), w(None, H, I), w(None, I, H)) if pr.shared else None
        self.experts = E
        self.rsf = pr.routed_scaling_factor

    def __call__(self, x, ids, p, out):
        torch = self.torch
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // ids.shape[1]
        counts = torch.zeros(self.experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        xs = x.index_select(0, tok)
        g = torch._grouped_mm(xs, self.gate, offs=offs)
        u = torch._grouped_mm(xs, self.up, offs=offs)
        d = torch._grouped_mm(torch.nn.functional.silu(g) * u, self.down, offs=offs)
        d = d.float() * p.reshape(-1).index_select(0, order)[:, None]
        y = torch.zeros(out.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, d) * self.rsf
        if self.shared is not None:
            sg, su, sd = self.shared
            y += ((torch.nn.functional.silu(x @ sg) * (x @ su)) @ sd).float()
        out.copy_(y)


def run(preset="glm-4.7-flash", batches=(1, 2, 4, 8, 16, 32, 64, 128, 512, 4096), variants="policy", repeats=20,
        seed=0, device=0, baseline=True, progress=None, ceiling=None, codebook=None, shared=None):
    """Benchmark the CUDA backend on one preset (``codebook``: another codebook than the preset's,
    for every projection; ``shared``: with or without a shared expert, other than the preset);
    returns a JSON-serialisable dict."""
    torch = _torch()
    torch.cuda.set_device(device)
    pr = PRESETS[preset]
    if codebook is not None:
        pr = dataclasses.replace(pr, codebook=check_codebook(codebook))
    if shared is not None:
        pr = dataclasses.replace(pr, shared=bool(shared))
    ceiling = ceiling or copy_bandwidth(torch)
    props = torch.cuda.get_device_properties(device)
    w0 = random_device_weights(pr, device, seed, torch)
    per_expert = w0.expert_nbytes()
    shared_bytes = w0.shared_nbytes
    copies = [w0]
    base = Bf16Baseline(torch, pr, seed) if baseline else None
    results = []
    steps = [(b, v) for b in batches for v in _variants(variants, b, w0)]
    for step, (batch, variant) in enumerate(steps):
        if progress is not None:
            progress(step, len(steps), f"{pr.name} batch {batch}: {variant}")
        rng = np.random.default_rng(seed + batch)
        top_k = min(pr.top_k, pr.experts)

        def routing():
            bias = rng.uniform(-0.1, 0.1, pr.experts) if pr.scoring == "sigmoid" else None
            return reference.route(rng.standard_normal((batch, pr.experts)), top_k, pr.scoring, bias=bias)

        first = routing()
        used0 = len(np.unique(first[0]))
        per_call = used0 * per_expert + shared_bytes
        cycle = int(min(16, max(2, math.ceil(4 * L2_BYTES / per_call))))
        ncopies = int(min(cycle, max(1, math.ceil(4 * L2_BYTES / per_call))))
        free = torch.cuda.mem_get_info(device)[0]
        ncopies = max(1, min(ncopies, int(0.5 * free // max(1, w0.nbytes)) + len(copies)))
        while len(copies) < ncopies:
            copies.append(random_device_weights(pr, device, seed + len(copies), torch))
        calls = [first] + [routing() for _ in range(cycle - 1)]
        xs = [torch.randn(batch, pr.hidden, device="cuda", dtype=torch.float16) for _ in range(cycle)]
        ids = [torch.from_numpy(c[0]).cuda() for c in calls]
        ps = [torch.from_numpy(c[1]).cuda() for c in calls]
        out = torch.empty(batch, pr.hidden, device="cuda", dtype=torch.float16)
        rsf = pr.routed_scaling_factor

        def ours():
            for i in range(cycle):
                fused_moe(xs[i], ids[i], ps[i], copies[i % len(copies)], kernel=variant, out=out,
                          routed_scaling_factor=rsf)

        t = float(np.median(_time_graph(torch, ours, repeats))) / cycle
        used = float(np.mean([len(np.unique(c[0])) for c in calls]))
        nbytes = used * per_expert + shared_bytes
        slots = batch * (top_k + (1 if pr.shared else 0))
        flops = 6.0 * pr.hidden * pr.intermediate * slots
        chosen = resolve_kernel(batch, w0)
        entry = {
            "batch": batch, "variant": variant, "policy_choice": variant == chosen.name,
            "table": chosen.table if variant == chosen.name else None,   # "default" or a tuned table's file
            "time_s": t, "cycle": cycle, "weight_copies": len(copies), "unique_experts": used,
            "weight_bytes": nbytes, "weight_gbps": nbytes / t / 1e9, "ceiling_fraction": nbytes / t / ceiling,
            "tflops": flops / t / 1e12,
        }
        if base is not None:
            if results and results[-1]["batch"] == batch and results[-1].get("bf16_s") is not None:
                entry["bf16_s"] = results[-1]["bf16_s"]
            else:
                xb = [x.to(torch.bfloat16) for x in xs]
                ob = torch.empty(batch, pr.hidden, device="cuda", dtype=torch.bfloat16)

                def theirs():
                    for i in range(cycle):
                        base(xb[i], ids[i].long(), ps[i], ob)

                try:
                    entry["bf16_s"] = float(np.median(_time_graph(torch, theirs, repeats))) / cycle
                except Exception as err:          # keep the preset's other numbers; say why
                    entry["bf16_s"], entry["bf16_error"] = None, f"{type(err).__name__}: {err}"[:300]
            if entry["bf16_s"]:
                entry["speedup"] = entry["bf16_s"] / t
        results.append(entry)
        del xs, ids, ps, out
    if progress is not None:
        progress(len(steps), len(steps), "done")
    return {"preset": pr.name, "backend": "cuda", "device": props.name, "sms": props.multi_processor_count,
            "copy_ceiling_gbps": ceiling / 1e9, "weights": repr(w0), "repeats": repeats, "results": results}


def _variants(variants, batch, weights):
    if variants == "policy":
        return [resolve_kernel(batch, weights).name]
    names = list(policy.VARIANTS) if variants == "all" else list(variants)
    return [n for n in names if policy.accepts_bits(n, weights.bits)]


def table(res):
    lines = [f"# {res['weights']} on {res['device']} ({res['sms']} SMs); copy ceiling "
             f"{res['copy_ceiling_gbps']:.0f} GB/s",
             f"{'batch':>5}  {'variant':<36} {'us':>9} {'GB/s':>7} {'%ceil':>6} {'TFLOP/s':>8} {'bf16 us':>9} "
             f"{'speedup':>7}  policy"]
    tuned = sorted({r["table"] for r in res["results"] if r.get("table") not in (None, "default")})
    lines[1:1] = [f"# policy: tuned table {table} where it has a measurement, else the default table"
                  for table in tuned]
    for r in res["results"]:
        bf = f"{r['bf16_s'] * 1e6:>9.1f} {r['speedup']:>7.2f}" if r.get("bf16_s") else f"{'':>17}"
        lines.append(f"{r['batch']:>5}  {r['variant']:<36} {r['time_s'] * 1e6:>9.1f} {r['weight_gbps']:>7.0f} "
                     f"{100 * r['ceiling_fraction']:>5.1f}% {r['tflops']:>8.2f} {bf}  "
                     f"{'*' if r['policy_choice'] else ''}")
    return "\n".join(lines)
