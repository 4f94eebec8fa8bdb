"""metal_moe: fused Mixture-of-Experts expert blocks straight from EXL3 trellis-quantized weights."""

__version__ = "0.1.0"

from . import reference
from .format import TrellisWeight
from .weights import PRESETS, MoEWeights, Preset, SharedExpert

__all__ = ["__version__", "MoEWeights", "PRESETS", "Preset", "SharedExpert", "TrellisWeight", "reference"]
