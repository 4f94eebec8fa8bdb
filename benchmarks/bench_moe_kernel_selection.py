"""Print the policy's selection table and check it against DESIGN.md section 4 (exit 1 on a mismatch).

    python benchmarks/bench_moe_kernel_selection.py
"""

import sys

from metal_moe import policy

P = "moe_trellis_swiglu"
EXPECTED = {  # (batch, fp32) -> variant, for bits 6/2/3 (specialised) and 4/4/4 (not)
    (1, False): (f"{P}_decode_6_2_3", f"{P}_decode"), (1, True): (f"{P}_decode", f"{P}_decode"),
    (2, False): (f"{P}_prefill4",) * 2, (16, False): (f"{P}_prefill4",) * 2,
    (2, True): (f"{P}_prefill4_fp32acc",) * 2, (16, True): (f"{P}_prefill4_fp32acc",) * 2,
    (17, False): (P,) * 2, (32, False): (P,) * 2, (17, True): (f"{P}_fp32acc",) * 2, (32, True): (f"{P}_fp32acc",) * 2,
    (33, False): (f"{P}_large_batch",) * 2, (4096, False): (f"{P}_large_batch",) * 2,
    (33, True): (f"{P}_fp32acc",) * 2, (4096, True): (f"{P}_fp32acc",) * 2,
}


def main():
    bad = 0
    print(f"{'batch':>5} {'fp32':>5}  {'bits 6/2/3':<36} {'bits 4/4/4':<36} rule")
    for (batch, fp32), want in sorted(EXPECTED.items()):
        got = tuple(policy.select_moe_kernel(batch, fp32, *bits)[0] for bits in ((6, 2, 3), (4, 4, 4)))
        ok = got == want
        bad += not ok
        rule = policy.select(batch, fp32, 6, 2, 3).rule
        print(f"{batch:>5} {str(fp32):>5}  {got[0]:<36} {got[1]:<36} {rule}{'' if ok else '   <-- expected ' + str(want)}")
    print("table matches DESIGN.md section 4" if not bad else f"{bad} MISMATCH(ES)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
