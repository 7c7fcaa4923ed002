"""Helpers the tests share (``from helpers import rel_err``); fixtures stay in conftest.py. Adapters moved off their
identity and pretrained-like weights for random models come from the library (psoft_vision.testing), which the
benchmark uses too."""

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@torch.no_grad()
def unet_out(unet: torch.nn.Module) -> torch.Tensor:
    """The noise prediction of a tiny-t2i UNet (train/pretrain_t2i.py) on fixed random inputs."""
    gen = torch.Generator().manual_seed(1)
    return unet(torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 700]),
                torch.randn(2, 16, 64, generator=gen)).sample
