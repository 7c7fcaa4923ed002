"""The wrapper that puts named adapters around one frozen ``nn.Linear`` or ``nn.Conv2d``.

Every adapter is a transform of the layer's weight, ``W -> T(W)``; the active adapters stack in order, so the
effective weight is ``T_n(...T_1(W))``. In the forward each adapter receives the input and the layer built from
the adapters below it (``inner``), which is exactly that composition without ever forming ``T(W)``. Merging
folds a prefix of the stack into the base weight in the same order; the pretrained weight is kept aside while
anything is merged, so unmerging gives it back bit for bit.
"""

from functools import partial

import torch
from torch import nn

from .adapter import Adapter


class AdaptedLayer(nn.Module):
    """A frozen base layer with a stack of named adapters (``adapters``), of which ``active`` are applied."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []  # always a prefix of ``active``: those folded into base.weight
        self.original_weight: torch.Tensor | None = None  # the pretrained weight while anything is merged

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def pretrained_weight(self) -> torch.Tensor:
        """The base weight without any adapter merged in."""
        return self.base.weight if self.original_weight is None else self.original_weight

    def add(self, name: str, adapter: Adapter) -> None:
        """Stack ``adapter`` on top (outermost); the merged adapters, a prefix of the active ones, stay merged."""
        self.adapters[name] = adapter
        self.active.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base
        for name in self.active[len(self.merged) :]:
            layer = partial(self.adapters[name], inner=layer)
        return layer(x)

    @torch.no_grad()
    def merge(self, upto: str | None = None) -> None:
        """Fold the active adapters (up to and including ``upto``) into the base weight, innermost first."""
        stop = len(self.active) if upto is None else self.active.index(upto) + 1
        for name in self.active[len(self.merged) : stop]:
            if self.original_weight is None:
                self.original_weight = self.base.weight.detach().clone()
            self.base.weight.copy_(self.adapters[name].merge_into(self.base.weight))
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the pretrained weight back, bit for bit."""
        if self.original_weight is not None:
            self.base.weight.copy_(self.original_weight)
        self.original_weight = None
        self.merged = []

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"
