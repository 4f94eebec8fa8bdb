"""Shared cases for the kernel tests: small random MoE layers, routings and their float64 references.

Tolerances (max |y - ref| over the output, relative to max |ref|), per accumulation mode:
  * fp32 accumulation: 4e-3.  Every variant keeps the EXL3 kernel's fp16 intermediates (x*suh,
    the rotated inputs, the gate/up results, silu, the product, the down input: FORMAT.md 5), each
    a rounding of relative size <= 2^-11 = 4.9e-4; about six of them in a chain give ~1e-3 at the
    worst element (measured: <= 1.2e-3 at hidden 256, 0.9e-3 at hidden 2048).
  * fp16 accumulation: 1e-2.  The running sums are also rounded to fp16 after every 16-row
    k-slice (hidden/16 and intermediate/16 more roundings, on sums larger than the result);
    measured <= 2.7e-3.
"""

import functools
import zlib

import numpy as np
import pytest

import metal_moe as mm
from metal_moe import policy, reference

from conftest import moe_case_path, single_layer_vectors

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 256, 384, 8, 2     # hidden < 1024: the policy's auto fp32 rule is off
TOL = {True: 4e-3, False: 1e-2}      # keyed by "accumulates in fp32"
BITS = [(6, 2, 3), (4, 2, 3), (1, 8, 5), (6, 3, 4), (6, 2, 4)]
HALF_BITS = [(2.5, 1.5, 3.5)]        # mul1 only
CODEBOOKS = ["3inst", "mcg", "mul1"]
BATCHES = [1, 2, 3, 5, 16, 17, 33, 64]
RSF = 1.25


def seed_of(*key):
    return zlib.crc32(repr(key).encode())


@functools.lru_cache(maxsize=None)
def weights(codebook, bits, shared, experts=EXPERTS, intermediate=INTERMEDIATE):
    return mm.MoEWeights.random(hidden=HIDDEN, intermediate=intermediate, experts=experts, bits=bits,
                                codebook=codebook, shared=shared, seed=seed_of(codebook, bits, shared))


@functools.lru_cache(maxsize=None)
def inputs(batch, seed=0, experts=EXPERTS):
    rng = np.random.default_rng(seed_of(batch, seed))
    x = rng.standard_normal((batch, HIDDEN)).astype(np.float16)
    ids, p = reference.route(rng.standard_normal((batch, experts)), TOP_K)
    return x, ids, p


@functools.lru_cache(maxsize=None)
def expected(codebook, bits, shared, batch):
    x, ids, p = inputs(batch)
    return reference.moe_forward(x, ids, p, weights(codebook, bits, shared), routed_scaling_factor=RSF)


def variants_for(bits):
    """Every variant that can run weights of these bits (specialised decodes only their own)."""
    return [v for v in policy.VARIANTS if policy.accepts_bits(v, bits)]


def matrix(codebooks=CODEBOOKS, bits_list=BITS, batches=BATCHES, shared=(False, True)):
    cases = []
    for cb in codebooks:
        for bits in bits_list + (HALF_BITS if cb == "mul1" else []):
            for v in variants_for(bits):
                for b in batches:
                    for s in shared:
                        cases.append((v, cb, bits, b, s))
    return cases


def relative_error(out, ref):
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


def check(out, ref, variant):
    assert np.all(np.isfinite(out)), f"{variant}: output has non-finite values (poison left behind?)"
    fp32 = not policy.accumulates_fp16(variant)
    err = relative_error(out, ref)
    assert err <= TOL[fp32], f"{variant}: relative error {err:.2e} > {TOL[fp32]:.0e}"
    return err


def exl3_moe_case(variant=None):
    """The reference implementation's fused-MoE case (MCG, K 4/2/3, E=8, top-2): (io arrays, weights).
    With `variant`: skips the test if that variant is specialised for other bits."""
    if variant is not None and not policy.accepts_bits(variant, (4, 2, 3)):
        pytest.skip(f"{variant} is specialised for other bits than 4/2/3")
    io = np.load(moe_case_path("io"))
    parts = [np.load(moe_case_path(p)) for p in ("gate", "up", "down")]
    w = mm.MoEWeights(*(mm.TrellisWeight(d["trellis"], d["suh"], d["svh"], "mcg") for d in parts))
    return io, w


def check_exl3_moe(out, io, w, variant):
    """A backend's output on the EXL3 MoE case: close to the stored output and to the reference."""
    # the stored output carries the reference kernel's own fp16 intermediates; the float64 formula
    # differs from it by <= 0.006 (README of the vectors), our kernels by about as much again
    assert np.abs(out - io["y"]).max() <= 0.02
    return check(out, reference.moe_forward(io["x"], io["selected_experts"], io["routing_weights"], w), variant)


def check_decoder_on_vectors(decode):
    """decode(trellis, k, n, kx2, codebook) -> uint16 [k, n] must give every vector's W_q bit for bit."""
    for path in single_layer_vectors():
        d = np.load(path)
        k, n = d["W_q"].shape
        got = decode(np.ascontiguousarray(d["trellis"]), k, n, int(2 * d["K"]), str(d["codebook"]))
        assert np.array_equal(got, d["W_q"].view(np.uint16)), path


def every_state_weight(codebook):
    """A [256, 512] K = 8 layer whose tiles hold every 16-bit state: symbols t, x, t, x+1, ... make
    the states t << 8 | x and x << 8 | t occur for every t and x."""
    t = np.repeat(np.arange(256), 2)                            # two tiles per t
    x = np.arange(512)[:, None] % 2 * 128 + np.arange(128)[None, :]
    symbols = np.empty((512, 256), np.uint32)
    symbols[:, 0::2] = t[:, None]
    symbols[:, 1::2] = x
    w = mm.TrellisWeight.pack(symbols.reshape(16, 32, 256), np.ones(256, np.float16), np.ones(512, np.float16),
                              codebook, 8)
    assert len(np.unique(w.states())) == 65536
    return w
