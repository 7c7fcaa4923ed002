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
