"""OFTv2: block-diagonal orthogonal fine-tuning, input-centric, with the Cayley-Neumann transform.

The input is rotated and the frozen layer runs on it: ``y = base(x R^T)``, i.e. ``W' = W R`` with ``R``
block-diagonal over the input features (Linear) or input channels (Conv2d, the same rotation at every pixel,
which merges exactly per kernel tap). ``R W`` is never formed during training.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BlockSizeError, ConfigError
from ..layer import Adapter
from ..orthogonal import orthogonal_from_packed, packed_size
from .common import AdapterConfig, check_neumann_terms, conv_geometry


@dataclass(kw_only=True)
class OFTConfig(AdapterConfig):
    """OFTv2 settings. ``neumann_terms=None`` is the exact Cayley transform; the default 4 keeps
    ``R^T R - I`` of order ``||Q||^10`` (see :mod:`psoft_vision.orthogonal`). ``dropout`` replaces each block's
    rotation by the identity with that probability during training."""

    block_size: int = 32
    neumann_terms: int | None = 4

    method = "oft"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 2:
            raise ConfigError(f"block_size={self.block_size!r} must be an integer >= 2 (OFTv2 uses 32).")
        check_neumann_terms(self.neumann_terms)

    def make_adapter(self, layer: nn.Module, layer_name: str) -> "OFTAdapter":
        return OFTAdapter(layer, self.block_size, neumann_terms=self.neumann_terms, dropout=self.dropout,
                          layer_name=layer_name)


class OFTAdapter(Adapter):
    """A block-diagonal rotation of one Linear's input features or one Conv2d's input channels."""

    method = "oft"

    def __init__(self, layer: nn.Module, block_size: int, *, neumann_terms: int | None = 4, dropout: float = 0.0,
                 layer_name: str = ""):
        super().__init__()
        self.conv = conv_geometry(layer, layer_name) is not None
        width = layer.weight.shape[1]
        if width % block_size:
            valid = [b for b in range(2, width + 1) if width % b == 0]
            raise BlockSizeError(
                f"{layer_name!r}: block_size={block_size} does not divide its input width {width}; "
                f"valid block sizes are {valid}. Set OFTConfig(block_size=...) to one of them, or exclude the layer."
            )
        self.block_size, self.blocks = block_size, width // block_size
        self.neumann_terms, self.p = neumann_terms, dropout
        self.q = nn.Parameter(torch.zeros(self.blocks, packed_size(block_size), device=layer.weight.device))

    def rotations(self) -> torch.Tensor:
        """The diagonal blocks of R, fp32, shape (blocks, b, b)."""
        return self.cached(lambda: orthogonal_from_packed(self.scaled(self.q, 0.0), self.block_size,
                                                          self.neumann_terms))

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        r = self.rotations()
        if self.training and self.p > 0:
            keep = torch.rand(self.blocks, device=r.device) >= self.p
            r = torch.where(keep[:, None, None], r, torch.eye(self.block_size, device=r.device))
        r = r.to(x.dtype)
        if self.conv:  # the rotation as a grouped 1x1 conv: out channel (k, j) reads in channels (k, i)
            rotated = F.conv2d(x, r.reshape(-1, self.block_size, 1, 1), groups=self.blocks)
        else:
            rotated = torch.einsum("...ki,kji->...kj", x.unflatten(-1, (self.blocks, self.block_size)), r).flatten(-2)
        return inner(rotated)

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float().unflatten(1, (self.blocks, self.block_size))
        return torch.einsum("oki...,kij->okj...", w, self.rotations()).flatten(1, 2).to(weight.dtype)

    def describe(self) -> dict:
        return {"block_size": self.block_size, "blocks": self.blocks}

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, blocks={self.blocks}, neumann_terms={self.neumann_terms}"
