"""CPU benchmark of issue 3: the policy's choice against NumPy float32 on dequantized weights.

    python benchmarks/bench_cpu.py [--batches 1,4,16,64,256] [--repeats 10] [--json out.json]

On the glm-4.7-flash preset (64 experts, top-4, bits 6/2/3, one shared expert) it times, per
batch size, the variant the policy picks and, in the same run, NumPy float32 matmuls on the
pre-dequantized weights of the same routed experts doing the same work.  Prints time, weights
decoded per second and the ratio (ours / NumPy); see metal_moe/bench.py for the method.
"""

import argparse
import json
import sys

from metal_moe import bench


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="glm-4.7-flash")
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    res = bench.run(preset=args.preset, batches=batches, repeats=args.repeats,
                    progress=lambda i, n, what: print(f"[{i}/{n}] {what}", file=sys.stderr, flush=True))
    print(f"# {res['weights']}\n# machine: {res['machine']}")
    print(f"{'batch':>5}  {'variant':<36} {'time ms':>9} {'GW/s':>7} {'GB/s':>7} {'numpy ms':>9} {'ratio':>6} {'err':>8}")
    for r in res["results"]:
        print(f"{r['batch']:>5}  {r['variant']:<36} {r['median_s'] * 1e3:>9.2f} {r['weights_per_s'] / 1e9:>7.2f} "
              f"{r['weight_gbps']:>7.2f} {r['baseline_s'] * 1e3:>9.2f} {r['ratio']:>6.2f} {r['max_rel_error']:>8.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
