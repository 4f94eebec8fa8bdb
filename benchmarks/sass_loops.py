"""Static instruction counts of a kernel's loops in a SASS listing (`cuobjdump -sass`).

    python benchmarks/sass_loops.py SASS.txt KERNEL_SUBSTRING [LOOPS]

For every function whose mangled name contains KERNEL_SUBSTRING: its instruction count, then its
LOOPS (default 4) largest loops (a backward branch and its target), each with the instructions in
it outside its inner loops and the most frequent opcodes.  A static count: which branches a step
takes (the input staging runs every few steps, copies are predicated) decides the dynamic count,
which ncu measures (`smsp__inst_executed`).  cuobjdump comes with the CUDA toolkit, or from the
`nvidia-cuda-cuobjdump` wheel where the toolkit lacks it.
"""
import collections
import re
import sys


def functions(text):
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def instructions(body):
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", body)]


def opcode(text):
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def loops(ins):
    found = []
    for address, text in ins:
        m = re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < address:
            found.append((int(m.group(1), 16), address))
    return found


def main(argv):
    path, name_part = argv[0], argv[1]
    count = int(argv[2]) if len(argv) > 2 else 4
    for name, body in functions(open(path).read()).items():
        if name_part not in name:
            continue
        ins = instructions(body)
        print(f"{name}: {len(ins)} instructions")
        found = loops(ins)
        for lo, hi in sorted(found, key=lambda r: r[0] - r[1])[:count]:
            inner = [(a, b) for a, b in found if lo <= a and b <= hi and (a, b) != (lo, hi)]
            ops = collections.Counter(opcode(t) for a, t in ins if lo <= a <= hi and not any(x <= a <= y for x, y in inner))
            print(f"  loop {lo:#x}-{hi:#x}: {sum(ops.values())} instructions outside {len(inner)} inner loop(s); "
                  + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))


if __name__ == "__main__":
    main(sys.argv[1:])
