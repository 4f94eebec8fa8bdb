"""Every argument check of issue 2 point 6: the exception type, and a message naming the argument."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import (
    MCG_MARKER,
    MUL1_MARKER,
    checkpoint_dict,
    random_layer,
    random_moe,
    random_scales,
    random_words,
    save_checkpoint_dict,
)
from metal_moe import MoEWeights, SharedExpert, TrellisWeight
from metal_moe.format import codebook_values, pack_symbols
from metal_moe.reference import moe_forward, route

PREFIX = "model.layers.7.mlp"


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(2024)


def layer_arrays(rng, k=128, n=256, words=32, experts=None):
    lead = () if experts is None else (experts,)
    trellis = random_words(rng, lead + (k // 16, n // 16, words))
    return trellis, random_scales(rng, lead + (k,)), random_scales(rng, lead + (n,))


# --------------------------------------------------------------------------------------------
# TrellisWeight
# --------------------------------------------------------------------------------------------
def test_trellis_dtype(rng):
    trellis, suh, svh = layer_arrays(rng)
    with pytest.raises(TypeError, match=r"^trellis: expected dtype int16, got int32"):
        TrellisWeight(trellis.astype(np.int32), suh, svh)
    with pytest.raises(TypeError, match=r"^trellis: expected a NumPy array"):
        TrellisWeight(trellis.tolist(), suh, svh)


@pytest.mark.parametrize("name", ["suh", "svh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_scale_dtype(rng, name, dtype):
    arrays = dict(zip(("trellis", "suh", "svh"), layer_arrays(rng)))
    arrays[name] = arrays[name].astype(dtype)
    with pytest.raises(TypeError, match=rf"^{name}: expected dtype float16"):
        TrellisWeight(**arrays)


def test_wrong_number_of_dimensions(rng):
    trellis, suh, svh = layer_arrays(rng)
    with pytest.raises(ValueError, match=r"^trellis: expected 3 or 4 dimensions"):
        TrellisWeight(trellis[0], suh, svh)
    with pytest.raises(ValueError, match=r"^suh: expected 1 dimensions"):
        TrellisWeight(trellis, suh[None], svh)
    with pytest.raises(ValueError, match=r"^svh: expected 2 dimensions"):       # stacked wants [E, n]
        TrellisWeight(trellis[None], suh[None], svh)


@pytest.mark.parametrize("last", [8, 17, 20, 8 * 16 + 16, 0])
def test_trellis_last_dim_not_16k(rng, last):
    _, suh, svh = layer_arrays(rng)
    trellis = np.zeros((8, 16, last), dtype=np.int16)
    for codebook in ("3inst", "mul1"):
        with pytest.raises(ValueError, match=rf"^trellis: last dimension must be 16\*K .* got {last}"):
            TrellisWeight(trellis, suh, svh, codebook)


@pytest.mark.parametrize("codebook", ["3inst", "mcg"])
@pytest.mark.parametrize("words", [24, 40, 56])
def test_half_integer_k_needs_mul1(rng, codebook, words):
    trellis, suh, svh = layer_arrays(rng, words=words)
    with pytest.raises(ValueError, match=rf"^trellis: half-integer K={words / 16} is valid only with the mul1"):
        TrellisWeight(trellis, suh, svh, codebook)
    assert TrellisWeight(trellis, suh, svh, "mul1").bits == words / 16


def test_dims_not_multiples_of_128(rng):
    with pytest.raises(ValueError, match=r"^trellis: in_features = 64 .* multiple of 128"):
        TrellisWeight(random_words(rng, (4, 8, 32)), random_scales(rng, (64,)), random_scales(rng, (128,)))
    with pytest.raises(ValueError, match=r"^trellis: out_features = 144 .* multiple of 128"):
        TrellisWeight(random_words(rng, (8, 9, 32)), random_scales(rng, (128,)), random_scales(rng, (144,)))
    with pytest.raises(ValueError, match=r"^trellis: in_features = 0"):
        TrellisWeight(random_words(rng, (0, 8, 32)), random_scales(rng, (0,)), random_scales(rng, (128,)))


def test_scale_length_mismatch(rng):
    trellis, suh, svh = layer_arrays(rng)
    with pytest.raises(ValueError, match=r"^suh: expected 128 input features"):
        TrellisWeight(trellis, suh[:64], svh)
    with pytest.raises(ValueError, match=r"^svh: expected 256 output features"):
        TrellisWeight(trellis, suh, np.concatenate([svh, svh]))


def test_stacked_expert_count_mismatch(rng):
    trellis, suh, svh = layer_arrays(rng, experts=2)
    with pytest.raises(ValueError, match=r"^suh: 3 experts, but trellis has 2"):
        TrellisWeight(trellis, np.concatenate([suh, suh[:1]]), svh)
    with pytest.raises(ValueError, match=r"^svh: 1 experts, but trellis has 2"):
        TrellisWeight(trellis, suh, svh[:1])


def test_unknown_codebook(rng):
    trellis, suh, svh = layer_arrays(rng)
    with pytest.raises(ValueError, match=r"^codebook: unknown codebook 'mcg2'"):
        TrellisWeight(trellis, suh, svh, "mcg2")
    with pytest.raises(TypeError, match=r"^codebook:"):
        TrellisWeight(trellis, suh, svh, None)
    with pytest.raises(ValueError, match=r"^codebook: unknown codebook"):
        codebook_values(np.arange(4, dtype=np.uint32), "MCG")


def test_matmul_x_shape(rng):
    layer = random_layer(rng, 128, 256, 2)
    with pytest.raises(ValueError, match=r"^x: expected last dimension 128"):
        layer.matmul(np.zeros((3, 256)))


def test_pack_arguments(rng):
    layer = random_layer(rng, 128, 128, 3)
    symbols = layer.symbols()
    with pytest.raises(TypeError, match=r"^bits:"):
        TrellisWeight.pack(symbols, layer.suh, layer.svh)
    with pytest.raises(ValueError, match=r"^bits: 9 bits per weight is not valid"):
        TrellisWeight.pack(symbols, layer.suh, layer.svh, bits=9)
    with pytest.raises(ValueError, match=r"^bits: half-integer K=2.5 is valid only with the mul1"):
        TrellisWeight.pack(symbols, layer.suh, layer.svh, "mcg", bits=2.5)
    with pytest.raises(ValueError, match=r"^symbols: every symbol must fit"):
        pack_symbols(np.full(256, 8), 3)
    with pytest.raises(ValueError, match=r"^symbols: every symbol must fit"):
        pack_symbols(np.full(256, -1), 3)
    with pytest.raises(ValueError, match=r"^symbols: last dimension must be 256"):
        pack_symbols(np.zeros((2, 128), dtype=np.int64), 3)
    with pytest.raises(TypeError, match=r"^symbols: expected an integer array"):
        pack_symbols(np.zeros(256), 3)


# --------------------------------------------------------------------------------------------
# MoEWeights
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe(rng):
    return random_moe(rng, 128, 256, experts=3, shared=True)


def test_projections_must_be_stacked_trellis_weights(moe):
    with pytest.raises(ValueError, match=r"^gate: expected stacked expert weights"):
        MoEWeights(moe.gate[0], moe.up, moe.down)
    with pytest.raises(TypeError, match=r"^down: expected a TrellisWeight, got ndarray"):
        MoEWeights(moe.gate, moe.up, moe.down.trellis)


def test_expert_count_mismatch_between_projections(rng, moe):
    up4 = random_layer(rng, 128, 256, 2, "mcg", experts=4)
    with pytest.raises(ValueError, match=r"^experts: gate, up and down must have the same .* got 3, 4, 3"):
        MoEWeights(moe.gate, up4, moe.down)
    down2 = random_layer(rng, 256, 128, 3, "mcg", experts=2)
    with pytest.raises(ValueError, match=r"^experts: .* got 3, 3, 2"):
        MoEWeights(moe.gate, moe.up, down2)


def test_projection_shapes_must_agree(rng, moe):
    up_wide = random_layer(rng, 128, 384, 2, experts=3)
    with pytest.raises(ValueError, match=r"^up: shape \[128, 384\] does not match gate \[128, 256\]"):
        MoEWeights(moe.gate, up_wide, moe.down)
    with pytest.raises(ValueError, match=r"^down: expected \[256, 128\]"):
        MoEWeights(moe.gate, moe.up, moe.gate)


def test_shared_expert_must_be_unstacked(moe):
    with pytest.raises(ValueError, match=r"^shared.gate: a shared expert projection must be unstacked, got 3 experts"):
        MoEWeights(moe.gate, moe.up, moe.down, SharedExpert(moe.gate, moe.shared.up, moe.shared.down))
    with pytest.raises(TypeError, match=r"^shared:"):
        MoEWeights(moe.gate, moe.up, moe.down, [moe.shared.gate, moe.shared.up])


def test_shared_expert_wrong_hidden(rng, moe):
    other = random_moe(rng, 256, 128, experts=1, shared=True).shared
    with pytest.raises(ValueError, match=r"^shared.gate: hidden size 256 does not match the experts' 128"):
        MoEWeights(moe.gate, moe.up, moe.down, other)
    with pytest.raises(ValueError, match=r"^shared.down: expected \[256, 128\] .* got \[128, 256\]"):
        MoEWeights(moe.gate, moe.up, moe.down, SharedExpert(other.down, other.down, other.down))


def test_random_arguments():
    with pytest.raises(ValueError, match=r"^preset: unknown preset 'glm-5'"):
        MoEWeights.random("glm-5")
    with pytest.raises(TypeError, match=r"^preset:"):
        MoEWeights.random(3)
    with pytest.raises(TypeError, match=r"^hidden: required"):
        MoEWeights.random(intermediate=128, experts=2, bits=2)
    with pytest.raises(ValueError, match=r"^experts: expected a positive integer"):
        MoEWeights.random(hidden=128, intermediate=128, experts=0, bits=2)
    with pytest.raises(ValueError, match=r"^bits: expected \(gate, up, down\)"):
        MoEWeights.random(hidden=128, intermediate=128, experts=2, bits=(2, 3))
    with pytest.raises(ValueError, match=r"^bits \(up\): half-integer"):
        MoEWeights.random(hidden=128, intermediate=128, experts=2, bits=(2, 2.5, 3), codebook="mcg")
    with pytest.raises(ValueError, match=r"^codebook: unknown codebook"):
        MoEWeights.random(hidden=128, intermediate=128, experts=2, bits=2, codebook="4inst")
    with pytest.raises(ValueError, match=r"multiple of 128"):
        MoEWeights.random(hidden=100, intermediate=128, experts=2, bits=2)


# --------------------------------------------------------------------------------------------
# moe_forward
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def call(rng, moe):
    x = rng.standard_normal((4, 128))
    ids = np.array([[0, 1], [2, 0], [1, 1], [2, 2]], dtype=np.int32)
    p = np.full((4, 2), 0.5, dtype=np.float32)
    return x, ids, p


def test_forward_weights_type(call, moe):
    x, ids, p = call
    with pytest.raises(TypeError, match=r"^weights: expected MoEWeights"):
        moe_forward(x, ids, p, moe.gate)


def test_forward_x(call, moe):
    x, ids, p = call
    with pytest.raises(ValueError, match=r"^x: expected shape \[tokens, 128\]"):
        moe_forward(x[:, :64], ids, p, moe)
    with pytest.raises(ValueError, match=r"^x: expected shape"):
        moe_forward(x[0], ids, p, moe)
    with pytest.raises(TypeError, match=r"^x: expected one of"):
        moe_forward(x.astype(np.int32), ids, p, moe)


@pytest.mark.parametrize("bad", [-1, 3, 1000])
def test_forward_ids_out_of_range(call, moe, bad):
    x, ids, p = call
    ids = ids.copy()
    ids[2, 1] = bad
    with pytest.raises(ValueError, match=rf"^ids: expert index {bad} is outside \[0, 3\)"):
        moe_forward(x, ids, p, moe)


def test_forward_ids_dtype_and_shape(call, moe):
    x, ids, p = call
    with pytest.raises(TypeError, match=r"^ids: expected an integer array"):
        moe_forward(x, ids.astype(np.float32), p, moe)
    with pytest.raises(ValueError, match=r"^ids: expected shape \[4, top_k\]"):
        moe_forward(x, ids[:3], p[:3], moe)
    with pytest.raises(ValueError, match=r"^ids: top_k"):
        moe_forward(x, ids[:, :0], p[:, :0], moe)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_forward_p_not_finite(call, moe, bad):
    x, ids, p = call
    p = p.copy()
    p[1, 0] = bad
    with pytest.raises(ValueError, match=r"^p: routing weights contain NaN or infinite values"):
        moe_forward(x, ids, p, moe)


def test_forward_p_shape_and_dtype(call, moe):
    x, ids, p = call
    with pytest.raises(ValueError, match=r"^p: expected the shape of ids \(4, 2\), got \(4, 1\)"):
        moe_forward(x, ids, p[:, :1], moe)
    with pytest.raises(TypeError, match=r"^p: expected a floating-point array"):
        moe_forward(x, ids, ids, moe)


def test_forward_routed_scaling_factor(call, moe):
    x, ids, p = call
    with pytest.raises(ValueError, match=r"^routed_scaling_factor: must be finite"):
        moe_forward(x, ids, p, moe, routed_scaling_factor=np.nan)


# --------------------------------------------------------------------------------------------
# route
# --------------------------------------------------------------------------------------------
def test_route_arguments(rng):
    logits = rng.standard_normal((3, 6))
    with pytest.raises(ValueError, match=r"^scoring: expected 'softmax' or 'sigmoid', got 'tanh'"):
        route(logits, 2, scoring="tanh")
    for top_k in (0, 7, -1):
        with pytest.raises(ValueError, match=rf"^top_k: must be in 1..6 .* got {top_k}"):
            route(logits, top_k)
    for top_k in (1.5, True, "2"):
        with pytest.raises(TypeError, match=r"^top_k: expected an integer"):
            route(logits, top_k)
    with pytest.raises(ValueError, match=r"^bias: expected shape \(6,\), got \(5,\)"):
        route(logits, 2, "sigmoid", bias=np.zeros(5))
    with pytest.raises(ValueError, match=r"^bias: expected shape \(6,\), got \(3, 6\)"):
        route(logits, 2, "sigmoid", bias=np.zeros((3, 6)))
    with pytest.raises(ValueError, match=r"^bias: contains NaN"):
        route(logits, 2, "sigmoid", bias=np.full(6, np.nan))
    with pytest.raises(ValueError, match=r"^logits: expected 2 dimensions"):
        route(logits[0], 2)
    with pytest.raises(TypeError, match=r"^logits: expected a floating-point array"):
        route(np.ones((3, 6), dtype=np.int64), 2)
    bad = logits.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^logits: contains NaN"):
        route(bad, 2)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def tensors(tmp_path, rng):
    """A three-expert MCG layer with a shared expert, as an editable dict of checkpoint tensors."""
    weights = random_moe(rng, 128, 256, experts=3, codebooks="mcg", shared=True)
    return checkpoint_dict(weights, tmp_path / "original.safetensors", PREFIX)


@pytest.fixture()
def load(tmp_path):
    def load(tensors, prefix=PREFIX):
        return MoEWeights.from_safetensors(save_checkpoint_dict(tensors, tmp_path / "edited.safetensors"), prefix)
    return load


def key(e, proj, part):
    return f"{PREFIX}.experts.{e}.{proj}_proj.{part}"


def test_checkpoint_fixture_loads(tensors, load):
    assert load(tensors).codebooks == ("mcg",) * 3          # the unedited dict is valid


def test_checkpoint_both_markers(tensors, load):
    tensors[key(1, "up", "mul1")] = np.array(MUL1_MARKER, dtype=np.int32)
    with pytest.raises(ValueError, match=re.escape(f"{PREFIX}.experts.1.up_proj: both the mcg and the mul1")):
        load(tensors)


@pytest.mark.parametrize("marker", [
    np.array(MUL1_MARKER, dtype=np.int32),              # the MUL1 value under the mcg name
    np.array(0, dtype=np.int32),
    np.array(MCG_MARKER, dtype=np.int64),               # right value, wrong dtype
    np.array([MCG_MARKER], dtype=np.int32),             # right value, not 0-dim
])
def test_checkpoint_wrong_marker(tensors, load, marker):
    tensors[key(2, "down", "mcg")] = marker
    message = re.escape(key(2, "down", "mcg")) + rf": marker must be a 0-dim int32 holding {MCG_MARKER}"
    with pytest.raises(ValueError, match=message):
        load(tensors)


def test_checkpoint_wrong_mul1_marker(tensors, load):
    del tensors[key(0, "gate", "mcg")]
    tensors[key(0, "gate", "mul1")] = np.array(MCG_MARKER, dtype=np.int32)
    with pytest.raises(ValueError, match=re.escape(key(0, "gate", "mul1")) + rf": marker must be .* {MUL1_MARKER}"):
        load(tensors)


@pytest.mark.parametrize("e, proj, part", [(1, "down", "svh"), (2, "gate", "suh"), (0, "up", "trellis")])
def test_checkpoint_missing_tensor(tensors, load, e, proj, part):
    del tensors[key(e, proj, part)]
    with pytest.raises(ValueError, match=r"^missing tensor: " + re.escape(key(e, proj, part))):
        load(tensors)


def test_checkpoint_missing_shared_tensor(tensors, load):
    del tensors[f"{PREFIX}.shared_experts.up_proj.svh"]
    with pytest.raises(ValueError, match=r"^missing tensor: " + re.escape(f"{PREFIX}.shared_experts.up_proj.svh")):
        load(tensors)


def test_checkpoint_gap_in_expert_numbering(tensors, load):
    for name in [k for k in tensors if ".experts.1." in k]:
        del tensors[name]
    with pytest.raises(ValueError, match=r"^missing tensor: " + re.escape(key(1, "gate", "trellis"))):
        load(tensors)


def test_checkpoint_prefix_without_experts(tensors, load):
    with pytest.raises(ValueError, match=r"^prefix: no tensor model.layers.8.mlp.experts.<e>.gate_proj.trellis"):
        load(tensors, "model.layers.8.mlp")
    with pytest.raises(ValueError, match=r"^prefix: no tensor"):
        load(tensors, "model.layers.7")                       # a parent of the prefix is not it
    with pytest.raises(TypeError, match=r"^prefix: expected a string"):
        load(tensors, None)


def test_checkpoint_no_paths():
    with pytest.raises(ValueError, match=r"^paths: no safetensors file"):
        MoEWeights.from_safetensors([], PREFIX)


def test_checkpoint_unquantized_layer(tensors, load):
    tensors[key(0, "up", "weight")] = np.zeros((256, 128), dtype=np.float16)
    del tensors[key(0, "up", "trellis")]
    with pytest.raises(ValueError, match=re.escape(key(0, "up", "weight")) + r": the layer is not EXL3-quantized"):
        load(tensors)


def test_checkpoint_bad_tensor_names_the_tensor(tensors, load):
    tensors[key(1, "gate", "suh")] = tensors[key(1, "gate", "suh")].astype(np.float32)
    with pytest.raises(TypeError, match=re.escape(key(1, "gate", "suh")) + r": expected dtype float16"):
        load(tensors)


def test_checkpoint_half_integer_without_mul1(tensors, load, rng):
    tensors[key(0, "up", "trellis")] = random_words(rng, (8, 16, 40))
    with pytest.raises(ValueError, match=re.escape(key(0, "up", "trellis")) + r": half-integer K=2.5"):
        load(tensors)


def test_checkpoint_experts_disagree(tensors, load, rng):
    tensors[key(2, "down", "trellis")] = random_words(rng, (16, 8, 64))      # K=4 where the others have 3
    with pytest.raises(ValueError, match=re.escape(key(2, "down", "trellis")) + r": shape \(16, 8, 64\)"):
        load(tensors)


def test_checkpoint_bad_legacy_signs(tensors, load):
    del tensors[key(1, "gate", "svh")]
    tensors[key(1, "gate", "sv")] = np.zeros(8, dtype=np.int16)               # wants [256 / 16]
    with pytest.raises(ValueError, match=re.escape(key(1, "gate", "sv")) + r": expected int16 \[16\]"):
        load(tensors)


def test_save_prefix_type(moe, tmp_path):
    with pytest.raises(TypeError, match=r"^prefix: expected a string"):
        moe.save_safetensors(tmp_path / "x.safetensors", 7)
