"""MoE expert weights: three stacked EXL3 projections, presets, random weights, safetensors I/O."""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import numpy as np

from .format import MCG_MARKER, MUL1_MARKER, TrellisWeight, check_bits, check_codebook, unpack_signs

__all__ = ["MoEWeights", "Preset", "PRESETS", "SharedExpert"]

PROJECTIONS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class Preset:
    """The expert-block shape of a real model, and how that model routes its tokens."""

    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    bits: tuple
    shared: bool
    scoring: str                     # "softmax" (Qwen3-MoE) or "sigmoid" (GLM / DeepSeek)
    renormalize: bool
    routed_scaling_factor: float
    codebook: str = "3inst"


PRESETS = {
    p.name: p
    for p in (
        Preset("glm-4.7-flash", 2048, 1536, 64, 4, (6, 2, 3), True, "sigmoid", True, 1.8),
        Preset("qwen3-30b-a3b", 2048, 768, 128, 8, (4, 4, 4), False, "softmax", True, 1.0),
        Preset("deepseek-v3", 7168, 2048, 256, 8, (3, 3, 4), True, "sigmoid", True, 2.5),
    )
}


class SharedExpert(NamedTuple):
    """An unstacked gate/up/down triple applied to every token with weight 1."""

    gate: TrellisWeight
    up: TrellisWeight
    down: TrellisWeight

    def as_block(self):
        """This expert alone, as a one-expert :class:`MoEWeights` (views of its arrays, no copy):
        ``fused_moe(x, zeros [M, 1], ones [M, 1], block)`` computes the shared expert's output."""
        return MoEWeights(*(TrellisWeight(w.trellis[None], w.suh[None], w.svh[None], w.codebook) for w in self))


def _check_projection(w, name, stacked):
    if not isinstance(w, TrellisWeight):
        raise TypeError(f"{name}: expected a TrellisWeight, got {type(w).__name__}")
    if stacked and w.experts is None:
        raise ValueError(f"{name}: expected stacked expert weights (a leading expert axis), got an unstacked layer")
    if not stacked and w.experts is not None:
        raise ValueError(f"{name}: a shared expert projection must be unstacked, got {w.experts} experts")


def _check_triple(gate, up, down, where):
    if gate.in_features != up.in_features or gate.out_features != up.out_features:
        raise ValueError(
            f"{where}up: shape [{up.in_features}, {up.out_features}] does not match gate "
            f"[{gate.in_features}, {gate.out_features}]"
        )
    if down.in_features != gate.out_features or down.out_features != gate.in_features:
        raise ValueError(
            f"{where}down: expected [{gate.out_features}, {gate.in_features}] (intermediate -> hidden), "
            f"got [{down.in_features}, {down.out_features}]"
        )


class ExpertBlock:
    """The shape of a layer's expert block, read from its ``gate``/``up``/``down`` projections and
    ``preset``: what host weights (:class:`MoEWeights`) and device-resident ones
    (:class:`~metal_moe.DeviceWeights`) both offer the API, the harness and the CLI."""

    @property
    def hidden(self):
        return self.gate.in_features

    @property
    def intermediate(self):
        return self.gate.out_features

    @property
    def experts(self):
        return self.gate.experts

    @property
    def bits(self):
        return (self.gate.bits, self.up.bits, self.down.bits)

    @property
    def codebooks(self):
        return (self.gate.codebook, self.up.codebook, self.down.codebook)

    @property
    def top_k(self):
        """The preset's top-k, or None for weights that carry no preset."""
        return None if self.preset is None else self.preset.top_k

    @property
    def projections(self):
        return (self.gate, self.up, self.down)


class MoEWeights(ExpertBlock):
    """The routed experts of one MoE layer (stacked gate/up/down) and an optional shared expert.

    ``gate``/``up``: hidden -> intermediate, ``down``: intermediate -> hidden, each a stacked
    :class:`~metal_moe.TrellisWeight` with the same number of experts.  Each projection has its own
    bit width; codebooks may differ too.  ``shared`` is a :class:`SharedExpert` (or a 3-tuple) of
    unstacked projections with the same hidden size.
    """

    def __init__(self, gate, up, down, shared=None, *, preset=None):
        for w, name in ((gate, "gate"), (up, "up"), (down, "down")):
            _check_projection(w, name, stacked=True)
        if up.experts != gate.experts or down.experts != gate.experts:
            raise ValueError(
                f"experts: gate, up and down must have the same number of experts, got "
                f"{gate.experts}, {up.experts}, {down.experts}"
            )
        _check_triple(gate, up, down, "")
        if shared is not None:
            if not isinstance(shared, tuple) or len(shared) != 3:
                raise TypeError("shared: expected a SharedExpert (gate, up, down) of unstacked TrellisWeights")
            shared = SharedExpert(*shared)
            for w, name in zip(shared, ("shared.gate", "shared.up", "shared.down")):
                _check_projection(w, name, stacked=False)
            _check_triple(*shared, "shared.")
            if shared.gate.in_features != gate.in_features:
                raise ValueError(
                    f"shared.gate: hidden size {shared.gate.in_features} does not match the experts' {gate.in_features}"
                )
        if preset is not None and not isinstance(preset, Preset):
            raise TypeError(f"preset: expected a Preset, got {type(preset).__name__}")
        self.gate, self.up, self.down, self.shared = gate, up, down, shared
        self.preset = preset


    @property
    def nbytes(self):
        total = sum(w.nbytes for w in self.projections)
        return total + (0 if self.shared is None else sum(w.nbytes for w in self.shared))

    def to(self, backend="cuda", device=0):
        """Weights for `backend`: ``"cuda"`` uploads them once to CUDA device `device` and returns a
        :class:`~metal_moe.DeviceWeights`; ``"cpu"`` returns self (host weights are used in place)."""
        if backend == "cpu":
            return self
        if backend == "cuda":
            from .device import DeviceWeights

            return DeviceWeights.upload(self, device)
        raise ValueError(f"backend: expected 'cpu' or 'cuda', got {backend!r}")

    def select_experts(self, start, stop):
        """Routed experts ``start..stop-1`` (renumbered from 0) as a new :class:`MoEWeights` that
        views this one's arrays (no copy).  The shared expert is not part of the selection (it is
        no routed expert; :meth:`SharedExpert.as_block` gives it as a block of its own); the preset,
        whose expert count would no longer hold, is dropped.  An empty range is allowed."""
        for value, name in ((start, "start"), (stop, "stop")):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
        if not 0 <= start <= stop <= self.experts:
            raise ValueError(f"start, stop: expected 0 <= start <= stop <= {self.experts} (experts), "
                             f"got {start}, {stop}")
        return MoEWeights(*(w[start:stop] for w in self.projections))

    def expert_nbytes(self, e=0):
        """Bytes of one routed expert's three projections (what a kernel reads per used expert)."""
        return sum(w.trellis[e].nbytes + w.suh[e].nbytes + w.svh[e].nbytes for w in self.projections)

    def __repr__(self):
        shared = ", shared" if self.shared is not None else ""
        name = f"{self.preset.name}: " if self.preset is not None else ""
        return (f"MoEWeights({name}hidden={self.hidden}, intermediate={self.intermediate}, experts={self.experts}, "
                f"bits={self.bits}, codebooks={self.codebooks}{shared})")

    # ---- random weights ---------------------------------------------------------------------
    @classmethod
    def random(cls, preset=None, *, hidden=None, intermediate=None, experts=None, bits=None,
               codebook=None, shared=None, seed=0):
        """Valid random weights: uniformly random trellis words, random-sign scale vectors.

        ``preset`` (a name from :data:`PRESETS`) fills every argument left as None; explicit
        arguments override it (e.g. ``experts=8`` for a small copy of a preset).  ``codebook`` is one
        name for all projections or a (gate, up, down) triple.
        """
        if preset is not None:
            if isinstance(preset, str):
                if preset not in PRESETS:
                    raise ValueError(f"preset: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
                preset = PRESETS[preset]
            elif not isinstance(preset, Preset):
                raise TypeError(f"preset: expected a preset name, got {type(preset).__name__}")
            hidden = preset.hidden if hidden is None else hidden
            intermediate = preset.intermediate if intermediate is None else intermediate
            experts = preset.experts if experts is None else experts
            bits = preset.bits if bits is None else bits
            codebook = preset.codebook if codebook is None else codebook
            shared = preset.shared if shared is None else shared
        for value, name in ((hidden, "hidden"), (intermediate, "intermediate"), (experts, "experts"), (bits, "bits")):
            if value is None:
                raise TypeError(f"{name}: required when no preset is given")
        if not isinstance(experts, (int, np.integer)) or isinstance(experts, bool) or experts < 1:
            raise ValueError(f"experts: expected a positive integer, got {experts!r}")
        codebook = "3inst" if codebook is None else codebook
        codebooks = (codebook,) * 3 if isinstance(codebook, str) else tuple(codebook)
        if len(codebooks) != 3:
            raise ValueError(f"codebook: expected one name or a (gate, up, down) triple, got {codebook!r}")
        for value, name in ((hidden, "hidden"), (intermediate, "intermediate")):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % 128:
                raise ValueError(f"{name}: must be a positive multiple of 128, got {value!r}")
        bits = tuple(bits) if not isinstance(bits, (int, float)) else (bits,) * 3
        if len(bits) != 3:
            raise ValueError(f"bits: expected (gate, up, down), got {bits!r}")
        for b, cb, name in zip(bits, codebooks, PROJECTIONS):
            check_bits(b, check_codebook(cb, name="codebook"), name=f"bits ({name})")
        rng = np.random.default_rng(seed)
        dims = ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))

        def make(lead):
            return [TrellisWeight.random(i, o, b, cb, experts=lead, rng=rng)
                    for (i, o), b, cb in zip(dims, bits, codebooks)]

        gate, up, down = make(experts)
        shared_expert = SharedExpert(*make(None)) if shared else None
        if preset is not None:      # the preset as built: overrides included, top_k no larger than experts
            preset = dataclasses.replace(preset, hidden=hidden, intermediate=intermediate, experts=experts,
                                         top_k=min(preset.top_k, experts), bits=bits, shared=bool(shared),
                                         codebook=codebooks[0])
        return cls(gate, up, down, shared_expert, preset=preset)

    # ---- safetensors ------------------------------------------------------------------------
    @classmethod
    def from_safetensors(cls, paths, prefix):
        """Load one MoE layer of an EXL3 checkpoint.

        Reads ``{prefix}.experts.{e}.{gate,up,down}_proj.*`` (and ``{prefix}.shared_expert.*`` or
        ``{prefix}.shared_experts.*`` when present) from one or more ``.safetensors`` files; only
        those tensors are read.  Experts must be numbered ``0..E-1`` without gaps.
        """
        import contextlib

        from safetensors import safe_open

        if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
            paths = [paths]
        paths = list(paths)
        if not paths:
            raise ValueError("paths: no safetensors file given")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a string, got {type(prefix).__name__}")
        prefix = prefix.rstrip(".")
        with contextlib.ExitStack() as stack:
            where = {}
            for path in paths:
                handle = stack.enter_context(safe_open(str(path), framework="np"))
                for key in handle.keys():
                    if key.startswith(prefix + "."):
                        where[key] = handle

            def tensor(key):
                return where[key].get_tensor(key) if key in where else None

            return cls._from_tensors(tensor, where.keys(), prefix, paths)

    @classmethod
    def _from_tensors(cls, tensor, keys, prefix, paths):
        pattern = re.compile(re.escape(prefix) + r"\.experts\.(\d+)\.")
        numbers = sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
        if not numbers:
            raise ValueError(f"prefix: no tensor {prefix}.experts.<e>.gate_proj.trellis (nor any expert tensor) in {[str(p) for p in paths]}")
        if numbers != list(range(len(numbers))):
            missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
            raise ValueError(f"missing tensor: {prefix}.experts.{missing[0]}.gate_proj.trellis (experts must be 0..E-1)")
        projections = []
        for proj in PROJECTIONS:
            layers = [_load_layer(tensor, f"{prefix}.experts.{e}.{proj}_proj") for e in numbers]
            first = layers[0]
            for e, w in enumerate(layers):
                if (w.trellis.shape, w.codebook) != (first.trellis.shape, first.codebook):
                    raise ValueError(
                        f"{prefix}.experts.{e}.{proj}_proj.trellis: shape {w.trellis.shape} / codebook "
                        f"{w.codebook!r} differ from expert 0's {first.trellis.shape} / {first.codebook!r}"
                    )
            stacked = (np.stack([getattr(w, part) for w in layers]) for part in ("trellis", "suh", "svh"))
            projections.append(TrellisWeight(*stacked, first.codebook))
        shared = None
        for name in ("shared_expert", "shared_experts"):
            if any(k.startswith(f"{prefix}.{name}.") for k in keys):
                shared = SharedExpert(*(_load_layer(tensor, f"{prefix}.{name}.{proj}_proj") for proj in PROJECTIONS))
                break
        return cls(*projections, shared)

    def save_safetensors(self, path, prefix):
        """Write this layer in the EXL3 checkpoint layout that :meth:`from_safetensors` reads."""
        from safetensors.numpy import save_file

        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a string, got {type(prefix).__name__}")
        prefix = prefix.rstrip(".")
        tensors = {}

        def put(key, w):
            tensors[f"{key}.trellis"] = np.ascontiguousarray(w.trellis)
            tensors[f"{key}.suh"] = np.ascontiguousarray(w.suh)
            tensors[f"{key}.svh"] = np.ascontiguousarray(w.svh)
            if w.codebook == "mcg":
                tensors[f"{key}.mcg"] = np.array(MCG_MARKER, dtype=np.int32)
            elif w.codebook == "mul1":
                tensors[f"{key}.mul1"] = np.array(MUL1_MARKER, dtype=np.int32)

        for proj, w in zip(PROJECTIONS, self.projections):
            for e in range(self.experts):
                put(f"{prefix}.experts.{e}.{proj}_proj", w[e])
        if self.shared is not None:
            for proj, w in zip(PROJECTIONS, self.shared):
                put(f"{prefix}.shared_experts.{proj}_proj", w)
        save_file(tensors, str(path))


def _load_layer(tensor, key):
    """One EXL3 linear layer from a tensor lookup, validated; errors name the tensor."""
    trellis = tensor(f"{key}.trellis")
    if trellis is None:
        if tensor(f"{key}.weight") is not None:
            raise ValueError(f"{key}.weight: the layer is not EXL3-quantized (no {key}.trellis)")
        raise ValueError(f"missing tensor: {key}.trellis")
    mcg, mul1 = tensor(f"{key}.mcg"), tensor(f"{key}.mul1")
    if mcg is not None and mul1 is not None:
        raise ValueError(f"{key}: both the mcg and the mul1 codebook markers are present")
    codebook = "3inst"
    for marker, value, name in ((mcg, MCG_MARKER, "mcg"), (mul1, MUL1_MARKER, "mul1")):
        if marker is not None:
            if marker.shape != () or marker.dtype != np.int32 or int(marker) != int(value):
                raise ValueError(
                    f"{key}.{name}: marker must be a 0-dim int32 holding {int(value)}, got "
                    f"{marker.dtype} {marker.shape} {marker.ravel()[:1].tolist()}"
                )
            codebook = name
    if trellis.ndim != 3:
        raise ValueError(f"{key}.trellis: expected 3 dimensions [in/16, out/16, 16*K], got shape {trellis.shape}")
    in_features, out_features = trellis.shape[0] * 16, trellis.shape[1] * 16
    vectors = []
    for fp16, legacy, n in (("suh", "su", in_features), ("svh", "sv", out_features)):
        v = tensor(f"{key}.{fp16}")
        if v is None:
            words = tensor(f"{key}.{legacy}")
            if words is None:
                raise ValueError(f"missing tensor: {key}.{fp16} (nor the legacy {key}.{legacy})")
            if words.dtype != np.int16 or words.shape != (n // 16,):
                raise ValueError(f"{key}.{legacy}: expected int16 [{n // 16}], got {words.dtype} {words.shape}")
            v = unpack_signs(words)
        vectors.append(v)
    try:
        return TrellisWeight(trellis, vectors[0], vectors[1], codebook)
    except (TypeError, ValueError) as err:
        part = str(err).split(":", 1)[0]
        raise type(err)(f"{key}.{part}:{str(err).split(':', 1)[1]}") from None
