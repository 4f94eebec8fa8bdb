"""Shared fixtures and helpers: test vectors, small random weights, the hypothesis profile.

Test vectors: ``tests/data/`` holds a vendored subset of the reference implementation's vectors so
that a fresh clone is self-contained.  When the project's shared folder is present beside the
repository (``../shared/testdata/exl3/``), every file there is used instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from metal_moe import MoEWeights, SharedExpert, TrellisWeight

HERE = Path(__file__).resolve().parent
VENDORED_DIR = HERE / "data"
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "exl3"
VECTOR_DIR = SHARED_DIR if SHARED_DIR.is_dir() else VENDORED_DIR

MOE_PARTS = ("io", "gate", "up", "down")
MCG_MARKER = -877912083         # FORMAT.md 1: 0xCBAC1FED reinterpreted as int32
MUL1_MARKER = -2082680531       # FORMAT.md 1: 0x83DCD12D reinterpreted as int32

# tuned tables (metal-moe tune) live in the user cache: the tests use an empty one of their own, so
# that a developer's tuning never changes what the policy tests see
os.environ["METAL_MOE_CACHE"] = tempfile.mkdtemp(prefix="metal_moe_test_cache_")

settings.register_profile("metal_moe", deadline=None, max_examples=30, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "metal_moe"))


# --------------------------------------------------------------------------------------------
# test vectors
# --------------------------------------------------------------------------------------------
def single_layer_vectors():
    """Paths of the single-layer vectors ``exl3_<codebook>_K<K>.npz``, sorted."""
    paths = sorted(p for p in VECTOR_DIR.glob("exl3_*_K*.npz") if not p.name.startswith("exl3_moe_"))
    assert paths, f"no single-layer test vectors in {VECTOR_DIR}"
    return paths


def moe_case_path(part="io"):
    """Path of one file of the fused-MoE case (``part`` in io/gate/up/down)."""
    assert part in MOE_PARTS, part
    path = VECTOR_DIR / f"exl3_moe_mcg_{part}.npz"
    assert path.is_file(), f"missing MoE test vector {path}"
    return path


def load_vector(path):
    """An ``.npz`` vector as a plain dict; 0-dim strings become ``str``, other scalars stay arrays."""
    with np.load(path) as data:
        out = {}
        for key in data.files:
            value = data[key]
            out[key] = str(value) if value.dtype.kind == "U" else value
        return out


# --------------------------------------------------------------------------------------------
# random inputs, built from raw arrays (not through the package's own random constructors)
# --------------------------------------------------------------------------------------------
def words_per_tile(bits):
    """int16 words of one tile: 16*K (24, 40, 56 for K = 1.5, 2.5, 3.5)."""
    return int(round(16 * bits))


def random_words(rng, shape):
    """Uniform random int16 words (every 16-bit pattern equally likely)."""
    return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(np.int16)


def random_scales(rng, shape, magnitude=1.0):
    """Random-sign float16 scales of about ``magnitude`` (factor in [0.5, 1.5))."""
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return (sign * magnitude * rng.uniform(0.5, 1.5, size=shape)).astype(np.float16)


def random_layer(rng, in_features, out_features, bits, codebook="3inst", experts=None, magnitude=None):
    """A TrellisWeight from uniform random words and random-sign scales.

    The default ``|suh| ~ 1/sqrt(in_features)`` keeps ``x @ W_eff`` of the order of ``x``.
    """
    lead = () if experts is None else (experts,)
    trellis = random_words(rng, lead + (in_features // 16, out_features // 16, words_per_tile(bits)))
    if magnitude is None:
        magnitude = 1.0 / np.sqrt(in_features)
    suh = random_scales(rng, lead + (in_features,), magnitude)
    svh = random_scales(rng, lead + (out_features,))
    return TrellisWeight(trellis, suh, svh, codebook)


def random_moe(rng, hidden=128, intermediate=256, experts=3, bits=(4, 2, 3), codebooks="mcg", shared=False):
    """Small MoEWeights from :func:`random_layer`; ``codebooks`` is one name or a (gate, up, down) triple."""
    codebooks = (codebooks,) * 3 if isinstance(codebooks, str) else tuple(codebooks)
    dims = ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))

    def triple(lead):
        return [random_layer(rng, i, o, b, cb, lead) for (i, o), b, cb in zip(dims, bits, codebooks)]

    return MoEWeights(*triple(experts), SharedExpert(*triple(None)) if shared else None)


def save_checkpoint_dict(tensors, path):
    """Write a dict of NumPy arrays as a .safetensors file; return the path as a string."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    return str(path)


def checkpoint_dict(weights, path, prefix):
    """``weights.save_safetensors(path, prefix)`` read back as a plain dict, for editing by hand."""
    from safetensors.numpy import load_file

    weights.save_safetensors(path, prefix)
    return load_file(str(path))


def slow_unpack_signs(words):
    """FORMAT.md 1, legacy su/sv: element i is bit (i mod 16) of word i div 16, LSB first; 1 -> -1."""
    w = [int(v) & 0xFFFF for v in words]
    return [-1.0 if (w[i // 16] >> (i % 16)) & 1 else 1.0 for i in range(16 * len(w))]


def silu(g):
    return g / (1.0 + np.exp(-g))


# --------------------------------------------------------------------------------------------
# hypothesis strategies
# --------------------------------------------------------------------------------------------
INTEGER_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
HALF_BITS = (1.5, 2.5, 3.5)
CODEBOOKS = ("3inst", "mcg", "mul1")


@st.composite
def bits_and_codebook(draw):
    """A valid (bits, codebook) pair: any integer K with any codebook, half-integer K with mul1."""
    bits = draw(st.sampled_from(INTEGER_BITS + HALF_BITS))
    codebook = "mul1" if bits in HALF_BITS else draw(st.sampled_from(CODEBOOKS))
    return bits, codebook


seeds = st.integers(0, 2**32 - 1)
