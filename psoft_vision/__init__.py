"""psoft_vision: PSOFT and OFTv2 orthogonal fine-tuning for timm and diffusers models."""

__version__ = "0.2.0"

from .adapter import Adapter
from .config import AdapterConfig
from .errors import (
    AdapterFileError,
    AdapterNameError,
    AdapterVersionError,
    BaseModelMismatchError,
    BlockSizeError,
    ConfigError,
    KeyMismatchError,
    LoRAExportError,
    MergeError,
    NotLowRankError,
    PSOFTVisionError,
    TargetNotFoundError,
    TorchScriptError,
    UnsupportedLayerError,
)
from .export import export_lora
from .export_oft import export_oft
from .inject import inject, trainable_summary
from .io import load_adapter, read_adapter, save_adapter
from .layer import AdaptedLayer
from .lifecycle import activate, adapted_layers, adapter_names, disabled, merge, remove, set_strength, unmerge
from .methods import OFTConfig, PSOFTConfig
from .quantized import quantize_base
from .registry import Method, get_method, register_method, registered_methods, unregister_method
from .targets import PRESETS

__all__ = [
    "PRESETS",
    "AdaptedLayer",
    "Adapter",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterNameError",
    "AdapterVersionError",
    "BaseModelMismatchError",
    "BlockSizeError",
    "ConfigError",
    "KeyMismatchError",
    "LoRAExportError",
    "MergeError",
    "Method",
    "NotLowRankError",
    "OFTConfig",
    "PSOFTConfig",
    "PSOFTVisionError",
    "TargetNotFoundError",
    "TorchScriptError",
    "UnsupportedLayerError",
    "activate",
    "adapted_layers",
    "adapter_names",
    "disabled",
    "export_lora",
    "export_oft",
    "get_method",
    "inject",
    "load_adapter",
    "merge",
    "quantize_base",
    "read_adapter",
    "register_method",
    "registered_methods",
    "remove",
    "save_adapter",
    "set_strength",
    "trainable_summary",
    "unmerge",
    "unregister_method",
]
