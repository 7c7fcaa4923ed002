"""Helpers the tests share (``from helpers import rel_err``), and Diag, a method defined outside the package for the
tests of the method contract; fixtures stay in conftest.py. Adapters moved off their identity and pretrained-like
weights for random models come from the library (psoft_vision.testing), which the benchmark uses too."""

from dataclasses import dataclass

import torch
from torch import nn

import psoft_vision as pv


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@torch.no_grad()
def unet_out(unet: torch.nn.Module) -> torch.Tensor:
    """The noise prediction of a tiny-t2i UNet (train/pretrain_t2i.py) on fixed random inputs."""
    gen = torch.Generator().manual_seed(1)
    return unet(torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 700]),
                torch.randn(2, 16, 64, generator=gen)).sample


@dataclass(kw_only=True)
class DiagConfig(pv.AdapterConfig):
    """``limit``: the scales are clipped to ``[1 - limit, 1 + limit]`` (None: not clipped)."""

    limit: float | None = None

    method = "diag"


class DiagAdapter(pv.Adapter):
    """``W' = W diag(s)``: each input feature (Linear) or input channel (Conv2d) scaled by a learnable ``s``, ones
    at init. Scaling the input rather than the output keeps ``forward`` equal to the merged layer where the layer
    has a bias, which merging leaves alone."""

    method = "diag"

    def __init__(self, base, config: DiagConfig):
        super().__init__(config)
        self.conv = base.conv is not None
        self.limit = config.limit
        self.s = nn.Parameter(torch.ones(base.in_features, device=base.device))

    def scales(self) -> torch.Tensor:
        s = self.at_strength(self.s, 1.0)
        return s if self.limit is None else s.clamp(1 - self.limit, 1 + self.limit)

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        s = self.scales().to(x.dtype)
        return inner(x * s[:, None, None] if self.conv else x * s)

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.scales().view(1, -1, *[1] * (weight.ndim - 2))
        return (weight.float() * s).to(weight.dtype)

    def describe(self) -> dict:
        return {"channels": self.s.numel()}


#: Registered by the tests that use it (and unregistered after).
DIAG = pv.Method("diag", DiagConfig, DiagAdapter, identity={"s": 1.0},
                 summary="a learnable scale per input channel (a test method)")
