"""``python -m metal_moe``: the ``metal-moe`` command; with no arguments, the version and a decode
self-check against known answers."""

import sys

import numpy as np

from . import __version__
from .format import CODEBOOKS, TrellisWeight, codebook_values, tile_states

# FORMAT.md section 3's table: state -> fp16 bit pattern of the decoded value, per codebook.
KNOWN_VALUES = {
    0x0000: (0x3A25, 0x3F60, 0xC2E8),
    0x0001: (0xBB5B, 0x304E, 0x3921),
    0x1234: (0xC066, 0x3E0F, 0xB89E),
    0x8000: (0xB7F8, 0xB915, 0xBAF2),
    0xFFFF: (0xB110, 0x3ACD, 0xB936),
}


def self_check():
    """Return a list of (check, ok) pairs; every one is computed, none is assumed."""
    results = []
    states = np.array(list(KNOWN_VALUES), dtype=np.uint32)
    for i, codebook in enumerate(CODEBOOKS):
        got = codebook_values(states, codebook).view(np.uint16)
        want = np.array([v[i] for v in KNOWN_VALUES.values()], dtype=np.uint16)
        results.append((f"codebook {codebook}: 5 reference values bit-exact", np.array_equal(got, want)))
    # FORMAT.md 2.3's example: K=2, only stream bit 0 set -> states of positions 0..7.
    words = np.zeros(32, dtype=np.uint16)
    words[1] = 0x8000
    got = tile_states(words.view(np.int16), 2)
    want = np.zeros(256, dtype=np.uint32)
    want[:8] = [0x0002, 0x0008, 0x0020, 0x0080, 0x0200, 0x0800, 0x2000, 0x8000]
    results.append(("bit stream: FORMAT.md 2.3 example states", np.array_equal(got, want)))
    w = TrellisWeight.random(256, 384, 3, "mcg", rng=0)
    back = TrellisWeight.pack(w.symbols(), w.suh, w.svh, w.codebook, w.bits)
    results.append(("pack(symbols(w)) reproduces the trellis words", np.array_equal(back.trellis, w.trellis)))
    x = np.random.default_rng(1).standard_normal((3, 256))
    ok = np.allclose(w.matmul(x), x @ w.dequantize(np.float64), rtol=1e-10, atol=1e-10)
    results.append(("matmul(x) == x @ dequantize()", bool(ok)))
    return results


def self_check_report():
    print(f"metal_moe {__version__}")
    results = self_check()
    for name, ok in results:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    failed = sum(not ok for _, ok in results)
    print("decode self-check:", "passed" if not failed else f"{failed} FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    from .cli import main

    sys.exit(main())
