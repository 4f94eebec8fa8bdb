"""The Metal backend (macOS, Apple silicon): the same checks as the CPU backend's, with
backend="metal".  Skipped elsewhere: Metal exists only on macOS, and no Apple machine has run
these yet (README, "Backends"); .github/workflows/macos.yml runs them on an Apple-silicon runner."""

import numpy as np
import pytest

import metal_moe as mm
from metal_moe import policy

from native_cases import (HIDDEN, RSF, check, check_decoder_on_vectors, check_exl3_moe, expected, exl3_moe_case, inputs,
                          matrix, weights)

pytestmark = pytest.mark.skipif("metal" not in mm.backends(),
                                reason="no Metal device (Metal is built and run on macOS with Apple silicon only)")

BATCHES = [1, 2, 3, 16, 17, 33, 64]


def run(variant, codebook, bits, batch, shared, out_dtype=np.float32):
    x, ids, p = inputs(batch)
    out = np.full((batch, HIDDEN), np.nan, dtype=out_dtype)
    got = mm.fused_moe(x, ids, p, weights(codebook, bits, shared), backend="metal", kernel=variant, out=out,
                       routed_scaling_factor=RSF)
    assert got is out
    return out


@pytest.mark.parametrize("variant,codebook,bits,batch,shared", matrix(batches=BATCHES))
def test_variant_matches_reference(variant, codebook, bits, batch, shared):
    check(run(variant, codebook, bits, batch, shared), expected(codebook, bits, shared, batch), variant)


def test_every_variant_is_built():
    assert mm.variants("metal") == policy.VARIANTS


@pytest.mark.parametrize("variant", policy.VARIANTS)
def test_exl3_moe_vector(variant):
    io, w = exl3_moe_case(variant)
    out = np.full(io["y"].shape, np.nan, np.float32)
    mm.fused_moe(io["x"], io["selected_experts"], io["routing_weights"], w, backend="metal", kernel=variant, out=out)
    check_exl3_moe(out, io, w, variant)


def test_decoder_is_bit_exact_on_the_vectors():
    ctx = mm.Context("metal")

    def decode(trellis, k, n, kx2, codebook):
        out = np.full((k, n), 0xFFFF, np.uint16)
        ctx.decode(trellis, k, n, kx2, codebook, out, True)
        return out

    check_decoder_on_vectors(decode)


@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
def test_activation_dtypes_and_unaligned_arrays(x_dtype):
    """Small arrays are rarely page-aligned: these take the documented copy path."""
    x, ids, p = inputs(5)
    w = weights("mcg", (6, 2, 3), True)
    out = np.full((5, HIDDEN), np.nan, np.float32)
    mm.fused_moe(x.astype(x_dtype), ids, p, w, backend="metal", out=out, routed_scaling_factor=RSF)
    check(out, expected("mcg", (6, 2, 3), True, 5), policy.select(5, False, 6, 2, 3).name)
