"""Helpers for tests and benchmarks of adapters: adapters moved off their identity, so that a wrong merge or load
shows, and randomly initialised models given the signal a pretrained one carries (tests/, bench/zoo.py)."""

import torch
from torch import nn

from .errors import ConfigError
from .model import adapted_layers
from .registry import get_method

#: A parameter entirely below this is treated as a zero or layer-scale init (:func:`emulate_pretrained`).
NEAR_ZERO = 1e-3


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Every adapter parameter at its identity value (its method's ``Method.identity``: PSOFT's rotation
    generator 0, its scalings 1) plus ``N(0, std)`` noise, drawn in parameter order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapted_layers(model):
        for adapter in layer.adapters.values():
            identity = get_method(adapter.method).identity
            for name, p in adapter.named_parameters():
                if name not in identity:
                    raise ConfigError(f"{type(adapter).__name__}.{name}: method {adapter.method!r} declares no "
                                      f"identity value for it; add it to its Method's identity= (it has "
                                      f"{dict(identity)}).")
                p.copy_(identity[name] + torch.randn(p.shape, generator=gen) * std)


@torch.no_grad()
def emulate_pretrained(model: nn.Module, seed: int = 0) -> None:
    """Give parameters that are zero or nearly so (all below :data:`NEAR_ZERO`) random values of a trained model's
    size, N(0, 0.1): zero-initialised residual branches and biases, and layer scales initialised to 1e-5 or 1e-6,
    would otherwise carry (almost) no signal, so an adapter there could be wrong unseen."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.numel() and p.abs().max() < NEAR_ZERO:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
