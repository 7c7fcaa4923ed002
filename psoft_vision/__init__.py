"""psoft_vision: PSOFT and OFTv2 orthogonal fine-tuning for timm and diffusers models."""

from .errors import (
    AdapterNameError,
    BlockSizeError,
    ConfigError,
    PSOFTVisionError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from .inject import adapted_layers, inject, merge, trainable_summary, unmerge
from .layer import AdaptedLayer
from .methods import OFTConfig, PSOFTConfig
from .targets import PRESETS

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AdaptedLayer",
    "AdapterNameError",
    "BlockSizeError",
    "ConfigError",
    "OFTConfig",
    "PSOFTConfig",
    "PSOFTVisionError",
    "TargetNotFoundError",
    "UnsupportedLayerError",
    "adapted_layers",
    "inject",
    "merge",
    "trainable_summary",
    "unmerge",
]
