"""psoft_vision: PSOFT and OFTv2 orthogonal fine-tuning for timm and diffusers models."""

from .adapter import Adapter
from .config import AdapterConfig
from .errors import (
    AdapterFileError,
    AdapterNameError,
    AdapterVersionError,
    BaseModelMismatchError,
    BlockSizeError,
    ConfigError,
    HubAccessError,
    HubError,
    HubNotFoundError,
    HubOfflineError,
    KeyMismatchError,
    LoRAExportError,
    MergeError,
    MissingExtraError,
    NotLowRankError,
    OutputPathError,
    PSOFTVisionError,
    TargetNotFoundError,
    TorchScriptError,
    UnsupportedLayerError,
    WeightsNotLoadedError,
)
from .export import export_lora
from .export_oft import export_oft
from .inject import inject, trainable_summary
from .io import load_adapter, read_adapter, save_adapter
from .layer import AdaptedLayer
from .lifecycle import activate, disabled, merge, merge_and_unload, remove, set_strength, unmerge
from .methods import OFTConfig, PSOFTConfig
from .model import adapted_layers, adapter_names
from .publish import push_to_hub
from .quantized import quantize_base
from .registry import Method, get_method, register_method, registered_methods, unregister_method
from .targets import PRESETS
from .version import __version__ as __version__  # the package version, read by adapter files too

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
    "HubAccessError",
    "HubError",
    "HubNotFoundError",
    "HubOfflineError",
    "KeyMismatchError",
    "LoRAExportError",
    "MergeError",
    "Method",
    "MissingExtraError",
    "NotLowRankError",
    "OFTConfig",
    "OutputPathError",
    "PSOFTConfig",
    "PSOFTVisionError",
    "TargetNotFoundError",
    "TorchScriptError",
    "UnsupportedLayerError",
    "WeightsNotLoadedError",
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
    "merge_and_unload",
    "push_to_hub",
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
