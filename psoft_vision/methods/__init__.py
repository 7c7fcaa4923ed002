"""One module per method: its config and its layer adapter."""

from .common import AdapterConfig
from .oft import OFTAdapter, OFTConfig
from .psoft import PSOFTAdapter, PSOFTConfig, principal_subspace

__all__ = ["AdapterConfig", "OFTAdapter", "OFTConfig", "PSOFTAdapter", "PSOFTConfig", "principal_subspace"]
