"""The EXL3 format (FORMAT.md sections 1-4): reference vectors, bit layout, codebooks, Hadamard."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (
    CODEBOOKS,
    HALF_BITS,
    INTEGER_BITS,
    bits_and_codebook,
    load_vector,
    random_layer,
    random_words,
    seeds,
    single_layer_vectors,
    slow_unpack_signs,
    words_per_tile,
)
from metal_moe import TrellisWeight
from metal_moe.format import (
    codebook_lut,
    codebook_values,
    hadamard,
    pack_symbols,
    tile_permutation,
    tile_states,
    tile_symbols,
    unpack_signs,
)

H128 = 128


# --------------------------------------------------------------------------------------------
# slow bit-by-bit models, written from FORMAT.md and nothing else
# --------------------------------------------------------------------------------------------
def slow_stream_bits(words):
    """FORMAT.md 2.3: u[q] = uint16(w[2q]) | uint16(w[2q+1]) << 16; bit s = bit 31-(s%32) of u[s//32]."""
    w = [int(v) & 0xFFFF for v in np.asarray(words).ravel()]
    u = [w[2 * q] | (w[2 * q + 1] << 16) for q in range(len(w) // 2)]
    return [(u[s // 32] >> (31 - s % 32)) & 1 for s in range(32 * len(u))]


def slow_end(p, bits):
    """FORMAT.md 2.4/2.5: exclusive end of position p's own bits."""
    if float(bits).is_integer():
        return (p + 1) * int(bits)
    ka = int(bits)
    return ka * (p + 1) + (p + 1) // 2


def slow_width(p, bits):
    if float(bits).is_integer():
        return int(bits)
    return int(bits) + ((0xAAAA >> (p % 16)) & 1)


def slow_states(words, bits):
    """The 256 states of one tile: the 16-bit window ending at end(p), mod R, MSB first."""
    b = slow_stream_bits(words)
    ring = len(b)
    assert ring == round(256 * bits)
    states = []
    for p in range(256):
        end = slow_end(p, bits)
        s = 0
        for i in range(16):
            s = (s << 1) | b[(end - 16 + i) % ring]
        states.append(s)
    return states


def slow_position(p):
    """FORMAT.md 2.2: tile (row, column) of position p."""
    t, j = p // 8, p % 8
    return 2 * (t % 4) + (j & 1) + 8 * ((j >> 1) & 1), (t // 4) + 8 * (j >> 2)


def slow_codebook(state, codebook):
    """FORMAT.md 3 for one state, in Python integers; the final sum is exact in a double."""
    half = lambda bits16: float(np.uint16(bits16).view(np.float16))  # noqa: E731
    if codebook == "mul1":
        x = (state * 0x83DCD12D) % 2**32
        s = sum((x >> (8 * i)) & 0xFF for i in range(4))
        # (1024 + s) * A has 22 significant bits and the sum with B fits a double: one rounding.
        return np.float16((1024 + s) * half(0x1EEE) + half(0xC931))
    if codebook == "3inst":
        x = (state * 89226354 + 64248484) % 2**32
    else:
        x = (state * 0xCBAC1FED) % 2**32
    x = (x & 0x8FFF8FFF) ^ 0x3B603B60
    return np.float16(half(x & 0xFFFF) + half(x >> 16))


def explicit_w_eff(w_q, suh, svh):
    """diag(suh) @ blockdiag(H) @ W_q @ blockdiag(H) @ diag(svh), everything spelled out in float64."""
    k, n = w_q.shape
    h = hadamard()
    hk = np.kron(np.eye(k // H128), h)
    hn = np.kron(np.eye(n // H128), h)
    return np.diag(suh.astype(np.float64)) @ hk @ w_q.astype(np.float64) @ hn @ np.diag(svh.astype(np.float64))


# --------------------------------------------------------------------------------------------
# reference vectors
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=single_layer_vectors(), ids=lambda p: p.stem)
def vector(request):
    data = load_vector(request.param)
    layer = TrellisWeight(data["trellis"], data["suh"], data["svh"], data["codebook"])
    return data, layer


def test_vector_metadata(vector):
    data, layer = vector
    assert layer.bits == float(data["K"]) == data["trellis"].shape[-1] / 16
    assert layer.codebook == data["codebook"]
    assert (layer.in_features, layer.out_features) == data["W_q"].shape


def test_vector_decode_bit_exact(vector):
    data, layer = vector
    w_q = layer.decode()
    assert w_q.dtype == np.float16
    np.testing.assert_array_equal(w_q.view(np.uint16), data["W_q"].view(np.uint16))


def test_vector_dequantize(vector):
    data, layer = vector
    w_eff = layer.dequantize(np.float64)
    assert w_eff.dtype == np.float64
    # The stored W_eff went through the reference's fp16 pipeline (fp16 intermediates, 1-2 ulps):
    # the README reports at most ~0.014 against an exact evaluation, on values up to ~11, where
    # one fp16 ulp is 2**-7 = 0.0078.  0.02 allows those ~2 ulps and nothing like a wrong sign,
    # scale or permutation (which would give errors of the order of the values themselves).
    np.testing.assert_allclose(w_eff, data["W_eff"].astype(np.float64), rtol=0, atol=0.02)


def test_vector_matmul(vector):
    data, layer = vector
    y = layer.matmul(data["x"])
    assert y.dtype == np.float64 and y.shape == data["y"].shape
    # The stored y is the reference kernel's fp16 output: the README reports ~0.07 on values up
    # to ~105, where one fp16 ulp is 2**-4 = 0.0625; 0.1 is about 1.5 ulps at the largest values.
    np.testing.assert_allclose(y, data["y"].astype(np.float64), rtol=0, atol=0.1)


def test_vector_matmul_equals_x_at_dequantize(vector):
    data, layer = vector
    x = data["x"].astype(np.float64)
    y = layer.matmul(x)
    dense = x @ layer.dequantize(np.float64)
    assert np.max(np.abs(y - dense)) <= 1e-9 * np.max(np.abs(dense))


# --------------------------------------------------------------------------------------------
# codebooks (FORMAT.md 3)
# --------------------------------------------------------------------------------------------
# state -> (3INST, MCG, MUL1) fp16 bit patterns, from the table of FORMAT.md section 3
CODEBOOK_TABLE = {
    0x0000: (0x3A25, 0x3F60, 0xC2E8),
    0x0001: (0xBB5B, 0x304E, 0x3921),
    0x1234: (0xC066, 0x3E0F, 0xB89E),
    0x8000: (0xB7F8, 0xB915, 0xBAF2),
    0xFFFF: (0xB110, 0x3ACD, 0xB936),
}
# documented (min, max, std) over all 65536 states
CODEBOOK_STATS = {
    "3inst": (-3.957, 3.973, 1.24371),
    "mcg": (-3.949, 3.949, 1.24411),
    "mul1": (-3.453, 3.348, 1.00031),
}


@pytest.mark.parametrize("column, codebook", list(enumerate(CODEBOOKS)))
def test_codebook_reference_table(column, codebook):
    states = np.array(list(CODEBOOK_TABLE), dtype=np.uint32)
    want = np.array([row[column] for row in CODEBOOK_TABLE.values()], dtype=np.uint16)
    got = codebook_values(states, codebook)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), want)
    np.testing.assert_array_equal(codebook_lut(codebook)[states].view(np.uint16), want)


def test_codebook_reference_values_decimal():
    # a few of the table's decimal values, as a check on the table transcription itself
    assert float(codebook_values(np.array([0], np.uint32), "3inst")[0]) == 0.76806640625
    assert float(codebook_values(np.array([0x1234], np.uint32), "mcg")[0]) == 1.5146484375
    assert float(codebook_values(np.array([0xFFFF], np.uint32), "mul1")[0]) == -0.6513671875


@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_codebook_lut_range_and_std(codebook):
    lut = codebook_lut(codebook)
    assert lut.shape == (65536,) and lut.dtype == np.float16
    values = lut.astype(np.float64)
    assert np.all(np.isfinite(values))
    lo, hi, std = CODEBOOK_STATS[codebook]
    assert round(float(values.min()), 3) == lo
    assert round(float(values.max()), 3) == hi
    assert abs(values.std() - std) < 1e-4


@settings(max_examples=50)
@given(state=st.integers(0, 0xFFFF), codebook=st.sampled_from(CODEBOOKS))
def test_codebook_matches_scalar_model(state, codebook):
    got = codebook_values(np.array([state], dtype=np.uint32), codebook)[0]
    want = slow_codebook(state, codebook)
    assert got.view(np.uint16) == want.view(np.uint16)


# --------------------------------------------------------------------------------------------
# tensor-core permutation (FORMAT.md 2.2)
# --------------------------------------------------------------------------------------------
def test_tile_permutation_is_a_bijection():
    rows, cols = tile_permutation()
    assert rows.shape == cols.shape == (256,)
    assert rows.min() >= 0 and rows.max() < 16 and cols.min() >= 0 and cols.max() < 16
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 256
    assert [(int(r), int(c)) for r, c in zip(rows, cols)] == [slow_position(p) for p in range(256)]


@pytest.mark.parametrize("p, rc", [
    (0, (0, 0)), (1, (1, 0)), (2, (8, 0)), (3, (9, 0)), (4, (0, 8)), (5, (1, 8)), (6, (8, 8)),
    (7, (9, 8)), (8, (2, 0)), (31, (15, 8)), (32, (0, 1)), (255, (15, 15)),
])
def test_tile_permutation_examples(p, rc):
    rows, cols = tile_permutation()
    assert (int(rows[p]), int(cols[p])) == rc


# --------------------------------------------------------------------------------------------
# bit stream and states (FORMAT.md 2.3-2.5)
# --------------------------------------------------------------------------------------------
def tile_words(bits, nonzero):
    """One tile's words, zero except ``{index: value}``."""
    words = np.zeros(words_per_tile(bits), dtype=np.uint16)
    for index, value in nonzero.items():
        words[index] = value
    return words.view(np.int16)


def test_states_format_example():
    # FORMAT.md 2.3: K=2, only w[1] = 0x8000 (stream bit 0) set
    words = tile_words(2, {1: 0x8000})
    want = [0x0002, 0x0008, 0x0020, 0x0080, 0x0200, 0x0800, 0x2000, 0x8000] + [0] * 248
    assert tile_states(words, 2).tolist() == want
    assert slow_states(words, 2) == want


def test_states_last_bit_wraps_into_first_positions():
    # Only the last stream bit (bit 0 of u[last] = bit 0 of w[W-2]) is set, K=2, R=512.  The ring
    # is tail-biting, so it is the leading bit of the windows of positions 0..6 (ends 2..14): it
    # sits at state bit `end`.  Position 255's window [496, 512) holds it as its last bit.
    words = tile_words(2, {30: 0x0001})
    want = [4, 16, 64, 256, 1024, 4096, 16384] + [0] * 248 + [1]
    assert tile_states(words, 2).tolist() == want
    assert slow_states(words, 2) == want


@pytest.mark.parametrize("bits", [1, 2, 3, 8, 1.5, 2.5, 3.5])
def test_states_last_bit_wrap_every_width(bits):
    words = tile_words(bits, {words_per_tile(bits) - 2: 0x0001})
    states = tile_states(words, bits)
    ends = [slow_end(p, bits) for p in range(256)]
    want = [1 << end if end < 16 else 0 for end in ends]
    want[255] = 1
    assert states.tolist() == want
    assert states[0] == 1 << slow_end(0, bits)            # the first position always wraps


@settings(max_examples=40)
@given(data=st.data(), bits=st.sampled_from(INTEGER_BITS + HALF_BITS), tiles=st.integers(1, 2))
def test_states_match_slow_model(data, bits, tiles):
    n = words_per_tile(bits)
    words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=n * tiles, max_size=n * tiles))
    trellis = np.array(words, dtype=np.uint16).view(np.int16).reshape(tiles, n)
    states = tile_states(trellis, bits)
    assert states.shape == (tiles, 256)
    for t in range(tiles):
        assert states[t].tolist() == slow_states(trellis[t], bits)


@settings(max_examples=30)
@given(bits=st.sampled_from(INTEGER_BITS + HALF_BITS), seed=seeds)
def test_states_are_a_shift_register(bits, seed):
    # state(p) = (state(p-1) << D(p)) | own bits, mod 2**16, around the ring (p-1 of 0 is 255)
    states = tile_states(random_words(np.random.default_rng(seed), (words_per_tile(bits),)), bits)
    for p in range(256):
        d = slow_width(p, bits)
        assert states[p] >> d == states[p - 1] & (0xFFFF >> d)


@settings(max_examples=25)
@given(bc=bits_and_codebook(), seed=seeds)
def test_decode_matches_slow_model(bc, seed):
    bits, codebook = bc
    rng = np.random.default_rng(seed)
    layer = random_layer(rng, 128, 256, bits, codebook)
    w_q = layer.decode()
    assert w_q.shape == (128, 256) and w_q.dtype == np.float16
    for _ in range(2):                      # two random tiles, decoded the slow way
        i, j = int(rng.integers(8)), int(rng.integers(16))
        tile = np.empty((16, 16), dtype=np.float16)
        for p, s in enumerate(slow_states(layer.trellis[i, j], bits)):
            tile[slow_position(p)] = slow_codebook(s, codebook)
        block = w_q[16 * i:16 * i + 16, 16 * j:16 * j + 16]
        np.testing.assert_array_equal(block.view(np.uint16), tile.view(np.uint16))


# --------------------------------------------------------------------------------------------
# pack / symbols round trips
# --------------------------------------------------------------------------------------------
def random_symbols(rng, bits, lead):
    widths = np.array([slow_width(p, bits) for p in range(256)])
    return rng.integers(0, 1 << widths, size=lead + (256,))


@settings(max_examples=40)
@given(bits=st.sampled_from(INTEGER_BITS + HALF_BITS), seed=seeds)
def test_symbols_to_words_to_symbols(bits, seed):
    symbols = random_symbols(np.random.default_rng(seed), bits, (2, 3))
    words = pack_symbols(symbols, bits)
    assert words.dtype == np.int16 and words.shape == (2, 3, words_per_tile(bits))
    np.testing.assert_array_equal(tile_symbols(words, bits), symbols)
    # and by the slow model: a position's symbol is the low D(p) bits of its state
    slow = [s & ((1 << slow_width(p, bits)) - 1) for p, s in enumerate(slow_states(words[1, 2], bits))]
    assert slow == symbols[1, 2].tolist()


@settings(max_examples=40)
@given(bits=st.sampled_from(INTEGER_BITS + HALF_BITS), seed=seeds)
def test_words_to_symbols_to_words(bits, seed):
    words = random_words(np.random.default_rng(seed), (3, words_per_tile(bits)))
    symbols = tile_symbols(words, bits)
    np.testing.assert_array_equal(pack_symbols(symbols, bits), words)


@settings(max_examples=25)
@given(bc=bits_and_codebook(), experts=st.sampled_from([None, 2]), seed=seeds)
def test_trellis_weight_pack_round_trip(bc, experts, seed):
    bits, codebook = bc
    layer = random_layer(np.random.default_rng(seed), 128, 256, bits, codebook, experts)
    symbols = layer.symbols()
    lead = () if experts is None else (experts,)
    assert symbols.shape == lead + (8, 16, 256)
    back = TrellisWeight.pack(symbols, layer.suh, layer.svh, codebook, bits)
    assert back.bits == layer.bits and back.codebook == codebook
    np.testing.assert_array_equal(back.trellis, layer.trellis)
    np.testing.assert_array_equal(back.decode().view(np.uint16), layer.decode().view(np.uint16))


# --------------------------------------------------------------------------------------------
# Hadamard (FORMAT.md 4)
# --------------------------------------------------------------------------------------------
def test_hadamard_orthogonal_symmetric_normalised():
    h = hadamard()
    assert h.shape == (128, 128) and h.dtype == np.float64
    np.testing.assert_allclose(h @ h.T, np.eye(128), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(128), rtol=1e-15)


def test_hadamard_sylvester_signs():
    h = hadamard()
    for a in range(128):
        for b in range(128):
            assert (h[a, b] > 0) == (bin(a & b).count("1") % 2 == 0)


# --------------------------------------------------------------------------------------------
# dequantize and matmul are the composition of their parts (FORMAT.md 4)
# --------------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(bc=bits_and_codebook(), k=st.sampled_from([128, 256]), n=st.sampled_from([128, 256]), seed=seeds)
def test_dequantize_is_the_composition(bc, k, n, seed):
    bits, codebook = bc
    rng = np.random.default_rng(seed)
    layer = random_layer(rng, k, n, bits, codebook)
    want = explicit_w_eff(layer.decode(), layer.suh, layer.svh)
    w_eff = layer.dequantize(np.float64)
    np.testing.assert_allclose(w_eff, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert layer.dequantize().dtype == np.float32
    x = rng.standard_normal((3, k))
    y = layer.matmul(x)
    np.testing.assert_allclose(y, x @ want, rtol=0, atol=1e-9 * np.abs(x @ want).max())


@settings(max_examples=15)
@given(bc=bits_and_codebook(), seed=seeds)
def test_stacked_weight_is_its_experts(bc, seed):
    bits, codebook = bc
    rng = np.random.default_rng(seed)
    stacked = random_layer(rng, 256, 128, bits, codebook, experts=3)
    w_q, w_eff = stacked.decode(), stacked.dequantize(np.float64)
    assert w_q.shape == w_eff.shape == (3, 256, 128)
    x = rng.standard_normal((2, 256))
    y = stacked.matmul(x)
    assert y.shape == (3, 2, 128)
    for e in range(3):
        expert = stacked[e]
        assert expert.experts is None and expert.bits == stacked.bits
        np.testing.assert_array_equal(expert.trellis, stacked.trellis[e])
        np.testing.assert_array_equal(w_q[e].view(np.uint16), expert.decode().view(np.uint16))
        want = explicit_w_eff(w_q[e], stacked.suh[e], stacked.svh[e])
        np.testing.assert_allclose(w_eff[e], want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        np.testing.assert_allclose(y[e], x @ want, rtol=0, atol=1e-9 * np.abs(x @ want).max())
    np.testing.assert_array_equal(stacked[-1].trellis, stacked.trellis[2])


# --------------------------------------------------------------------------------------------
# legacy su / sv (FORMAT.md 1)
# --------------------------------------------------------------------------------------------
def test_unpack_signs_hand_built():
    words = np.array([0x0001, 0x8000, 0x0000, 0xFFFF], dtype=np.uint16).view(np.int16)
    signs = unpack_signs(words)
    assert signs.dtype == np.float16 and signs.shape == (64,)
    want = np.ones(64)
    want[0] = -1            # LSB of word 0 is element 0
    want[16 + 15] = -1      # MSB of word 1 is element 31
    want[48:] = -1          # every bit of word 3
    np.testing.assert_array_equal(signs, want)
    np.testing.assert_array_equal(unpack_signs(words, 20), want[:20])


@settings(max_examples=30)
@given(words=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=12))
def test_unpack_signs_matches_bit_model(words):
    signs = unpack_signs(np.array(words, dtype=np.uint16).view(np.int16))
    assert signs.dtype == np.float16
    assert signs.tolist() == slow_unpack_signs(words)


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, codebook", [(1, "3inst"), (3, "mcg"), (8, "mul1"), (2.5, "mul1"), (1.5, "mul1")])
@pytest.mark.parametrize("experts", [None, 3])
def test_properties(bits, codebook, experts):
    layer = random_layer(np.random.default_rng(0), 256, 384, bits, codebook, experts)
    assert layer.bits == bits
    assert isinstance(layer.bits, int if bits in INTEGER_BITS else float)
    assert layer.codebook == codebook
    assert (layer.in_features, layer.out_features) == (256, 384)
    assert layer.experts == experts
    count = 1 if experts is None else experts
    want_bytes = count * (16 * 24 * words_per_tile(bits) * 2 + 256 * 2 + 384 * 2)
    assert layer.nbytes == want_bytes
    assert layer.decode().nbytes == count * 256 * 384 * 2
