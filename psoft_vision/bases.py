"""The frozen layers adapters are built on: which module types qualify, and what an adapter may read of them.

A :class:`Base` is the adapter's view of one frozen layer: its kind, its weight's shape, its convolution geometry
and its pretrained weight (unmerged, even while other adapters are merged into the module). :func:`base_of` makes
one, or refuses the module with an :class:`~psoft_vision.errors.UnsupportedLayerError` that names it and says what
to do.

Two ways to run an adapter on a layer:

- the activation path, for exactly ``nn.Linear`` and ``nn.Conv2d`` (zero padding, no groups): the adapter works
  on the layer's input and output and never forms the adapted weight (fast, and what the adapters are built for);
- the weight path, for every other supported layer (subclasses with their own forward, such as timm's
  ``Conv2dSame`` and weight-standardised ``StdConv2d``, other padding modes, grouped convolutions): the adapted
  weight ``T(W)`` is formed, differentiably, and the layer's own forward runs with it. Merged and unmerged outputs
  are then equal by construction, whatever the layer does with its weight.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedLayerError
from .quantized_layers import dequantized_weight, quantization_of

LINEAR, CONV2D = "linear", "conv2d"


@dataclass(frozen=True)
class LayerKind:
    name: str  # LINEAR or CONV2D
    groups: int = 1
    weight_path: bool = False  # the adapter must act on the weight (see the module docstring)
    quantized: str | None = None  # "bnb-nf4", "torchao-int8", ... (psoft_vision.quantized): the layer runs as it is


@dataclass(frozen=True, eq=False)
class Base:
    module: nn.Module
    name: str
    kind: LayerKind
    weight_shape: tuple[int, ...]  # (out, in) or (out, in / groups, kh, kw)
    conv: dict | None = None  # the keyword arguments of F.conv2d; None for a linear layer
    weight_override: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        """Input features of a linear layer, input channels of a convolution."""
        return self.weight_shape[1] * self.kind.groups

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def pretrained_weight(self) -> torch.Tensor:
        """The pretrained weight, detached, in its stored dtype; a quantized layer's dequantized, in fp32."""
        if self.weight_override is not None:
            return self.weight_override.detach()
        return weight_of(self.module, self.kind)


def weight_of(module: nn.Module, kind: LayerKind) -> torch.Tensor:
    """What the layer computes with, detached: its weight, or its dequantized weight (fp32)."""
    if kind.quantized:
        return dequantized_weight(module, kind.quantized)
    return module.weight.detach()


def _weight_reparametrized(module: nn.Module) -> str | None:
    """How the module recomputes its weight from other tensors before each call, if it does."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return "a parametrization (torch.nn.utils.parametrize, parametrizations.weight_norm, ...)"
    if any(type(hook).__name__ == "WeightNorm" for hook in module._forward_pre_hooks.values()):
        return "torch.nn.utils.weight_norm"
    return None


def classify(module: nn.Module, name: str = "") -> LayerKind | None:
    """The kind of a layer adapters support, or None; a layer with an unsupported quantized weight is an
    ``UnsupportedLayerError``."""
    if isinstance(module, nn.Linear):
        quantized = quantization_of(module, name)
        if quantized:
            return LayerKind(LINEAR, quantized=quantized)
        return LayerKind(LINEAR, weight_path=type(module) is not nn.Linear)
    if isinstance(module, nn.Conv2d) and not isinstance(module, nn.ConvTranspose2d):
        plain = type(module) is nn.Conv2d and module.padding_mode == "zeros" and module.groups == 1
        return LayerKind(CONV2D, groups=module.groups, weight_path=not plain)
    return None


def base_of(module: nn.Module, name: str, pretrained_weight: torch.Tensor | None = None) -> Base:
    """The :class:`Base` of ``module`` (named ``name`` in its model), or an ``UnsupportedLayerError``."""
    kind = classify(module, name)
    if kind is None:
        raise UnsupportedLayerError(
            f"{name!r} is a {type(module).__name__}; adapters support linear and 2-D convolution layers "
            "(nn.Linear, nn.Conv2d and their subclasses). Leave it out of `targets` (or add it to `exclude`).")
    reparametrized = _weight_reparametrized(module)
    if reparametrized:
        raise UnsupportedLayerError(
            f"{name!r} recomputes its weight before every call with {reparametrized}; merging could not change "
            "what it computes. Fold it into a plain weight first (torch.nn.utils.remove_weight_norm or "
            "parametrize.remove_parametrizations(module, 'weight')), then inject.")
    weight = getattr(module, "weight", None)
    if kind.quantized:  # its packed storage says nothing of its shape
        return Base(module, name, kind, (module.out_features, module.in_features), None, pretrained_weight)
    if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter) \
            or weight.is_meta:
        raise UnsupportedLayerError(
            f"{name!r} ({type(module).__name__}) has no materialised weight yet (a lazy or meta-device layer); run "
            "one forward pass (or load the weights) before inject.")
    if not torch.isfinite(pretrained_weight if pretrained_weight is not None else weight.detach()).all():
        raise UnsupportedLayerError(f"{name!r} has NaN or infinite weights: the base model is damaged (or diverged "
                                    "in training); load healthy weights, or leave the layer out of `targets`.")
    if module.weight.numel() == 0:
        raise UnsupportedLayerError(f"{name!r} has an empty weight {tuple(module.weight.shape)}; leave it out of "
                                    "`targets`.")
    conv = None
    if kind.name == CONV2D:
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    return Base(module, name, kind, tuple(module.weight.shape), conv, pretrained_weight)
