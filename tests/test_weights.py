"""MoEWeights: properties, presets, random weights, safetensors checkpoints (FORMAT.md 1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (
    MCG_MARKER,
    MUL1_MARKER,
    bits_and_codebook,
    checkpoint_dict,
    random_moe,
    random_words,
    save_checkpoint_dict,
    seeds,
    slow_unpack_signs,
)
from metal_moe import PRESETS, MoEWeights, SharedExpert, reference

PREFIX = "model.layers.3.mlp"


def assert_same_layer(a, b):
    assert (a.codebook, a.bits, a.experts) == (b.codebook, b.bits, b.experts)
    assert a.trellis.dtype == b.trellis.dtype == np.int16
    np.testing.assert_array_equal(a.trellis, b.trellis)
    for x, y in ((a.suh, b.suh), (a.svh, b.svh)):
        assert x.dtype == y.dtype == np.float16
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))


def assert_same_moe(a, b):
    for x, y in zip(a.projections, b.projections):
        assert_same_layer(x, y)
    assert (a.shared is None) == (b.shared is None)
    if a.shared is not None:
        for x, y in zip(a.shared, b.shared):
            assert_same_layer(x, y)


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
def test_moe_properties(shared):
    weights = random_moe(np.random.default_rng(0), 256, 384, 3, (4, 2, 3), "mcg", shared)
    assert (weights.hidden, weights.intermediate, weights.experts) == (256, 384, 3)
    assert weights.bits == (4, 2, 3)
    assert weights.codebooks == ("mcg",) * 3
    routed = sum(w.nbytes for w in (weights.gate, weights.up, weights.down))
    assert routed == 3 * sum(16 * 24 * 16 * k * 2 for k in (4, 2, 3)) + 3 * 3 * (256 + 384) * 2
    if shared:
        assert isinstance(weights.shared, SharedExpert)
        assert all(w.experts is None for w in weights.shared)
        extra = sum(w.nbytes for w in weights.shared)
        assert extra == sum(16 * 24 * 16 * k * 2 for k in (4, 2, 3)) + 3 * (256 + 384) * 2
    else:
        assert weights.shared is None
        extra = 0
    assert weights.nbytes == routed + extra
    assert weights.top_k is None


def test_moe_accepts_a_plain_tuple_as_shared():
    rng = np.random.default_rng(1)
    weights = random_moe(rng, shared=True)
    again = MoEWeights(weights.gate, weights.up, weights.down, tuple(weights.shared))
    assert isinstance(again.shared, SharedExpert)
    assert again.shared.down is weights.shared.down


def test_select_experts_and_the_shared_block_are_views():
    weights = random_moe(np.random.default_rng(2), experts=5, shared=True)
    part = weights.select_experts(1, 4)
    assert part.experts == 3 and part.shared is None
    for whole, sliced in zip(weights.projections, part.projections):
        assert np.shares_memory(whole.trellis, sliced.trellis) and sliced.trellis.flags.c_contiguous
        assert np.array_equal(sliced[0].trellis, whole[1].trellis) and np.array_equal(sliced[2].svh, whole[3].svh)
    assert weights.select_experts(2, 2).experts == 0
    assert weights.gate[-2:].experts == 2 and weights.gate[3:1].experts == 0
    block = weights.shared.as_block()
    assert block.experts == 1 and np.shares_memory(block.gate.trellis, weights.shared.gate.trellis)
    x = np.random.default_rng(3).standard_normal((4, weights.hidden))
    ones, zeros = np.ones((4, 1), np.float32), np.zeros((4, 1), np.int32)
    assert np.array_equal(reference.moe_forward(x, zeros, ones, block), reference.expert_forward(x, *weights.shared))
    with pytest.raises(ValueError, match="^start, stop: expected 0 <= start <= stop <= 5"):
        weights.select_experts(3, 6)
    with pytest.raises(TypeError, match="^start: expected an integer"):
        weights.select_experts(1.0, 2)
    with pytest.raises(ValueError, match="^expert slice: step must be 1"):
        weights.gate[::2]


# --------------------------------------------------------------------------------------------
# presets and random weights
# --------------------------------------------------------------------------------------------
# name: (hidden, intermediate, experts, top_k, bits, shared), from issue 2 point 3
PRESET_TABLE = {
    "glm-4.7-flash": (2048, 1536, 64, 4, (6, 2, 3), True),
    "qwen3-30b-a3b": (2048, 768, 128, 8, (4, 4, 4), False),
    "deepseek-v3": (7168, 2048, 256, 8, (3, 3, 4), True),
}
SMALL_EXPERTS = {"glm-4.7-flash": 2, "qwen3-30b-a3b": 2, "deepseek-v3": 1}   # keeps memory small


@pytest.mark.parametrize("name", sorted(PRESET_TABLE))
def test_preset_table(name):
    preset = PRESETS[name]
    hidden, intermediate, experts, top_k, bits, shared = PRESET_TABLE[name]
    assert preset.name == name
    assert (preset.hidden, preset.intermediate, preset.experts, preset.top_k) == (hidden, intermediate, experts, top_k)
    assert tuple(preset.bits) == bits and preset.shared == shared
    assert set(PRESETS) == set(PRESET_TABLE)


@pytest.mark.parametrize("name", sorted(PRESET_TABLE))
def test_random_preset(name):
    hidden, intermediate, _, top_k, bits, shared = PRESET_TABLE[name]
    experts = SMALL_EXPERTS[name]
    weights = MoEWeights.random(name, experts=experts, seed=5)
    assert (weights.hidden, weights.intermediate, weights.experts) == (hidden, intermediate, experts)
    # the preset as built: a top_k larger than the experts built is capped at their number
    assert weights.bits == bits and weights.top_k == min(top_k, weights.experts)
    assert weights.gate.trellis.shape == (experts, hidden // 16, intermediate // 16, 16 * bits[0])
    assert weights.down.trellis.shape == (experts, intermediate // 16, hidden // 16, 16 * bits[2])
    assert (weights.shared is not None) == shared
    if shared:
        assert weights.shared.gate.in_features == hidden
        assert all(w.experts is None for w in weights.shared)
    # random weights keep activations O(1): unit-normal tokens, every token through every expert
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, hidden))
    k = min(top_k, experts)
    ids, p = reference.route(rng.standard_normal((4, experts)), k)
    y = reference.moe_forward(x, ids, p, weights)
    assert np.all(np.isfinite(y))
    assert 0.1 <= y.std() <= 10


def test_random_overrides_and_seed():
    a = MoEWeights.random(hidden=128, intermediate=256, experts=3, bits=(2, 3.5, 5),
                          codebook=("mcg", "mul1", "3inst"), shared=True, seed=7)
    assert (a.hidden, a.intermediate, a.experts, a.bits) == (128, 256, 3, (2, 3.5, 5))
    assert a.codebooks == ("mcg", "mul1", "3inst") and a.top_k is None
    assert a.shared.up.codebook == "mul1" and a.shared.up.bits == 3.5
    assert_same_moe(a, MoEWeights.random(hidden=128, intermediate=256, experts=3, bits=(2, 3.5, 5),
                                         codebook=("mcg", "mul1", "3inst"), shared=True, seed=7))
    b = MoEWeights.random(hidden=128, intermediate=256, experts=3, bits=(2, 3.5, 5),
                          codebook=("mcg", "mul1", "3inst"), shared=True, seed=8)
    assert not np.array_equal(a.gate.trellis, b.gate.trellis)
    # an explicit argument overrides the preset
    c = MoEWeights.random("glm-4.7-flash", hidden=256, intermediate=128, experts=2, bits=4, shared=False)
    assert (c.hidden, c.intermediate, c.experts, c.bits, c.shared) == (256, 128, 2, (4, 4, 4), None)


def test_random_scale_signs():
    w = MoEWeights.random(hidden=256, intermediate=128, experts=2, bits=3, seed=0)
    for proj in w.projections:
        for vec in (proj.suh, proj.svh):
            assert vec.dtype == np.float16 and np.all(np.isfinite(vec)) and np.all(vec != 0)
            assert (vec > 0).any() and (vec < 0).any()       # random signs, not all one sign


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------
def layer_keys(weights, prefix):
    """(key, TrellisWeight) of every saved layer: each routed expert and the shared projections."""
    for proj, w in zip(("gate", "up", "down"), weights.projections):
        for e in range(weights.experts):
            yield f"{prefix}.experts.{e}.{proj}_proj", w[e]
    if weights.shared is not None:
        for proj, w in zip(("gate", "up", "down"), weights.shared):
            yield f"{prefix}.shared_experts.{proj}_proj", w


@settings(max_examples=10)
@given(projections=st.tuples(bits_and_codebook(), bits_and_codebook(), bits_and_codebook()),
       experts=st.integers(1, 3), shared=st.booleans(), seed=seeds)
def test_safetensors_round_trip(tmp_path_factory, projections, experts, shared, seed):
    bits = tuple(b for b, _ in projections)
    codebooks = tuple(c for _, c in projections)
    weights = random_moe(np.random.default_rng(seed), 128, 256, experts, bits, codebooks, shared)
    path = tmp_path_factory.mktemp("roundtrip") / "layer.safetensors"
    tensors = checkpoint_dict(weights, path, PREFIX)
    loaded = MoEWeights.from_safetensors(path, PREFIX)
    assert_same_moe(weights, loaded)
    assert loaded.bits == bits and loaded.codebooks == codebooks
    # the file holds exactly the EXL3 layout, with the codebook markers of FORMAT.md 1
    want_keys = set()
    for key, w in layer_keys(weights, PREFIX):
        want_keys |= {f"{key}.trellis", f"{key}.suh", f"{key}.svh"}
        for marker, value in (("mcg", MCG_MARKER), ("mul1", MUL1_MARKER)):
            if w.codebook == marker:
                want_keys.add(f"{key}.{marker}")
                t = tensors[f"{key}.{marker}"]
                assert t.dtype == np.int32 and t.shape == () and int(t) == value
    assert set(tensors) == want_keys


def test_from_safetensors_reads_only_the_prefix(tmp_path, monkeypatch):
    import safetensors

    rng = np.random.default_rng(3)
    a = random_moe(rng, experts=2, codebooks="mul1", bits=(2.5, 3, 4), shared=True)
    b = random_moe(rng, experts=3, codebooks="3inst")
    tensors = checkpoint_dict(a, tmp_path / "a.safetensors", "model.layers.1.mlp")
    tensors |= checkpoint_dict(b, tmp_path / "b.safetensors", "model.layers.10.mlp")
    tensors["model.embed_tokens.weight"] = np.ones((4, 128), dtype=np.float16)
    path = save_checkpoint_dict(tensors, tmp_path / "model.safetensors")

    read = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self._handle = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_tensor(self, key):
            read.append(key)
            return self._handle.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    assert_same_moe(a, MoEWeights.from_safetensors(path, "model.layers.1.mlp"))
    assert read and all(key.startswith("model.layers.1.mlp.") for key in read)
    read.clear()
    assert_same_moe(b, MoEWeights.from_safetensors([path], "model.layers.10.mlp."))   # trailing dot
    assert read and all(key.startswith("model.layers.10.mlp.") for key in read)


def test_from_safetensors_several_files(tmp_path):
    weights = random_moe(np.random.default_rng(4), experts=3, shared=True)
    tensors = checkpoint_dict(weights, tmp_path / "all.safetensors", PREFIX)
    first = {k: v for k, v in tensors.items() if ".experts.0." in k or ".experts.1." in k}
    rest = {k: v for k, v in tensors.items() if k not in first}
    paths = [save_checkpoint_dict(first, tmp_path / "part1.safetensors"),
             save_checkpoint_dict(rest, tmp_path / "part2.safetensors")]
    assert_same_moe(weights, MoEWeights.from_safetensors(paths, PREFIX))


def test_from_safetensors_shared_expert_singular_name(tmp_path):
    weights = random_moe(np.random.default_rng(5), experts=2, shared=True)
    tensors = checkpoint_dict(weights, tmp_path / "w.safetensors", PREFIX)
    renamed = {k.replace(".shared_experts.", ".shared_expert."): v for k, v in tensors.items()}
    path = save_checkpoint_dict(renamed, tmp_path / "renamed.safetensors")
    assert_same_moe(weights, MoEWeights.from_safetensors(path, PREFIX))


def test_from_safetensors_legacy_su_sv(tmp_path):
    rng = np.random.default_rng(6)
    hidden, intermediate, experts = 128, 256, 2
    tensors, want = {}, {}
    for proj, (k, n), bits in (("gate", (hidden, intermediate), 3), ("up", (hidden, intermediate), 2),
                               ("down", (intermediate, hidden), 4)):
        for e in range(experts):
            key = f"{PREFIX}.experts.{e}.{proj}_proj"
            tensors[f"{key}.trellis"] = random_words(rng, (k // 16, n // 16, 16 * bits))
            tensors[f"{key}.su"] = random_words(rng, (k // 16,))
            tensors[f"{key}.sv"] = random_words(rng, (n // 16,))
            want[proj, e] = (np.array(slow_unpack_signs(tensors[f"{key}.su"])),
                             np.array(slow_unpack_signs(tensors[f"{key}.sv"])))
    # one layer carries both forms: the fp16 vector wins over the legacy signs
    key = f"{PREFIX}.experts.1.up_proj"
    tensors[f"{key}.suh"] = (rng.standard_normal(hidden) * 0.1).astype(np.float16)
    want["up", 1] = tensors[f"{key}.suh"].astype(np.float64), want["up", 1][1]
    loaded = MoEWeights.from_safetensors(save_checkpoint_dict(tensors, tmp_path / "legacy.safetensors"), PREFIX)
    for proj, w in zip(("gate", "up", "down"), loaded.projections):
        assert w.suh.dtype == w.svh.dtype == np.float16
        for e in range(experts):
            np.testing.assert_array_equal(w.trellis[e], tensors[f"{PREFIX}.experts.{e}.{proj}_proj.trellis"])
            np.testing.assert_array_equal(w.suh[e], want[proj, e][0])
            np.testing.assert_array_equal(w.svh[e], want[proj, e][1])

