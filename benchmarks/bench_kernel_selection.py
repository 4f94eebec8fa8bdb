"""Time every variant at each batch size and show where the policy's choice is not the fastest.

    python benchmarks/bench_kernel_selection.py [--preset glm-4.7-flash] [--batch 1,2,4,16,32,64]
        [--weights FILE... --prefix P] [--json out.json] [--plot out.png]

A thin wrapper over the harness of `metal-moe bench --variants all` (metal_moe/bench.py).
"""

import argparse
import json
import sys

from metal_moe import bench, cli


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="glm-4.7-flash")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--batch", type=cli._int_list, default=[1, 2, 4, 16, 32, 64])
    ap.add_argument("--weights", nargs="+")
    ap.add_argument("--prefix")
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    weights = cli._load_weights(args)
    res = bench.run(weights, backend=cli._backend(args.backend), batches=args.batch, variants="all",
                    repeats=args.repeats, baseline=False, seed=args.seed, check=False,
                    progress=lambda i, n, what: print(f"[{i}/{n}] {what}", file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        cli.plot(res, args.plot)
    print(f"# {res['weights']}\n# machine: {res['machine']}")
    print(f"{'batch':>5}  {'policy choice':<36} {'ms':>8}  {'fastest':<36} {'ms':>8}  policy/fastest")
    for batch in args.batch:
        rows = [r for r in res["results"] if r["batch"] == batch]
        chosen = next(r for r in rows if r["policy_choice"])
        best = min(rows, key=lambda r: r["median_s"])
        ratio = chosen["median_s"] / best["median_s"]
        note = "" if best is chosen else "   <-- not the fastest"
        print(f"{batch:>5}  {chosen['variant']:<36} {chosen['median_s'] * 1e3:>8.2f}  {best['variant']:<36} "
              f"{best['median_s'] * 1e3:>8.2f}  {ratio:>6.2f}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
