"""Markdown tables for benchmarks/RESULTS.md from `metal-moe bench --backend cuda --json` files.

    python benchmarks/results_table.py NEW.json [--before OLD.json]

One row per batch size with the policy's variant; `--before` adds the time of an earlier run of
the same preset (same harness) as a last column, so a change's effect is read off one table.
"""
import argparse
import json


def policy_rows(path):
    with open(path) as f:
        res = json.load(f)
    return res, {r["batch"]: r for r in res["results"] if r.get("policy_choice")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("new")
    ap.add_argument("--before")
    a = ap.parse_args()
    res, rows = policy_rows(a.new)
    before = policy_rows(a.before)[1] if a.before else {}
    print(f"### {res['weights']}\n")
    head = "| batch | policy's variant | time us | weight GB/s | % of copy | TFLOP/s | bf16 us | speed-up |"
    rule = "|---|---|---|---|---|---|---|---|"
    if before:
        head += " before us |"
        rule += "---|"
    print(head)
    print(rule)
    for b, r in sorted(rows.items()):
        line = (f"| {b} | `{r['variant']}` | {r['time_s'] * 1e6:.1f} | {r['weight_gbps']:.0f} | "
                f"{100 * r['ceiling_fraction']:.1f}% | {r['tflops']:.2f} | {r['bf16_s'] * 1e6:.1f} | "
                f"{r['speedup']:.2f} |")
        if before:
            old = before.get(b)
            line += f" {old['time_s'] * 1e6:.1f} |" if old else " |"
        print(line)
    print()


if __name__ == "__main__":
    main()
