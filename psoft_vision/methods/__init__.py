"""The methods that ship with psoft_vision, one module each, registered here (see :mod:`psoft_vision.registry`)."""

from ..registry import register_method
from . import oft, psoft
from .oft import OFTAdapter, OFTConfig
from .psoft import PSOFTAdapter, PSOFTConfig, principal_subspace

for _module in (psoft, oft):
    register_method(_module.METHOD)

__all__ = ["OFTAdapter", "OFTConfig", "PSOFTAdapter", "PSOFTConfig", "principal_subspace"]
