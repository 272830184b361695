"""TuneQDM core: quantized diffusion UNets with per-subject quantization-scale adapters.

Imports torch and friends only; never the service packages (docs/design.md, layering).
"""

from tuneqdm_core.adapter import Adapter, AdapterConfig, param_groups
from tuneqdm_core.layers import QuantConv2d, QuantLayer, QuantLinear
from tuneqdm_core.model import (
    Layout,
    QuantConfig,
    QuantState,
    quant_state,
    quantize_,
    set_storage_mode,
)
from tuneqdm_core.routing import (
    Route,
    ScaleBank,
    route_adapters,
    routed,
    set_route,
    use_adapter,
)
from tuneqdm_core.serialization import AdapterFileError, load_adapter, read_metadata, save_adapter

__all__ = [
    "Adapter",
    "AdapterConfig",
    "AdapterFileError",
    "Layout",
    "QuantConfig",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "QuantState",
    "Route",
    "ScaleBank",
    "load_adapter",
    "param_groups",
    "quant_state",
    "quantize_",
    "read_metadata",
    "route_adapters",
    "routed",
    "save_adapter",
    "set_route",
    "set_storage_mode",
    "use_adapter",
]
