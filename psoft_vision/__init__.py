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
    OFTExportError,
    OutputPathError,
    PSOFTVisionError,
    TargetNotFoundError,
    TorchScriptError,
    UnsupportedLayerError,
    WeightsNotLoadedError,
)
from .export import export_lora
from .export_oft import export_oft
from .formats.native import load_adapter, load_adapter_into_pipeline, read_adapter
from .formats.peft_adapter import load_peft_lora
from .inject import inject, trainable_summary
from .layer import AdaptedLayer
from .lifecycle import activate, disabled, merge, merge_and_unload, remove, set_strength, unmerge
from .methods import OFTConfig, PSOFTConfig
from .model import adapted_layers, adapter_names
from .publish import push_to_hub, save_adapter
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
    "OFTExportError",
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
    "load_adapter_into_pipeline",
    "load_peft_lora",
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


def __getattr__(name: str):
    """The modules that moved into :mod:`psoft_vision.formats` (``io``, ``diffusers``, ``kohya``, ``fingerprint``):
    ``psoft_vision.io.load_adapter`` reaches their names still, each with a DeprecationWarning."""
    if name in ("io", "diffusers", "kohya", "fingerprint"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
