"""The EXL3 trellis format in vectorised NumPy (docs/FORMAT.md is the specification).

Everything here is the *oracle*: small, direct transcriptions of the format rules, used by the
reference forward, by the loaders and by every backend's tests.  Nothing loops over weights or
tiles in Python; all functions work on arrays of tiles at once.

Vocabulary
    tile      a 16x16 block of the decoded weight, coded by ``16*K`` int16 words
    position  ``p = 0..255``: the coding order inside a tile (the tensor-core permutation)
    stream    a tile's words read as a ring of ``256*K`` bits (FORMAT.md 2.3)
    state     the 16-bit window of the stream that ends at a position's own bits (2.4, 2.5)
    symbol    a position's own ``K`` (or ``KA``/``KA+1``) bits, the low bits of its state
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

__all__ = [
    "CODEBOOKS",
    "HADAMARD_SIZE",
    "TILE",
    "MCG_MARKER",
    "MUL1_MARKER",
    "TrellisWeight",
    "check_bits",
    "codebook_lut",
    "codebook_values",
    "hadamard",
    "position_widths",
    "position_ends",
    "tile_permutation",
    "stream_words",
    "tile_states",
    "tile_symbols",
    "pack_symbols",
    "unpack_signs",
]

TILE = 16                       # weights per tile side
POSITIONS = TILE * TILE         # 256 positions per tile
HADAMARD_SIZE = 128             # both Hadamard rotations use 128-blocks only
CODEBOOKS = ("3inst", "mcg", "mul1")
INTEGER_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
HALF_BITS = (1.5, 2.5, 3.5)     # MUL1 only
MCG_MARKER = np.int32(np.uint32(0xCBAC1FED).view(np.int32))     # -877912083
MUL1_MARKER = np.int32(np.uint32(0x83DCD12D).view(np.int32))    # -2082680531

# Codebook constants (FORMAT.md section 3).
_3INST_MUL, _3INST_ADD = 89226354, 64248484
_MCG_MUL = 0xCBAC1FED
_MUL1_MUL = 0x83DCD12D
_HALF_MASK, _HALF_XOR = 0x8FFF8FFF, 0x3B603B60
_MUL1_A = np.uint16(0x1EEE).view(np.float16)     # 0.00676727294921875
_MUL1_B = np.uint16(0xC931).view(np.float16)     # -10.3828125
# Documented value ranges over all 65536 states, (min, max), and standard deviations.
CODEBOOK_RANGE = {"3inst": (-3.957, 3.973), "mcg": (-3.949, 3.949), "mul1": (-3.453, 3.348)}
CODEBOOK_STD = {"3inst": 1.24371, "mcg": 1.24411, "mul1": 1.00031}


# --------------------------------------------------------------------------------------------
# bits per weight
# --------------------------------------------------------------------------------------------
def check_bits(bits, codebook="3inst", *, name="bits"):
    """Validate a bit width for a codebook; return it as int (integer K) or float (half K)."""
    codebook = check_codebook(codebook)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real):
        raise TypeError(f"{name}: expected a number of bits per weight, got {type(bits).__name__}")
    if float(bits) in INTEGER_BITS:
        return int(bits)
    if float(bits) in HALF_BITS:
        if codebook != "mul1":
            raise ValueError(
                f"{name}: half-integer K={float(bits)} is valid only with the mul1 codebook, "
                f"not {codebook!r}"
            )
        return float(bits)
    raise ValueError(f"{name}: {bits} bits per weight is not valid; expected 1..8 or 1.5/2.5/3.5 (mul1)")


def check_codebook(codebook, *, name="codebook"):
    if not isinstance(codebook, str):
        raise TypeError(f"{name}: expected one of {CODEBOOKS}, got {type(codebook).__name__}")
    if codebook not in CODEBOOKS:
        raise ValueError(f"{name}: unknown codebook {codebook!r}; expected one of {CODEBOOKS}")
    return codebook


def words_per_tile(bits):
    """int16 words per tile: ``16*K`` (24, 40, 56 for the half-integer rates)."""
    return int(round(16 * bits))


# --------------------------------------------------------------------------------------------
# positions: permutation (2.2) and bit layout (2.4, 2.5)
# --------------------------------------------------------------------------------------------
@functools.cache
def tile_permutation():
    """(rows, cols): int arrays of 256, tile row and column of every position (FORMAT.md 2.2)."""
    p = np.arange(POSITIONS)
    t, j = p // 8, p % 8
    rows = 2 * (t % 4) + (j & 1) + 8 * ((j >> 1) & 1)
    cols = (t // 4) + 8 * (j >> 2)
    rows.flags.writeable = False
    cols.flags.writeable = False
    return rows, cols


def position_widths(bits):
    """Width in bits of each of the 256 positions (all K, or alternating KA / KA+1)."""
    p = np.arange(POSITIONS)
    if float(bits).is_integer():
        return np.full(POSITIONS, int(bits))
    ka = int(bits)
    return ka + ((0xAAAA >> (p % 16)) & 1)


def position_ends(bits):
    """Exclusive end, in stream bits, of each position's own bits."""
    p1 = np.arange(1, POSITIONS + 1)
    if float(bits).is_integer():
        return int(bits) * p1
    return int(bits) * p1 + p1 // 2


def ring_bits(bits):
    return POSITIONS * words_per_tile(bits) // TILE


# --------------------------------------------------------------------------------------------
# bit stream (2.3) and states (2.4, 2.5)
# --------------------------------------------------------------------------------------------
def stream_words(trellis):
    """The 32-bit stream words ``u[q] = w[2q] | w[2q+1] << 16`` of each tile, as uint32."""
    w = np.ascontiguousarray(trellis).view(np.uint16).astype(np.uint32)
    return w[..., 0::2] | (w[..., 1::2] << np.uint32(16))


def tile_states(trellis, bits, order=None):
    """16-bit state of every position of every tile: uint32 array ``[..., 256]``.

    ``trellis`` is ``[..., 16*K]`` int16.  A state is the 16-bit window of the ring that ends at
    the position's own bits; the window may straddle two 32-bit words and wraps around the ring.
    ``order`` (optional, 256 position indices) returns the states of those positions instead, in
    that order.
    """
    u = stream_words(trellis).astype(np.uint64)
    nwords = u.shape[-1]
    R = 32 * nwords
    ends = position_ends(bits)
    if order is not None:
        ends = ends[order]
    start = (ends - 16) % R                                    # first bit of each window
    q = start // 32
    offset = start % 32                                        # MSB-first offset in word q
    pair = (u[..., q] << np.uint64(32)) | u[..., (q + 1) % nwords]
    shift = (48 - offset).astype(np.uint64)                    # 64 - 16 - offset
    return ((pair >> shift) & np.uint64(0xFFFF)).astype(np.uint32)


@functools.cache
def _row_major_positions():
    """The position held by each tile element in row-major (r, c) order: inverse permutation."""
    rows, cols = tile_permutation()
    inverse = np.empty(POSITIONS, dtype=np.intp)
    inverse[rows * TILE + cols] = np.arange(POSITIONS)
    inverse.flags.writeable = False
    return inverse


def tile_symbols(trellis, bits):
    """Each position's own bits (the low ``D(p)`` bits of its state): uint32 ``[..., 256]``."""
    mask = (np.uint32(1) << position_widths(bits).astype(np.uint32)) - np.uint32(1)
    return tile_states(trellis, bits) & mask


def pack_symbols(symbols, bits):
    """Inverse of :func:`tile_symbols`: per-position symbols ``[..., 256]`` -> int16 ``[..., 16*K]``.

    Position p's symbol is written MSB first into stream bits ``[end(p) - D(p), end(p))``.
    """
    symbols = np.asarray(symbols)
    if symbols.shape[-1:] != (POSITIONS,):
        raise ValueError(f"symbols: last dimension must be {POSITIONS} positions, got shape {symbols.shape}")
    if not np.issubdtype(symbols.dtype, np.integer):
        raise TypeError(f"symbols: expected an integer array, got {symbols.dtype}")
    widths = position_widths(bits)
    if np.any(symbols < 0) or np.any(symbols >= (1 << widths)):
        raise ValueError(f"symbols: every symbol must fit its position's width ({int(widths.min())}..{int(widths.max())} bits)")
    ends = position_ends(bits)
    R = ring_bits(bits)
    stream = np.zeros(symbols.shape[:-1] + (R,), dtype=np.uint8)
    sym = symbols.astype(np.uint32)
    for b in range(int(widths.max())):                 # loop over bit significance, <= 5 steps
        has = widths > b                               # positions that own a bit b
        bit = (sym[..., has] >> np.uint32(b)) & np.uint32(1)
        stream[..., ends[has] - 1 - b] = bit.astype(np.uint8)
    u = np.packbits(stream, axis=-1).reshape(symbols.shape[:-1] + (R // 32, 4))
    u = u.view(">u4")[..., 0].astype(np.uint32)        # MSB-first 32-bit words
    words = np.empty(symbols.shape[:-1] + (R // 16,), dtype=np.uint16)
    words[..., 0::2] = u & np.uint32(0xFFFF)
    words[..., 1::2] = u >> np.uint32(16)
    return words.view(np.int16)


# --------------------------------------------------------------------------------------------
# codebooks (3)
# --------------------------------------------------------------------------------------------
def _two_halves_sum(x):
    x = (x & np.uint32(_HALF_MASK)) ^ np.uint32(_HALF_XOR)
    lo = (x & np.uint32(0xFFFF)).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = (x >> np.uint32(16)).astype(np.uint16).view(np.float16).astype(np.float64)
    return (lo + hi).astype(np.float16)     # exact in float64, rounded once to fp16


def codebook_values(states, codebook):
    """fp16 weight value of each 16-bit state (uint32 array), bit-exact with FORMAT.md 3."""
    codebook = check_codebook(codebook)
    x = np.asarray(states, dtype=np.uint32)
    with np.errstate(over="ignore"):
        if codebook == "3inst":
            return _two_halves_sum(x * np.uint32(_3INST_MUL) + np.uint32(_3INST_ADD))
        if codebook == "mcg":
            return _two_halves_sum(x * np.uint32(_MCG_MUL))
        x = x * np.uint32(_MUL1_MUL)
    s = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
    h = 1024.0 + s.astype(np.float64)
    # h*A is exact in float64 (11 x 11 significant bits) and so is the sum: one rounding, an FMA.
    return (h * np.float64(_MUL1_A) + np.float64(_MUL1_B)).astype(np.float16)


@functools.cache
def codebook_lut(codebook):
    """All 65536 codebook values of a codebook, as a read-only float16 array."""
    lut = codebook_values(np.arange(1 << 16, dtype=np.uint32), codebook)
    lut.flags.writeable = False
    return lut


# --------------------------------------------------------------------------------------------
# Hadamard (4)
# --------------------------------------------------------------------------------------------
@functools.cache
def hadamard(size=HADAMARD_SIZE):
    """Normalised natural-order Sylvester Hadamard matrix, float64 ``[size, size]``."""
    a = np.arange(size)
    both = a[:, None] & a[None, :]
    parity = np.zeros_like(both)
    while both.any():
        parity ^= both & 1
        both = both >> 1
    h = (1.0 - 2.0 * parity) / np.sqrt(size)
    h.flags.writeable = False
    return h


def apply_hadamard(x, axis=-1):
    """Apply the block-diagonal ``I ⊗ H/sqrt(128)`` along ``axis`` (float64)."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    shape = x.shape
    y = (x.reshape(shape[:-1] + (shape[-1] // HADAMARD_SIZE, HADAMARD_SIZE)) @ hadamard()).reshape(shape)
    return np.moveaxis(y, -1, axis)


def unpack_signs(words, length=None):
    """Legacy ``su``/``sv``: int16 words -> fp16 +-1 vector (bit i of word i//16, LSB first; 1 -> -1)."""
    w = np.asarray(words).view(np.uint16)
    bits = (w[..., :, None] >> np.arange(16, dtype=np.uint16)) & 1
    signs = (1.0 - 2.0 * bits).astype(np.float16).reshape(w.shape[:-1] + (w.shape[-1] * 16,))
    return signs if length is None else signs[..., :length]


# --------------------------------------------------------------------------------------------
# one EXL3 linear layer, or a stack of them
# --------------------------------------------------------------------------------------------
def _require_array(value, name, dtype, ndims):
    if not isinstance(value, np.ndarray):
        if not hasattr(value, "__array__") and not hasattr(value, "__array_interface__"):
            raise TypeError(f"{name}: expected a NumPy array, got {type(value).__name__}")
        value = np.asarray(value)
    if value.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {value.dtype}")
    if value.ndim not in ndims:
        raise ValueError(f"{name}: expected {' or '.join(map(str, ndims))} dimensions, got shape {value.shape}")
    return value


class TrellisWeight:
    """One EXL3 linear layer ``[in, out]``, or a stack of ``E`` of them (a leading expert axis).

    ``trellis`` int16 ``[in/16, out/16, 16*K]`` or ``[E, in/16, out/16, 16*K]``, ``suh`` float16
    ``[in]`` / ``[E, in]``, ``svh`` float16 ``[out]`` / ``[E, out]``.  The arrays are borrowed, not
    copied.  ``w[e]`` is expert ``e`` of a stack, ``w[a:b]`` a stack of experts ``a..b-1``.
    """

    __slots__ = ("trellis", "suh", "svh", "codebook", "bits")

    def __init__(self, trellis, suh, svh, codebook="3inst"):
        codebook = check_codebook(codebook)
        trellis = _require_array(trellis, "trellis", np.int16, (3, 4))
        stacked = trellis.ndim == 4
        vec_dims = (2,) if stacked else (1,)
        suh = _require_array(suh, "suh", np.float16, vec_dims)
        svh = _require_array(svh, "svh", np.float16, vec_dims)
        last = trellis.shape[-1]
        if last % 8 or not 1 <= last / 16 <= 8 or (last / 16) not in INTEGER_BITS + HALF_BITS:
            raise ValueError(
                f"trellis: last dimension must be 16*K for K in 1..8 (or 24/40/56 for K=1.5/2.5/3.5 "
                f"with mul1), got {last} (shape {trellis.shape})"
            )
        bits = check_bits(last / 16, codebook, name="trellis")
        in_features, out_features = trellis.shape[-3] * TILE, trellis.shape[-2] * TILE
        for dim, what in ((in_features, "in_features"), (out_features, "out_features")):
            if dim == 0 or dim % HADAMARD_SIZE:
                raise ValueError(
                    f"trellis: {what} = {dim} (from shape {trellis.shape}) must be a positive multiple of "
                    f"{HADAMARD_SIZE}"
                )
        if suh.shape[-1] != in_features:
            raise ValueError(f"suh: expected {in_features} input features to match trellis {trellis.shape}, got shape {suh.shape}")
        if svh.shape[-1] != out_features:
            raise ValueError(f"svh: expected {out_features} output features to match trellis {trellis.shape}, got shape {svh.shape}")
        if stacked:
            for vec, name in ((suh, "suh"), (svh, "svh")):
                if vec.shape[0] != trellis.shape[0]:
                    raise ValueError(f"{name}: {vec.shape[0]} experts, but trellis has {trellis.shape[0]}")
        self.trellis, self.suh, self.svh = trellis, suh, svh
        self.codebook, self.bits = codebook, bits

    # ---- description ------------------------------------------------------------------------
    @property
    def in_features(self):
        return self.trellis.shape[-3] * TILE

    @property
    def out_features(self):
        return self.trellis.shape[-2] * TILE

    @property
    def experts(self):
        return self.trellis.shape[0] if self.trellis.ndim == 4 else None

    @property
    def nbytes(self):
        return self.trellis.nbytes + self.suh.nbytes + self.svh.nbytes

    def __len__(self):
        if self.experts is None:
            raise TypeError("an unstacked TrellisWeight has no experts to count")
        return self.experts

    def __getitem__(self, e):
        """``w[e]``: expert ``e`` (unstacked); ``w[a:b]``: experts ``a..b-1`` as a stack.  Both are
        views of this weight's arrays, not copies; a slice must have step 1 (so that it stays
        C-contiguous, as the kernels need) and may be empty."""
        if self.experts is None:
            raise TypeError("an unstacked TrellisWeight cannot be indexed by expert")
        if isinstance(e, slice):
            span = range(self.experts)[e]
            if span.step != 1:
                raise ValueError(f"expert slice: step must be 1 (a contiguous range of experts), got {e.step}")
            e = slice(span.start, span.stop)
        else:
            e = int(np.arange(self.experts)[e])        # negative indices, IndexError for range
        return TrellisWeight(self.trellis[e], self.suh[e], self.svh[e], self.codebook)

    def __repr__(self):
        stack = "" if self.experts is None else f"experts={self.experts}, "
        return (f"TrellisWeight({stack}in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, codebook={self.codebook!r})")

    # ---- decoding ---------------------------------------------------------------------------
    def states(self):
        """16-bit state of every position: uint32 ``[..., in/16, out/16, 256]``."""
        return tile_states(self.trellis, self.bits)

    def symbols(self):
        """Per-position symbols (each position's own bits): uint32 ``[..., in/16, out/16, 256]``."""
        return tile_symbols(self.trellis, self.bits)

    def decode(self):
        """``W_q``: the rotated-basis fp16 weight ``[in, out]`` (``[E, in, out]`` for a stack)."""
        # States gathered in row-major tile order, so the permutation costs nothing extra.
        states = tile_states(self.trellis, self.bits, order=_row_major_positions())
        tiles = codebook_lut(self.codebook)[states]                  # [..., ti, tj, 256]
        lead, (ti, tj) = tiles.shape[:-3], tiles.shape[-3:-1]
        tiles = tiles.reshape(lead + (ti, tj, TILE, TILE))
        # [..., ti, tj, r, c] -> [..., ti, r, tj, c] -> [..., in, out]
        return np.ascontiguousarray(np.swapaxes(tiles, -3, -2)).reshape(lead + (ti * TILE, tj * TILE))

    def dequantize(self, dtype=np.float32):
        """``W_eff = diag(suh) Hk W_q Hn diag(svh)``, computed in float64 and cast to ``dtype``."""
        w = apply_hadamard(apply_hadamard(self.decode(), axis=-2), axis=-1)
        w *= self.suh.astype(np.float64)[..., :, None]
        w *= self.svh.astype(np.float64)[..., None, :]
        return w.astype(dtype, copy=False)

    def matmul(self, x, decoded=None):
        """``x @ W_eff`` in float64 (the reference linear forward); ``x`` is ``[..., in]``.

        Evaluated as ``(((x ⊙ suh) Hk) W_q Hn) ⊙ svh``, which is the same product, associated so
        that ``W_eff`` is never formed.  Stacked weights broadcast over the expert axis
        (``x`` ``[E, m, in]`` or ``[m, in]``).  ``decoded``: an optional dict caching ``W_q`` per
        weight (keyed by the trellis buffer's address), for repeated references.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {x.shape}")
        suh = self.suh.astype(np.float64)
        svh = self.svh.astype(np.float64)
        if self.experts is not None:
            suh, svh = suh[:, None, :], svh[:, None, :]
        h = apply_hadamard(x * suh)
        return apply_hadamard(h @ self._decoded(decoded)) * svh

    def _decoded(self, cache):
        """``decode()`` as float64; the fp16 ``W_q`` is memoised in ``cache`` (a dict) if given."""
        if cache is None:
            return self.decode().astype(np.float64)
        key = (self.trellis.__array_interface__["data"][0], self.trellis.shape, self.codebook)
        if key not in cache:
            cache[key] = self.decode()
        return cache[key].astype(np.float64)

    # ---- building ---------------------------------------------------------------------------
    @classmethod
    def pack(cls, symbols, suh, svh, codebook="3inst", bits=None):
        """Build a TrellisWeight from per-position symbols ``[..., in/16, out/16, 256]``.

        ``bits`` is required: symbols alone do not say their width.  ``TrellisWeight.pack(w.symbols(),
        w.suh, w.svh, w.codebook, w.bits)`` reproduces ``w.trellis`` exactly.
        """
        if bits is None:
            raise TypeError("bits: pack needs the bits per weight of the symbols")
        bits = check_bits(bits, codebook)
        return cls(pack_symbols(symbols, bits), suh, svh, codebook)

    @classmethod
    def random(cls, in_features, out_features, bits, codebook="3inst", *, experts=None, rng=None,
               input_scale=None, output_scale=1.0):
        """Uniformly random trellis words and random-sign scale vectors.

        ``|suh| = input_scale`` (default ``1 / (std(codebook) * sqrt(in_features))``) and
        ``|svh| = output_scale``, each times a random factor in [0.75, 1.25), so that
        ``x @ W_eff`` has about the scale of ``x``.
        """
        bits = check_bits(bits, codebook)
        rng = np.random.default_rng(rng)
        for dim, what in ((in_features, "in_features"), (out_features, "out_features")):
            if not isinstance(dim, numbers.Integral) or dim <= 0 or dim % HADAMARD_SIZE:
                raise ValueError(f"{what}: must be a positive multiple of {HADAMARD_SIZE}, got {dim!r}")
        lead = () if experts is None else (int(experts),)
        shape = lead + (in_features // TILE, out_features // TILE, words_per_tile(bits))
        trellis = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(np.int16)
        if input_scale is None:
            input_scale = 1.0 / (CODEBOOK_STD[codebook] * np.sqrt(in_features))

        def scales(n, magnitude):
            sign = rng.choice(np.array([-1.0, 1.0]), size=lead + (n,))
            return (sign * magnitude * rng.uniform(0.75, 1.25, size=lead + (n,))).astype(np.float16)

        return cls(trellis, scales(in_features, input_scale), scales(out_features, output_scale), codebook)
