"""The benchmark harness behind ``metal-moe bench`` and ``benchmarks/``.

Method
  * Random weights of a preset (or loaded ones), routed by the preset's router on random logits.
  * Each repeat uses a different routing (a rotation of ``rotations`` routings), so that small
    batches cannot be served from the caches by re-reading the same experts.
  * Warm-up calls first, then the median (and min) over ``repeats`` timed calls, measured with
    ``time.perf_counter`` around the whole call.
  * Same-run baseline on the CPU: NumPy float32 on the pre-dequantized weights of the same routed
    experts, doing the same work (grouped by expert, SwiGLU, weighted combine, shared expert).
  * Reported per batch and variant: time, unique-expert weight bytes read per second (GB/s),
    weights decoded per second, and the baseline time and ratio (ours / baseline).
"""

from __future__ import annotations

import platform
import time

import numpy as np

from . import policy, reference
from .api import fused_moe, resolve_kernel, variants as backend_variants
from .weights import PRESETS, MoEWeights

__all__ = ["NumpyBaseline", "machine_description", "routings", "run", "time_call"]


def machine_description():
    """A one-line description of this machine (processor, cores, Python, NumPy)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


def routings(weights, batch, count, seed, preset=None):
    """``count`` (x, ids, p) triples routed by the preset's router (softmax top-k otherwise)."""
    preset = preset or weights.preset
    top_k = min(preset.top_k if preset is not None else 8, weights.experts)
    scoring = preset.scoring if preset is not None else "softmax"
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.standard_normal((batch, weights.hidden)).astype(np.float16)
        bias = rng.uniform(-0.1, 0.1, weights.experts) if scoring == "sigmoid" else None
        ids, p = reference.route(rng.standard_normal((batch, weights.experts)), top_k, scoring, bias=bias)
        out.append((x, ids, p))
    return out


def time_call(fn, calls, warmup=2):
    """Run fn(i) for each i in calls after `warmup` untimed calls; per-call seconds."""
    for i in range(warmup):
        fn(calls[i % len(calls)])
    times = []
    for c in calls:
        t0 = time.perf_counter()
        fn(c)
        times.append(time.perf_counter() - t0)
    return np.array(times)


class NumpyBaseline:
    """The CPU baseline: float32 matmuls on dequantized weights, experts dequantized on first use."""

    def __init__(self, weights):
        self.weights = weights
        self.cache = {}
        self.shared = None if weights.shared is None else [w.dequantize(np.float32) for w in weights.shared]

    def expert(self, e):
        if e not in self.cache:
            w = self.weights
            self.cache[e] = tuple(proj[e].dequantize(np.float32) for proj in (w.gate, w.up, w.down))
        return self.cache[e]

    def prepare(self, ids):
        for e in np.unique(ids):
            self.expert(int(e))

    def __call__(self, x, ids, p, routed_scaling_factor=1.0):
        x = x.astype(np.float32)
        y = np.zeros_like(x)
        for e in np.unique(ids):
            tokens, slots = np.nonzero(ids == e)
            g, u, d = self.expert(int(e))
            xt = x[tokens]
            h = xt @ g
            a = (h / (1.0 + np.exp(-h))) * (xt @ u)
            np.add.at(y, tokens, p[tokens, slots, None] * (a @ d))
        y *= routed_scaling_factor
        if self.shared is not None:
            g, u, d = self.shared
            h = x @ g
            y += ((h / (1.0 + np.exp(-h))) * (x @ u)) @ d
        return y


def unique_expert_bytes(weights, ids):
    """Bytes of the routed experts' weights one call must read (each used expert once, + shared)."""
    used = len(np.unique(ids))
    shared = 0 if weights.shared is None else sum(w.nbytes for w in weights.shared)
    return used * weights.expert_nbytes(0) + shared, used


def run(weights=None, *, preset="glm-4.7-flash", backend="cpu", batches=(1, 4, 16, 64), variants="policy",
        repeats=10, warmup=2, rotations=None, baseline=True, seed=0, experts=None, progress=None,
        check=True):
    """Benchmark ``fused_moe``; returns a JSON-serialisable dict (see the module docstring).

    ``variants``: "policy" (the policy's choice per batch), "all", or a list of names.
    ``rotations``: routings cycled through (default: enough that the routed experts' bytes
    over one cycle exceed 256 MB, at most ``repeats``).  ``check``: compare each variant's
    first result with the float64 reference on a few tokens.
    """
    if weights is None:
        weights = MoEWeights.random(preset, experts=experts, seed=seed)
    pr = weights.preset or PRESETS.get(preset)
    rsf = pr.routed_scaling_factor if pr is not None else 1.0
    base = NumpyBaseline(weights) if baseline and backend == "cpu" else None
    available = backend_variants(backend)
    results = []
    steps = [(b, v) for b in batches for v in _variant_list(variants, b, weights, backend, available)]
    for step, (batch, variant) in enumerate(steps):
        if progress is not None:
            progress(step, len(steps), f"batch {batch}: {variant}")
        per_call, used = unique_expert_bytes(weights, routings(weights, batch, 1, seed)[0][1])
        count = rotations or int(min(repeats, max(1, np.ceil((256 << 20) / per_call))))
        calls = routings(weights, batch, count, seed + batch)
        cycle = [calls[i % count] for i in range(repeats)]
        out = np.empty((batch, weights.hidden), np.float16)
        run_one = lambda c: fused_moe(*c, weights, backend=backend, kernel=variant, out=out,
                                      routed_scaling_factor=rsf)
        times = time_call(run_one, cycle, warmup)
        entry = _entry(weights, batch, variant, times, cycle, backend)
        if check:
            entry["max_rel_error"] = _check(weights, calls[0], variant, backend, rsf)
        if base is not None and (not results or results[-1]["batch"] != batch):
            for c in calls:
                base.prepare(c[1])
            btimes = time_call(lambda c: base(c[0], c[1], c[2], rsf), cycle, warmup)
            baseline_s = float(np.median(btimes))
        elif base is not None:
            baseline_s = results[-1]["baseline_s"]
        else:
            baseline_s = None
        entry["baseline"] = "numpy-float32-dequantized" if base is not None else None
        entry["baseline_s"] = baseline_s
        entry["ratio"] = None if baseline_s is None else entry["median_s"] / baseline_s
        results.append(entry)
    if progress is not None:
        progress(len(steps), len(steps), "done")
    return {
        "preset": None if pr is None else pr.name,
        "backend": backend,
        "machine": machine_description(),
        "weights": repr(weights),
        "hidden": weights.hidden,
        "intermediate": weights.intermediate,
        "experts": weights.experts,
        "bits": list(weights.bits),
        "repeats": repeats,
        "warmup": warmup,
        "results": results,
    }


def _variant_list(variants, batch, weights, backend, available):
    if variants == "policy":
        return [resolve_kernel(batch, weights, backend=backend).name]
    names = available if variants == "all" else list(variants)
    out = []
    for name in names:
        policy.check_variant(name, available)
        if policy.accepts_bits(name, weights.bits):      # skips a specialised decode for other bits
            out.append(name)
    return out


def _entry(weights, batch, variant, times, calls, backend):
    median = float(np.median(times))
    sizes = [unique_expert_bytes(weights, c[1]) for c in calls]
    nbytes = float(np.mean([s[0] for s in sizes]))
    used = float(np.mean([s[1] for s in sizes]))
    shared = 0 if weights.shared is None else 1
    nweights = (used + shared) * 3 * weights.hidden * weights.intermediate
    chosen = resolve_kernel(batch, weights, backend=backend)
    return {
        "batch": batch,
        "variant": variant,
        "policy_choice": chosen.name == variant,
        "rule": chosen.rule if chosen.name == variant else None,
        "median_s": median,
        "min_s": float(times.min()),
        "unique_experts": used,
        "weight_bytes": nbytes,
        "weight_gbps": nbytes / median / 1e9,
        "weights_per_s": nweights / median,
    }


def _check(weights, call, variant, backend, rsf, tokens=4):
    x, ids, p = (a[:tokens] for a in call)
    y = fused_moe(x, ids, p, weights, backend=backend, kernel=variant, routed_scaling_factor=rsf,
                  out=np.full(x.shape, np.nan, np.float32))
    ref = reference.moe_forward(x, ids, p, weights, routed_scaling_factor=rsf)
    return float(np.abs(y - ref).max() / np.abs(ref).max())
