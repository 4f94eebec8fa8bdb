"""``metal-moe tune``: measure every variant at each batch size on this device and store a table the
policy prefers to its default thresholds (DESIGN.md section 4, "Beyond the table").

* Measurement: the benchmark harness of the backend (metal_moe/bench.py on host backends, the CUDA
  graph harness of metal_moe/bench_cuda.py on CUDA), every variant that accepts the weights' bits.
* Correctness: a variant is eligible only if it matched the float64 reference within its
  accumulation mode's tolerance in this run (host backends: on the benchmarked weights; CUDA: on a
  small random layer of the same bits and codebook, uploaded).  A tuned choice is never a variant
  that failed.
* Per batch and accumulation mode (fp32 asked or not) the fastest eligible variant is stored;
  for fp32, only fp32-accumulating variants count.  A call then uses the entry of the largest
  measured batch at or below its own (and the default table below the smallest).
* Storage: JSON in the user cache directory ($METAL_MOE_CACHE, else $XDG_CACHE_HOME/metal_moe,
  else ~/.cache/metal_moe), one file per backend, device and library version, so another device,
  driver or release never reads it.  ``METAL_MOE_TUNED=0`` makes the policy ignore tuned tables.
"""

from __future__ import annotations

import json
import os
import re
import threading

import numpy as np

from . import __version__, policy

__all__ = ["cache_dir", "device_key", "load", "table_path", "tune"]

TOLERANCE = {True: 4e-3, False: 1e-2}        # as tests/native_cases.py: keyed by "accumulates in fp32"

_cache = {}
_cache_lock = threading.Lock()


_HOME_CACHE = os.path.join(os.path.expanduser("~"), ".cache")


def cache_dir():
    env = os.environ.get("METAL_MOE_CACHE")
    if env:
        return env
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or _HOME_CACHE, "metal_moe")


_keys = {}
_paths = {}


def device_key(backend, device=0):
    """(backend, device description, library version) of the context a table is measured on; the
    device description names the processor and kernel set (CPU) or the GPU and its SM count (CUDA).
    Computed once per process (the policy asks on every call)."""
    key = _keys.get((backend, device))
    if key is None:
        from .api import _default_context
        from .bench import machine_description

        ctx = _default_context(backend, device)
        name = f"{machine_description().split(',')[0]}; {ctx.simd}" if backend == "cpu" else ctx.simd
        key = _keys[(backend, device)] = (backend, name, __version__)
    return key


def table_path(key):
    backend, name, version = key
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:80]
    return os.path.join(cache_dir(), f"tune-{backend}-{slug}-{version}.json")


def load(backend, device=0):
    """The tuned table of this backend/device (a :class:`policy.TunedTable`), or None."""
    if os.environ.get("METAL_MOE_TUNED", "1") in ("0", "off", "no", "false"):
        return None
    try:
        key = device_key(backend, device)
    except Exception:
        return None
    path = _paths.get((key, cache_dir()))
    if path is None:
        path = _paths[(key, cache_dir())] = table_path(key)
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return None
    with _cache_lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
    with open(path) as f:
        data = json.load(f)
    if tuple(data.get("key", ())) != key:
        return None
    table = policy.TunedTable(path, key, tuple((tuple(e["bits"]), bool(e["fp32"]), int(e["batch"]), e["variant"])
                                               for e in data["entries"]))
    with _cache_lock:
        _cache[path] = (mtime, table)
    return table


def _check_cuda(variant, bits, codebooks, hidden=256, intermediate=384, experts=8, top_k=2, batch=5):
    """Whether `variant` matches the reference on a small random CUDA layer of these bits."""
    from . import reference
    from .api import fused_moe
    from .device import DeviceArray
    from .weights import MoEWeights

    w = MoEWeights.random(hidden=hidden, intermediate=intermediate, experts=experts, bits=bits, codebook=codebooks,
                          shared=True, seed=11)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((batch, hidden)).astype(np.float16)
    ids, p = reference.route(rng.standard_normal((batch, experts)), top_k)
    out = DeviceArray.from_numpy(np.full((batch, hidden), np.nan, np.float32))
    fused_moe(DeviceArray.from_numpy(x), DeviceArray.from_numpy(ids), DeviceArray.from_numpy(p), w.to("cuda"),
              kernel=variant, out=out)
    y, ref = out.numpy(), reference.moe_forward(x, ids, p, w)
    return bool(np.all(np.isfinite(y))) and float(np.abs(y - ref).max() / np.abs(ref).max()) <= \
        TOLERANCE[not policy.accumulates_fp16(variant)]


def tune(backend="cpu", preset="glm-4.7-flash", batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), repeats=5, weights=None,
         device=0, progress=None, save=True, codebook=None):
    """Measure, check, choose and (``save``) store; returns the table as a dict.  On CUDA the
    preset's random weights are made on the device, with ``codebook`` instead of the preset's when
    given (host ``weights`` carry their own codebooks)."""
    from .weights import PRESETS, MoEWeights

    pr = PRESETS[preset]
    measured = []            # (batch, variant, seconds, passed)
    if backend == "cuda":
        from . import bench_cuda

        res = bench_cuda.run(preset, batches=batches, variants="all", repeats=repeats, device=device, baseline=False,
                             progress=progress, codebook=codebook)
        bits, codebooks = tuple(pr.bits), (codebook or pr.codebook,) * 3
        ok = {v: _check_cuda(v, bits, codebooks) for v in {r["variant"] for r in res["results"]}}
        measured = [(r["batch"], r["variant"], r["time_s"], ok[r["variant"]]) for r in res["results"]]
    else:
        from . import bench

        weights = weights if weights is not None else MoEWeights.random(preset)
        bits, codebooks = tuple(weights.bits), tuple(weights.codebooks)
        res = bench.run(weights, backend=backend, batches=batches, variants="all", repeats=repeats, baseline=False,
                        progress=progress, check=True)
        measured = [(r["batch"], r["variant"], r["median_s"],
                     r["max_rel_error"] <= TOLERANCE[not policy.accumulates_fp16(r["variant"])])
                    for r in res["results"]]
    entries = []
    for batch in sorted({m[0] for m in measured}):
        for fp32 in (False, True):
            rows = [m for m in measured if m[0] == batch and m[3] and not (fp32 and policy.accumulates_fp16(m[1]))]
            if rows:
                best = min(rows, key=lambda m: m[2])
                entries.append({"bits": list(bits), "fp32": fp32, "batch": batch, "variant": best[1],
                                "seconds": best[2]})
    key = device_key(backend, device)
    table = {"key": list(key), "preset": pr.name, "codebooks": list(codebooks), "repeats": repeats,
             "measured": [{"batch": b, "variant": v, "seconds": t, "passed": ok} for b, v, t, ok in measured],
             "entries": entries}
    if save:
        os.makedirs(cache_dir(), exist_ok=True)
        path = table_path(key)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, path)
        table["path"] = path
    return table
