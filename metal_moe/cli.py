"""The ``metal-moe`` command (also ``python -m metal_moe``): demo, bench, tune, info, select."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from . import __version__, bench, policy, reference
from .api import backends, fused_moe, resolve_kernel
from .device import DeviceArray
from .format import CODEBOOKS
from .weights import PRESETS, MoEWeights

# Pass/fail bound of the demo's check: max |y - ref| / max |ref|, per accumulation mode (the
# tolerances the test suite states and justifies in tests/native_cases.py).
TOLERANCE = {True: 4e-3, False: 1e-2}
CHECK_TOKENS = 8


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _bits(text):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected G,U,D bits, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three bit widths G,U,D, got {text!r}")
    return tuple(int(v) if v.is_integer() else v for v in values)


class Progress:
    """A tqdm bar on stderr when it is a terminal and not --quiet; silent otherwise.  Called as
    progress(done, total, what)."""

    def __init__(self, quiet, desc):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, file=sys.stderr, leave=False)

    def __call__(self, done, total, what):
        if self.bar is not None:
            self.bar.total = total
            self.bar.set_postfix_str(what)
            self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _backend(name):
    if name in (None, "auto"):
        return "cpu"
    if name not in backends():
        raise SystemExit(f"metal-moe: backend {name!r} is not usable on this machine (usable: {backends()})")
    return name


def _load_weights(args, no_shared=False):
    if args.weights:
        if not args.prefix:
            raise SystemExit("metal-moe: --weights needs --prefix (e.g. model.layers.3.mlp)")
        if args.codebook or no_shared:
            raise SystemExit(f"metal-moe: {'--codebook' if args.codebook else '--no-shared'} is for random weights; "
                             "a loaded layer is as it was saved")
        return MoEWeights.from_safetensors(args.weights, args.prefix)
    return MoEWeights.random(args.preset, experts=args.experts, seed=args.seed, codebook=args.codebook,
                             shared=False if no_shared else None)


# ---- demo ---------------------------------------------------------------------------------------
def cmd_demo(args):
    backend = _backend(args.backend)
    weights = _load_weights(args)
    preset = weights.preset or PRESETS[args.preset]
    rsf = preset.routed_scaling_factor
    rows, decoded, failed = [], {}, 0
    on_device = weights.to("cuda") if backend == "cuda" else None

    def call(c, out):
        """One fused_moe on host arrays; on cuda the arrays are copied to the device and back (so the
        demo's times include the copies: `metal-moe bench --backend cuda` measures the kernels)."""
        if on_device is None:
            return fused_moe(*c, weights, backend=backend, out=out, routed_scaling_factor=rsf)
        o = DeviceArray.from_numpy(out)
        fused_moe(*(DeviceArray.from_numpy(a) for a in c), on_device, out=o, routed_scaling_factor=rsf)
        out[...] = o.numpy()
        return out

    progress = Progress(args.quiet, "demo")
    for step, batch in enumerate(args.batch):
        progress(step, len(args.batch), f"batch {batch}")
        calls = bench.routings(weights, batch, args.repeats, args.seed + batch, preset)
        decision = resolve_kernel(batch, weights, backend=backend)
        out = np.empty((batch, weights.hidden), np.float16)
        times = bench.time_call(lambda c: call(c, out), calls, warmup=1)
        x, ids, p = (a[:CHECK_TOKENS] for a in calls[0])
        y = call((x, ids, p), np.full(x.shape, np.nan, np.float32))
        ref = reference.moe_forward(x, ids, p, weights, routed_scaling_factor=rsf, decoded=decoded)
        err = float(np.abs(y - ref).max() / np.abs(ref).max()) if np.all(np.isfinite(y)) else float("inf")
        tol = args.tolerance if args.tolerance is not None else TOLERANCE[not policy.accumulates_fp16(decision.name)]
        ok = err <= tol
        failed += not ok
        nbytes = np.mean([bench.unique_expert_bytes(weights, c[1])[0] for c in calls])
        median = float(np.median(times))
        rows.append({"batch": batch, "variant": decision.name, "why": decision.rule, "median_ms": median * 1e3,
                     "weight_gbps": nbytes / median / 1e9, "max_rel_error": err, "tolerance": tol, "pass": ok,
                     "checked_tokens": int(x.shape[0])})
    progress.close()
    if args.json:
        print(json.dumps({"weights": repr(weights), "backend": backend, "rows": rows}, indent=1))
    else:
        print(f"metal_moe {__version__} demo on {backend}: {weights!r}")
        print(f"routing: {preset.scoring} top-{preset.top_k}, routed scaling {rsf}; "
              f"time = median of {args.repeats} calls; checked against the float64 reference on "
              f"the first {CHECK_TOKENS} tokens")
        print(f"{'batch':>5}  {'variant':<36} {'time ms':>9} {'GB/s':>7} {'max rel err':>11}  result  why")
        for r in rows:
            print(f"{r['batch']:>5}  {r['variant']:<36} {r['median_ms']:>9.2f} {r['weight_gbps']:>7.2f} "
                  f"{r['max_rel_error']:>11.2e}  {'pass' if r['pass'] else 'FAIL':<6}  {r['why']}")
        print("all checks passed" if not failed else f"{failed} check(s) FAILED")
    return 1 if failed else 0


# ---- bench --------------------------------------------------------------------------------------
def cmd_bench(args):
    backend = _backend(args.backend)
    variants = args.variants if args.variants in ("all", "policy") else args.variants.split(",")
    if backend == "cuda":
        return _bench_cuda(args, variants)
    weights = _load_weights(args, no_shared=args.no_shared)
    progress = Progress(args.quiet, "bench")
    res = bench.run(weights, backend=backend, batches=args.batch, variants=variants, repeats=args.repeats,
                    warmup=args.warmup, baseline=not args.no_baseline, seed=args.seed, progress=progress)
    progress.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        plot(res, args.plot)
    print(f"# {res['weights']} on {res['backend']}\n# machine: {res['machine']}")
    print(f"{'batch':>5}  {'variant':<36} {'median ms':>9} {'GB/s':>7} {'GW/s':>7} {'baseline ms':>11} "
          f"{'ratio':>6} {'err':>8}  policy")
    for r in res["results"]:
        base = "" if r["baseline_s"] is None else f"{r['baseline_s'] * 1e3:>11.2f} {r['ratio']:>6.2f}"
        print(f"{r['batch']:>5}  {r['variant']:<36} {r['median_s'] * 1e3:>9.2f} {r['weight_gbps']:>7.2f} "
              f"{r['weights_per_s'] / 1e9:>7.2f} {base:>18} {r.get('max_rel_error', float('nan')):>8.1e}  "
              f"{'*' if r['policy_choice'] else ''}")
    return 0


def _bench_cuda(args, variants):
    from . import bench_cuda

    if args.weights:
        raise SystemExit("metal-moe bench --backend cuda: times random weights of a preset's full shape "
                         "(--weights is for the CPU harness)")
    progress = Progress(args.quiet, "bench")
    res = bench_cuda.run(args.preset, batches=args.batch, variants=variants, repeats=args.repeats, seed=args.seed,
                         baseline=not args.no_baseline, progress=progress, codebook=args.codebook,
                         shared=False if args.no_shared else None)
    progress.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(bench_cuda.table(res))
    return 0


def plot(res, path):
    """Time and weight GB/s against batch size, one line per variant, the policy's choices marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("metal-moe: --plot needs matplotlib (pip install 'metal-moe[plot]')") from None
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_variant = {}
    for r in res["results"]:
        by_variant.setdefault(r["variant"], []).append(r)
    for name, rs in sorted(by_variant.items()):
        b = [r["batch"] for r in rs]
        ax_t.plot(b, [r["median_s"] * 1e3 for r in rs], marker=".", label=name.replace("moe_trellis_swiglu", "mts"))
        ax_b.plot(b, [r["weight_gbps"] for r in rs], marker=".")
    chosen = [r for r in res["results"] if r["policy_choice"]]
    ax_t.scatter([r["batch"] for r in chosen], [r["median_s"] * 1e3 for r in chosen], s=90, facecolors="none",
                 edgecolors="k", label="policy's choice", zorder=3)
    ax_b.scatter([r["batch"] for r in chosen], [r["weight_gbps"] for r in chosen], s=90, facecolors="none",
                 edgecolors="k", zorder=3)
    base = sorted({(r["batch"], r["baseline_s"]) for r in res["results"] if r.get("baseline_s")})
    if base:
        ax_t.plot([b for b, _ in base], [t * 1e3 for _, t in base], "k--", label=res["results"][0]["baseline"])
    for ax, label in ((ax_t, "time per call (ms, median)"), (ax_b, "unique-expert weight GB/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=7)
    fig.suptitle(f"metal_moe {res['backend']}: {res['weights']}\n{res['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- info ---------------------------------------------------------------------------------------
def info():
    from . import _build_info
    from .api import Context, _native

    out = {"version": __version__, "abi_version": None, "backends_built": [], "backends_usable": backends(),
           "devices": {}, "cpu_simd": None, "cpu_threads": None, "build": dict(_build_info.OPTIONS),
           "variants": list(policy.VARIANTS)}
    if _native is not None:
        out["abi_version"] = _native.abi_version()
        out["backends_built"] = [b for b in ("cpu", "cuda", "metal") if _native.backend_built(b)]
        out["devices"] = {b: _native.backend_device_count(b) for b in out["backends_built"]}
        ctx = Context("cpu")
        out["cpu_simd"], out["cpu_threads"] = ctx.simd, ctx.num_threads
    out["env"] = {k: os.environ[k] for k in ("METAL_MOE_NUM_THREADS", "METAL_MOE_CPU_ISA") if k in os.environ}
    return out


def cmd_info(args):
    data = info()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    for key, value in data.items():
        print(f"{key:>16}: {value}")
    return 0


# ---- select -------------------------------------------------------------------------------------
def cmd_select(args):
    from . import tune

    fp32 = policy.auto_fp32_acc(True if args.fp32_acc else None, args.hidden)
    why_fp32 = ("asked for (--fp32-acc)" if args.fp32_acc else
                f"auto: hidden {args.hidden} {'>=' if fp32 else '<'} {policy.AUTO_FP32_HIDDEN}")
    tuned = tune.load(_backend(args.backend)) if not args.default else None
    d = policy.select(args.batch, fp32, *args.bits, tuned=tuned)
    data = {"batch": args.batch, "bits": list(args.bits), "hidden": args.hidden, "use_fp32_acc": fp32,
            "fp32_rule": why_fp32, "variant": d.name, "tile_n": d.tile_n, "rule": d.rule, "table": d.table}
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        shown = "default (DESIGN.md section 4)" if d.table == "default" else f"tuned ({d.table})"
        print(f"{d.name} (tile_n {d.tile_n})\n  rule: {d.rule}\n  fp32 accumulation: {fp32} ({why_fp32})\n"
              f"  table: {shown}")
    return 0


def cmd_tune(args):
    from . import tune

    backend = _backend(args.backend)
    weights = None
    if backend != "cuda":
        weights = _load_weights(args)
    progress = Progress(args.quiet, "tune")
    table = tune.tune(backend, args.preset, batches=args.batch, repeats=args.repeats, weights=weights,
                      progress=progress, codebook=args.codebook)
    progress.close()
    failed = sorted({m["variant"] for m in table["measured"] if not m["passed"]})
    print(f"# tuned {table['key'][1]} ({table['key'][0]}, metal_moe {table['key'][2]}), bits {table['entries'][0]['bits'] if table['entries'] else '-'}")
    print(f"{'batch':>5}  {'fp32':<5} {'fastest correct variant':<40} {'ms':>9}")
    for e in table["entries"]:
        print(f"{e['batch']:>5}  {str(e['fp32']):<5} {e['variant']:<40} {e['seconds'] * 1e3:>9.3f}")
    if failed:
        print(f"never chosen (failed the correctness check): {', '.join(failed)}")
    print(f"written to {table['path']}")
    return 0


# ---- main ---------------------------------------------------------------------------------------
def build_parser():
    ap = argparse.ArgumentParser(prog="metal-moe", description="Fused MoE expert blocks from EXL3 trellis weights.")
    ap.add_argument("--version", action="version", version=f"metal_moe {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, batches):
        p.add_argument("--preset", default="glm-4.7-flash", choices=sorted(PRESETS), help="model shape (default: %(default)s)")
        p.add_argument("--backend", default="auto", help="auto, cpu, cuda or metal (default: %(default)s)")
        p.add_argument("--batch", type=_int_list, default=batches, help="comma-separated batch sizes (tokens)")
        p.add_argument("--weights", nargs="+", metavar="FILE", help="load a real EXL3 layer from .safetensors files")
        p.add_argument("--prefix", help="the layer's tensor prefix, e.g. model.layers.3.mlp (with --weights)")
        p.add_argument("--experts", type=int, default=None, help="use fewer experts than the preset (random weights)")
        p.add_argument("--codebook", choices=CODEBOOKS, default=None,
                       help="random weights with this codebook for every projection (default: the preset's)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="run fused_moe at several batch sizes and check it against the reference",
                          description="Build (or load) a layer, route random tokens with the preset's router, run "
                                      "fused_moe with the policy's choice per batch size, check against the float64 "
                                      "reference and print a table.  Exit status 1 if a check fails.")
    common(demo, [1, 4, 16, 64])
    demo.add_argument("--repeats", type=int, default=5, help="timed calls per batch size (default: %(default)s)")
    demo.add_argument("--tolerance", type=float, default=None,
                      help="override the pass bound on max |y-ref|/max |ref| (default: 4e-3 fp32, 1e-2 fp16 accumulation)")
    demo.add_argument("--json", action="store_true", help="print the table as JSON")
    demo.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="time every requested variant at every batch size against the baselines",
                       description="The benchmark harness (method: metal_moe/bench.py).  Writes JSON and a plot.")
    common(b, [1, 4, 16, 64, 256])
    b.add_argument("--variants", default="policy", help="policy, all, or comma-separated names (default: %(default)s)")
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--no-baseline", action="store_true", help="skip the NumPy float32 baseline")
    b.add_argument("--no-shared", action="store_true",
                   help="random weights without the preset's shared expert (to time the shared expert's share)")
    b.add_argument("--json", metavar="FILE", help="write the results as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="plot time and GB/s against batch (needs matplotlib)")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="version, ABI, backends, devices, SIMD path, build options, threads")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("tune", help="time every variant per batch size on this device; the policy then prefers it",
                       description="Measure every variant at each batch size (the bench harness), check each against "
                                   "the float64 reference, and store the fastest correct one per batch and "
                                   "accumulation mode in the user cache (metal_moe/tune.py).")
    common(t, [1, 2, 4, 8, 16, 32, 64, 128, 256])
    t.add_argument("--repeats", type=int, default=5)
    t.set_defaults(func=cmd_tune)

    s = sub.add_parser("select", help="the policy's decision for a call and the rule that made it")
    s.add_argument("--batch", type=int, required=True, help="tokens in the batch")
    s.add_argument("--bits", type=_bits, required=True, help="gate,up,down bits, e.g. 6,2,3")
    s.add_argument("--fp32-acc", action="store_true", help="ask for fp32 accumulation")
    s.add_argument("--hidden", type=int, default=2048, help="hidden size for the auto fp32 rule (default: %(default)s)")
    s.add_argument("--backend", default="auto", help="whose tuned table to consult (default: %(default)s)")
    s.add_argument("--default", action="store_true", help="ignore tuned tables: the default table only")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_select)
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        from .__main__ import self_check_report

        code = self_check_report()
        print("\nrun `metal-moe demo` to see it work, `metal-moe --help` for more")
        return code
    t0 = time.perf_counter()
    code = args.func(args)
    if getattr(args, "command", None) == "demo" and not getattr(args, "json", False):
        print(f"({time.perf_counter() - t0:.1f} s)")
    return code
