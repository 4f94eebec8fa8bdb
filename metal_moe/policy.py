"""The kernel-selection policy: which variant runs a call (DESIGN.md section 4), in pure Python.

The default table, by batch size M (tokens, never M * top_k):

    M        use_fp32_acc=False                       use_fp32_acc=True
    1        decode_G_U_D if (G,U,D) is specialised,  decode
             else decode
    2..16    prefill4                                 prefill4_fp32acc
    17..32   moe_trellis_swiglu                       moe_trellis_swiglu_fp32acc
    >= 33    large_batch (tile 128)                   moe_trellis_swiglu_fp32acc (tile 64)

``use_fp32_acc=None`` means auto: on when ``hidden >= 1024``.  ``simd`` is never chosen by the
table; ask for it by name.  The variant names here must equal the C registry
(native/core/variants.def); a test checks that they do.
"""

from __future__ import annotations

import dataclasses
import numbers

__all__ = [
    "VARIANTS",
    "SPECIALISED_BITS",
    "Decision",
    "TunedTable",
    "auto_fp32_acc",
    "check_variant",
    "fp32_fallback",
    "select",
    "select_moe_kernel",
]

PREFIX = "moe_trellis_swiglu"
DECODE = f"{PREFIX}_decode"
PREFILL4 = f"{PREFIX}_prefill4"
GENERAL = PREFIX
LARGE_BATCH = f"{PREFIX}_large_batch"
SIMD = f"{PREFIX}_simd"
FP32ACC = "_fp32acc"

# (gate, up, down) bit triples with a compile-time decode specialisation.
SPECIALISED_BITS = ((6, 2, 3), (6, 3, 4), (6, 2, 4))

VARIANTS = (
    DECODE,
    *(f"{DECODE}_{g}_{u}_{d}" for g, u, d in SPECIALISED_BITS),
    PREFILL4,
    PREFILL4 + FP32ACC,
    GENERAL,
    GENERAL + FP32ACC,
    LARGE_BATCH,
    SIMD,
)

TILE_N = {name: 128 if name == LARGE_BATCH else 64 for name in VARIANTS}

# The compile-time (gate, up, down) bits of each specialised decode.
_SPECIALISED = {f"{DECODE}_{g}_{u}_{d}": (g, u, d) for g, u, d in SPECIALISED_BITS}

# The fp32-accumulating variant an fp16-accumulating one falls back to (non-finite output, or
# fp32 asked for); fp32 variants map to themselves.
_FALLBACK = {
    PREFILL4: PREFILL4 + FP32ACC,
    GENERAL: GENERAL + FP32ACC,
    LARGE_BATCH: GENERAL + FP32ACC,
}

AUTO_FP32_HIDDEN = 1024      # use_fp32_acc=None turns fp32 accumulation on from this hidden size


@dataclasses.dataclass(frozen=True)
class Decision:
    """A policy decision: the variant, its tile width, the rule that made it and the table that
    rule comes from ("default", or the tuned table's file)."""

    name: str
    tile_n: int
    rule: str
    use_fp32_acc: bool
    table: str = "default"


def fp32_fallback(name):
    """The fp32-accumulating variant to re-run with (``name`` itself if it accumulates in fp32)."""
    check_variant(name)
    return _FALLBACK.get(name, name)


def accepts_bits(name, bits):
    """Whether variant ``name`` runs weights of these (gate, up, down) bits: every variant does,
    except a specialised decode, which runs only its own triple."""
    spec = _SPECIALISED.get(check_variant(name))
    return spec is None or tuple(float(b) for b in spec) == tuple(float(b) for b in bits)


def accumulates_fp16(name):
    return fp32_fallback(name) != name


def check_variant(name, available=None):
    """Validate a variant name (against ``available`` when given, e.g. a backend's list)."""
    valid = VARIANTS if available is None else tuple(available)
    if not isinstance(name, str):
        raise TypeError(f"kernel: expected a variant name, got {type(name).__name__}")
    if name not in valid:
        raise ValueError(f"kernel: unknown or unavailable variant {name!r}; valid variants: {', '.join(valid)}")
    return name


def auto_fp32_acc(use_fp32_acc, hidden):
    """Resolve ``use_fp32_acc`` (None = auto: on when ``hidden >= 1024``)."""
    if use_fp32_acc is None:
        return hidden >= AUTO_FP32_HIDDEN
    if not isinstance(use_fp32_acc, (bool, numbers.Integral)):
        raise TypeError(f"use_fp32_acc: expected True, False or None, got {type(use_fp32_acc).__name__}")
    return bool(use_fp32_acc)


def _bits_key(bits):
    return tuple(int(b) if float(b).is_integer() else float(b) for b in bits)


@dataclasses.dataclass(frozen=True)
class TunedTable:
    """A per-device table written by ``metal-moe tune`` (metal_moe/tune.py): for each bit triple and
    accumulation mode, the fastest variant that passed its correctness check at each batch size
    measured on this device."""

    source: str                  # the file it was read from
    key: tuple                   # (backend, device, library version) it was measured for
    entries: tuple               # ((bits, fp32, batch, variant), ...)

    def lookup(self, batch_size, fp32, bits):
        """(measured batch, variant) for the largest measured batch <= batch_size, or None."""
        rows = [(b, v) for bb, f, b, v in self.entries if _bits_key(bb) == bits and f == fp32 and b <= batch_size]
        return max(rows) if rows else None


def select(batch_size, use_fp32_acc, gate_bits, up_bits, down_bits, tuned=None):
    """The :class:`Decision` for a call (``use_fp32_acc`` must be resolved): from ``tuned`` (a
    :class:`TunedTable`) where it has a measurement for these bits at or below this batch size,
    else from the default table (DESIGN.md section 4)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size: expected an integer number of tokens, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1 token, got {batch_size}")
    fp32 = bool(use_fp32_acc)
    bits = _bits_key((gate_bits, up_bits, down_bits))
    if tuned is not None:
        hit = tuned.lookup(batch_size, fp32, bits)
        if hit is not None and hit[1] in VARIANTS and accepts_bits(hit[1], bits) and \
                not (fp32 and accumulates_fp16(hit[1])):
            return Decision(hit[1], TILE_N[hit[1]], f"tuned table {tuned.source}: the fastest correct variant "
                                                    f"measured at batch {hit[0]}", fp32, tuned.source)
    if batch_size == 1:
        if not fp32 and bits in SPECIALISED_BITS:
            name = next(n for n, b in _SPECIALISED.items() if b == bits)
            return Decision(name, 64, f"batch 1 and bits {bits} have a compile-time decode", fp32)
        why = "decode has no fp32acc twin; it accumulates in fp32" if fp32 else f"bits {bits} are not specialised"
        return Decision(DECODE, 64, f"batch 1: {why}", fp32)
    if batch_size <= 16:
        name = PREFILL4 + (FP32ACC if fp32 else "")
        return Decision(name, 64, "batch 2..16: 4 tokens share each decoded tile", fp32)
    if batch_size <= 32:
        name = GENERAL + (FP32ACC if fp32 else "")
        return Decision(name, 64, "batch 17..32: the general tile", fp32)
    if fp32:
        return Decision(GENERAL + FP32ACC, 64, "batch >= 33 with fp32 accumulation: large_batch has no fp32acc twin", fp32)
    return Decision(LARGE_BATCH, 128, "batch >= 33: wide tiles, maximum throughput", fp32)


def select_moe_kernel(batch_size, use_fp32_acc, gate_bits, up_bits, down_bits):
    """``(name, tile_n)`` of the default table (DESIGN.md section 4)."""
    d = select(batch_size, use_fp32_acc, gate_bits, up_bits, down_bits)
    return d.name, d.tile_n
