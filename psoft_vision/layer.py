"""The wrapper that puts named adapters around one frozen ``nn.Linear`` or ``nn.Conv2d``.

Every adapter is a transform of the layer's weight, ``W -> T(W)``; the active adapters stack in order, so the
effective weight is ``T_n(...T_1(W))``. In the forward each adapter receives the input and the layer built from
the adapters below it (``inner``), which is exactly that composition without ever forming ``T(W)``. Merging
folds a prefix of the stack into the base weight in the same order, unmerging peels it off in reverse.
"""

from functools import partial

import torch
from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


class Adapter(nn.Module):
    """Interface of one adapter on one layer (see :mod:`psoft_vision.methods`)."""

    method: str

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        """The adapted layer's output: ``inner`` is the layer with the adapters below this one."""
        raise NotImplementedError

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        """``T(W)`` for a base weight ``W`` (any dtype; maths in fp32, result in ``W``'s dtype)."""
        raise NotImplementedError

    def unmerge_from(self, weight: torch.Tensor) -> torch.Tensor:
        """``T^{-1}(W)``: undoes :meth:`merge_into`."""
        raise NotImplementedError


class AdaptedLayer(nn.Module):
    """A frozen base layer with a stack of named adapters (``adapters``), of which ``active`` are applied."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []  # always a prefix of ``active``: those already folded into base.weight

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add(self, name: str, adapter: Adapter) -> None:
        self.unmerge()
        self.adapters[name] = adapter
        self.active.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base
        for name in self.active[len(self.merged) :]:
            layer = partial(self.adapters[name], inner=layer)
        return layer(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every active adapter that is not merged yet into the base weight, innermost first."""
        for name in self.active[len(self.merged) :]:
            self.base.weight.copy_(self.adapters[name].merge_into(self.base.weight))
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight, outermost first."""
        while self.merged:
            name = self.merged.pop()
            self.base.weight.copy_(self.adapters[name].unmerge_from(self.base.weight))

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"
