"""OFTv2: block-diagonal orthogonal fine-tuning, input-centric, with the Cayley-Neumann transform.

The input is rotated and the frozen layer runs on it: ``y = base(x R^T)``, i.e. ``W' = W R`` with ``R``
block-diagonal over the input features (Linear) or input channels (Conv2d, the same rotation at every pixel,
which merges exactly per kernel tap). ``R W`` is never formed during training.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Adapter, Inner, merge_precision
from ..bases import Base
from ..config import AdapterConfig, check_int, check_neumann_terms, check_pattern, pattern_match
from ..errors import BlockSizeError, UnsupportedLayerError
from ..orthogonal import orthogonal_from_packed, packed_size, split_rows, stacked
from ..registry import Method
from ..targets import chosen_by_preset


@dataclass(kw_only=True)
class OFTConfig(AdapterConfig):
    """OFTv2 settings. ``neumann_terms=None`` is the exact Cayley transform; the default 4 keeps
    ``R^T R - I`` of order ``||Q||^10`` (docs/method.md). ``dropout`` replaces each block's rotation by the
    identity with that probability during training.

    ``block_size`` must divide each layer's input width. Where it does not and the layers were chosen by a preset
    (``targets="auto"`` or a preset name), the layer gets the nearest size that does, with one warning for all
    such layers; with targets you chose, it is a :class:`~psoft_vision.errors.BlockSizeError`.
    ``block_size_pattern`` maps module names (exact or a dotted suffix, longest match wins) to their own block
    size, which must divide.
    """

    block_size: int = 32
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    neumann_terms: int | None = 4

    method = "oft"

    def __post_init__(self):
        super().__post_init__()
        check_int(self.block_size, "block_size", 2, " (OFTv2 uses 32)")
        self.block_size_pattern = check_pattern(self.block_size_pattern, "block_size_pattern", 2)
        check_neumann_terms(self.neumann_terms)


def _divisors(width: int) -> list[int]:
    return [b for b in range(2, width + 1) if width % b == 0]


def nearest_block_size(width: int, block_size: int) -> int:
    """The divisor of ``width`` (at least 2) nearest to ``block_size``; the smaller one on a tie."""
    return min(_divisors(width), key=lambda b: (abs(b - block_size), b))


def _block_size(base: Base, config: OFTConfig) -> tuple[int, int | None]:
    """``(block size, the size asked for if it was adjusted)`` of this layer. Blocks never straddle the groups of
    a grouped convolution, so the size must divide the input channels of one group."""
    width = base.weight_shape[1]
    if width == 1:
        raise UnsupportedLayerError(
            f"{base.name!r} is a depthwise convolution (one input channel per group): a rotation of its input would "
            "mix channels that it keeps apart, and could not be merged. Leave it out of `targets`, or use PSOFT, "
            "which adapts each group in its own subspace.")
    explicit = pattern_match(config.block_size_pattern, base.name)
    size = config.block_size if explicit is None else explicit
    if width % size == 0:
        return size, None
    if explicit is None and chosen_by_preset(config.targets) and width >= 2:
        return nearest_block_size(width, size), size
    raise BlockSizeError(
        f"{base.name!r}: block_size={size} does not divide its input width {width}; valid block sizes are "
        f"{_divisors(width)}. Set {'block_size_pattern' if explicit is not None else 'OFTConfig(block_size=...)'} "
        "to one of them, or exclude the layer."
    )


class OFTAdapter(Adapter):
    """A block-diagonal rotation of one Linear's input features or one Conv2d's input channels."""

    method = "oft"

    def __init__(self, base: Base, config: OFTConfig):
        super().__init__(config)
        self.conv = base.conv
        block_size, asked = _block_size(base, config)
        if asked is not None:
            self.adjusted = {"block_size": (asked, block_size, "does not divide the input width of")}
        self.block_size, self.blocks = block_size, base.in_features // block_size
        self.quantization = base.kind.quantized  # the base runs as it is, on the rotated input
        self.neumann_terms, self.p = config.neumann_terms, config.dropout
        self.q = nn.Parameter(torch.zeros(self.blocks, packed_size(block_size), device=base.device))

    def rotations(self) -> torch.Tensor:
        """The diagonal blocks of R, fp32, shape (blocks, b, b)."""
        return self.built(lambda: self.build_batch([self])[0])

    def batch_key(self):
        return (OFTAdapter, self.block_size, self.neumann_terms, self.q.device, self.q.dtype)

    @classmethod
    def build_batch(cls, adapters: list["OFTAdapter"]) -> list[torch.Tensor]:
        """The rotations of every adapter from one batched Cayley(-Neumann) transform."""
        q = stacked([a.at_strength(a.q, 0.0) for a in adapters])
        blocks = [a.blocks for a in adapters]
        rotations = orthogonal_from_packed(q, adapters[0].block_size, adapters[0].neumann_terms,
                                           tuple(blocks) if len(adapters) > 1 else None)
        return split_rows(rotations, blocks)

    def forward(self, x: torch.Tensor, inner: Inner) -> torch.Tensor:
        r = self.rotations()
        if self.training and self.p > 0:
            keep = torch.rand(self.blocks, device=r.device) >= self.p
            r = torch.where(keep[:, None, None], r, torch.eye(self.block_size, device=r.device))
        r = r.to(x.dtype)
        if self.conv is not None:  # the rotation as a grouped 1x1 conv: out channel (k, j) reads in channels (k, i)
            rotated = F.conv2d(x, r.reshape(-1, self.block_size, 1, 1), groups=self.blocks)
        else:
            rotated = torch.einsum("...ki,kji->...kj", x.unflatten(-1, (self.blocks, self.block_size)), r).flatten(-2)
        return inner(rotated)

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        # W' = W R per group: the rows of group g read its input channels, rotated by that group's blocks.
        groups = self.blocks * self.block_size // weight.shape[1]
        w = merge_precision(weight).unflatten(0, (groups, -1)).unflatten(2, (-1, self.block_size))
        r = self.rotations().to(w.dtype).unflatten(0, (groups, -1))
        return torch.einsum("goki...,gkij->gokj...", w, r).flatten(2, 3).flatten(0, 1).to(weight.dtype)

    def describe(self) -> dict:
        return {"block_size": self.block_size, "blocks": self.blocks, "quantization": self.quantization}

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, blocks={self.blocks}, neumann_terms={self.neumann_terms}"


# "dreambooth": searched on the offline pipeline (train/dreambooth/search.py, docs/dreambooth_search.md).
METHOD = Method("oft", OFTConfig, OFTAdapter, size_field="block_size", size_pattern_field="block_size_pattern",
                identity={"q": 0.0}, learning_rates={"vtab": 5e-3, "dreambooth": 1e-2}, display_name="OFTv2",
                summary="OFTv2: a block-diagonal rotation of each layer's input (Cayley-Neumann)")
