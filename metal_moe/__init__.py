"""metal_moe: fused Mixture-of-Experts expert blocks straight from EXL3 trellis-quantized weights.

    import metal_moe as mm
    w = mm.MoEWeights.random("glm-4.7-flash", experts=8)
    y = mm.fused_moe(x, ids, p, w)                  # x [M, hidden], ids/p [M, top_k]
    y_ref = mm.reference.moe_forward(x, ids, p, w)  # the float64 oracle
"""

__version__ = "0.1.0"

from . import policy, reference
from .api import Context, backends, fused_moe, get_include, get_library, reset_stats, stats, variants
from .device import DeviceArray, DeviceWeights
from .format import TrellisWeight
from .policy import select_moe_kernel
from .weights import PRESETS, MoEWeights, Preset, SharedExpert

__all__ = [
    "__version__",
    "Context",
    "DeviceArray",
    "DeviceWeights",
    "MoEWeights",
    "PRESETS",
    "Preset",
    "SharedExpert",
    "TrellisWeight",
    "backends",
    "fused_moe",
    "get_include",
    "get_library",
    "policy",
    "reference",
    "reset_stats",
    "select_moe_kernel",
    "stats",
    "variants",
]
