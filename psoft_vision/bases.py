"""The frozen layers adapters are built on: which module types qualify, and what an adapter may read of them.

A :class:`Base` is the adapter's view of one frozen layer: its weight's shape, its convolution geometry and its
pretrained weight (unmerged, even while other adapters are merged into the module). :func:`base_of` makes one, or
refuses the module with an :class:`~psoft_vision.errors.UnsupportedLayerError` that names it and says what to do.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedLayerError

LINEAR, CONV2D = "linear", "conv2d"


@dataclass(frozen=True, eq=False)
class Base:
    module: nn.Module
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    conv: dict | None = None  # the keyword arguments of F.conv2d; None for a linear layer
    weight_override: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        """Input features of a linear layer, input channels of a convolution."""
        return self.weight_shape[1]

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def pretrained_weight(self) -> torch.Tensor:
        """The pretrained weight, detached, in its stored dtype."""
        weight = self.module.weight if self.weight_override is None else self.weight_override
        return weight.detach()


def _refuse(name: str, module: nn.Module, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"{name!r} is a {type(module).__name__}{why}. Leave it out of `targets` (or add it "
                                 "to `exclude`).")


def base_of(module: nn.Module, name: str, pretrained_weight: torch.Tensor | None = None) -> Base:
    """The :class:`Base` of ``module`` (named ``name`` in its model), or an ``UnsupportedLayerError``."""
    if isinstance(module, nn.Linear):
        return Base(module, name, LINEAR, tuple(module.weight.shape), None, pretrained_weight)
    if not isinstance(module, nn.Conv2d):
        raise _refuse(name, module, "; adapters support nn.Linear and nn.Conv2d")
    if module.groups != 1:
        raise _refuse(name, module, f" with groups={module.groups}; only groups=1 is supported")
    if module.padding_mode != "zeros":
        raise _refuse(name, module, f" with padding_mode={module.padding_mode!r}; only 'zeros' is supported")
    conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    return Base(module, name, CONV2D, tuple(module.weight.shape), conv, pretrained_weight)
