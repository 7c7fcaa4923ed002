"""Exceptions raised by psoft_vision. Each message names the bad value and how to fix it."""


class PSOFTVisionError(Exception):
    """Base class of every error raised on purpose by psoft_vision."""


class ConfigError(PSOFTVisionError, ValueError):
    """An adapter configuration holds a value that cannot work."""


class TargetNotFoundError(PSOFTVisionError, ValueError):
    """A target (or train module) pattern matched no module of the model."""


class UnsupportedLayerError(PSOFTVisionError, TypeError):
    """A targeted module is of a type (or has a setting) that no adapter supports."""


class BlockSizeError(ConfigError):
    """An OFTv2 block size does not divide the layer's input width."""


class AdapterNameError(PSOFTVisionError, KeyError):
    """An adapter name is already taken, or is not present on the model."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class AdapterFileError(PSOFTVisionError, ValueError):
    """A file is missing, truncated, not safetensors, or not a psoft_vision adapter."""


class AdapterVersionError(AdapterFileError):
    """An adapter file was written in a newer format than this version reads."""


class KeyMismatchError(AdapterFileError):
    """An adapter file's tensors (names or shapes) do not fit the model or the adapter it describes."""


class BaseModelMismatchError(PSOFTVisionError, ValueError):
    """An adapter file was trained on other base weights than the model's."""


class LoRAExportError(ConfigError):
    """An adapter's update cannot be written as the LoRA that was asked for."""


class NotLowRankError(LoRAExportError):
    """The adapter's update is not low rank (OFTv2): only ``full_deltas=True`` can export it exactly."""


class MergeError(PSOFTVisionError, ValueError):
    """Adapters cannot be merged into these layers (quantized bases)."""


class TorchScriptError(PSOFTVisionError, RuntimeError):
    """``torch.jit.script`` was given a model that holds adapted layers; TorchScript is not supported."""
