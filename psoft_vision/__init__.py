"""psoft_vision: PSOFT and OFTv2 orthogonal fine-tuning for timm and diffusers models."""

__version__ = "0.1.0"

from .errors import (
    AdapterFileError,
    AdapterNameError,
    AdapterVersionError,
    BaseModelMismatchError,
    BlockSizeError,
    ConfigError,
    KeyMismatchError,
    LoRAExportError,
    NotLowRankError,
    PSOFTVisionError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from .export import export_lora
from .inject import inject, trainable_summary
from .io import load_adapter, read_adapter, save_adapter
from .layer import AdaptedLayer
from .lifecycle import activate, adapted_layers, adapter_names, disabled, merge, remove, set_scale, unmerge
from .methods import OFTConfig, PSOFTConfig
from .targets import PRESETS

__all__ = [
    "PRESETS",
    "AdaptedLayer",
    "AdapterFileError",
    "AdapterNameError",
    "AdapterVersionError",
    "BaseModelMismatchError",
    "BlockSizeError",
    "ConfigError",
    "KeyMismatchError",
    "LoRAExportError",
    "NotLowRankError",
    "OFTConfig",
    "PSOFTConfig",
    "PSOFTVisionError",
    "TargetNotFoundError",
    "UnsupportedLayerError",
    "activate",
    "adapted_layers",
    "adapter_names",
    "disabled",
    "export_lora",
    "inject",
    "load_adapter",
    "merge",
    "read_adapter",
    "remove",
    "save_adapter",
    "set_scale",
    "trainable_summary",
    "unmerge",
]
