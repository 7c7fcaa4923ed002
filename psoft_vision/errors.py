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


class OFTExportError(LoRAExportError):
    """An OFTv2 adapter cannot be written as PEFT's own OFT adapter (``export_oft``); the full-delta LoRA,
    ``export_lora(..., full_deltas=True)``, remains exact. A LoRAExportError for the code that caught that before."""


class MergeError(PSOFTVisionError, ValueError):
    """Adapters cannot be merged into these layers (quantized bases)."""


class WeightsNotLoadedError(PSOFTVisionError, RuntimeError):
    """Adapted layers hold weights on the meta device (offloaded by accelerate, or never loaded)."""


class MissingExtraError(PSOFTVisionError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


class HubError(PSOFTVisionError, OSError):
    """A hub repository, revision or file could not be had; the message names what was tried."""


class HubOfflineError(HubError):
    """No network (or ``HF_HUB_OFFLINE=1``), and what was asked for is not in the local cache."""


class HubAccessError(HubError):
    """A gated or private repository without access, or no repository of that name."""


class HubNotFoundError(HubError):
    """The repository has no such revision or file."""


class OutputPathError(PSOFTVisionError, OSError):
    """A path to write cannot take the file or folder: it is not a regular file (a device, a FIFO, a directory), its
    folder is a file, or the file system refused the write (read-only, full, permissions). What was there before is
    left as it was."""


class TorchScriptError(PSOFTVisionError, RuntimeError):
    """``torch.jit.script`` was given a model that holds adapted layers; TorchScript is not supported."""
