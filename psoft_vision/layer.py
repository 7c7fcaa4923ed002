"""The wrapper that puts named adapters around one frozen linear or convolution layer.

Every adapter is a transform of the layer's weight, ``W -> T(W)``; the active adapters stack in order, so the
effective weight is ``T_n(...T_1(W))``. On the activation path each adapter receives the input and the layer built
from the adapters below it (``inner``), which is exactly that composition without ever forming ``T(W)``. On the
weight path (see :mod:`psoft_vision.bases`) the composed weight is formed and the layer's own forward runs with it.

``weight`` is always the effective weight, differentiable while adapters are active: a parent module that reads
``child.weight`` itself (``F.linear(x, self.qkv.weight, bias)``, as timm's EVA and Swin V2 attention do) computes
with the adapted weight and trains the adapters, exactly as if it had called the layer.

Merging folds a prefix of the stack into the base weight in the same order; the pretrained weight is kept aside
while anything is merged, so unmerging gives it back bit for bit.

The module contract: ``state_dict()`` holds the pretrained weight (never a merged one), every adapter tensor (PSOFT's
subspace included) and, as the layer's extra state, which adapters are active, how many are merged and their
strengths. ``load_state_dict`` therefore restores exactly the saved layer, merges included, into a layer in any
merge state.
"""

import json
import math
from functools import partial

import torch
from torch import nn

from .adapter import Adapter, Inner, fp32
from .bases import classify, weight_of
from .errors import KeyMismatchError, TorchScriptError


class AdaptedLayer(nn.Module):
    """A frozen base layer with a stack of named adapters (``adapters``), of which ``active`` are applied."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.kind = classify(base)
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []  # always a prefix of ``active``: those folded into base.weight
        self.original_weight: torch.Tensor | None = None  # the pretrained weight while anything is merged
        self.register_state_dict_post_hook(_pretrained_weight_in_state)
        self.register_load_state_dict_post_hook(_merge_as_loaded)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight: the base weight with every unmerged active adapter applied, differentiably. A
        quantized base's packed weight is returned as it is: adapters act around it, never on it."""
        weight = self.base.weight
        if self.kind.quantized:
            return weight
        for name in self.active[len(self.merged):]:
            weight = self.adapters[name].merge_into(weight)
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def __getattr__(self, name: str):
        """Any other attribute is the base layer's (``kernel_size``, ``stride``, ``in_features``, ...): parents that
        read their child's geometry, as DaViT's downsampling pads by ``self.conv.kernel_size``, keep working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":  # not set yet (mid-construction or unpickling): nothing to fall back on
                raise
            return getattr(self.base, name)

    @property
    def pretrained_weight(self) -> torch.Tensor:
        """The base weight without any adapter merged in (a quantized base's dequantized, in fp32)."""
        if self.original_weight is not None:
            return self.original_weight
        return weight_of(self.base, self.kind)

    def add(self, name: str, adapter: Adapter) -> None:
        """Stack ``adapter`` on top (outermost); the merged adapters, a prefix of the active ones, stay merged."""
        self.adapters[name] = adapter
        self.active.append(name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named like nn.Linear's: some callers pass input=
        if self.kind.weight_path and len(self.active) > len(self.merged):
            if isinstance(input, torch.fx.Proxy):
                # torch.fx can neither put a Proxy in the parameter's place nor trace every base's own forward
                # (timm's Conv2dSame pads by the input's size): the graph calls this layer as one node, run eagerly
                return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), (input,), {})
            return torch.func.functional_call(self.base, {"weight": self.weight}, (input,))
        layer = Inner(self.base, self.base)
        for name in self.active[len(self.merged) :]:
            layer = Inner(partial(self.adapters[name], inner=layer))
        return layer(input)

    @torch.no_grad()
    def merge(self, upto: str | None = None) -> None:
        """Fold the active adapters (up to and including ``upto``) into the base weight, innermost first.
        (``psoft_vision.merge`` refuses quantized bases before any layer is merged.)"""
        stop = len(self.active) if upto is None else self.active.index(upto) + 1
        for name in self.active[len(self.merged) : stop]:
            if self.original_weight is None:
                self.original_weight = self.base.weight.detach().clone()
            with fp32(self.base.weight.device):  # merged weights never depend on the caller's autocast
                self.base.weight.copy_(self.adapters[name].merge_into(self.base.weight))
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the pretrained weight back, bit for bit."""
        if self.original_weight is not None:
            self.base.weight.copy_(self.original_weight)
        self.original_weight = None
        self.merged = []

    def get_extra_state(self) -> torch.Tensor:
        """The active adapters, how many of them are merged and every adapter's strength, as UTF-8 JSON in a uint8
        tensor: safetensors checkpoints (accelerate's ``save_state``) hold tensors only."""
        state = {"active": self.active, "merged": len(self.merged),
                 "strength": {name: adapter.strength for name, adapter in self.adapters.items()}}
        return torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Take the saved active adapters and strengths; the saved merges are redone once the pretrained weight and
        the adapters' tensors are loaded (:func:`_merge_as_loaded`)."""
        active, merged, strength = _read_extra_state(state, list(self.adapters))
        self.unmerge()
        self.active = active
        for name, value in strength.items():
            self.adapters[name].strength = value
        self._merge_when_loaded = merged

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"

    def __prepare_scriptable__(self):
        """Called by ``torch.jit.script`` on every module before compiling it: adapted layers refuse, by name, since
        TorchScript (deprecated by PyTorch) cannot compile their forward (keyword-argument convolutions, closures,
        custom autograd). torch.export and torch.compile are the supported ways to deploy."""
        raise TorchScriptError(
            f"torch.jit.script cannot compile a model with adapters (this layer wraps a {type(self.base).__name__}, "
            f"adapters {self.active}); TorchScript is deprecated by PyTorch. Deploy with torch.export: "
            "psoft_vision.merge(model) (the adapters folded into the weights), then "
            "torch.export.export(model, (example_input,)); torch.compile(model) works too, merged or not. "
            "psoft_vision.merge_and_unload(model) gives the plain model, which scripts.")


def _read_extra_state(state, adapters: list[str]) -> tuple[list[str], int, dict[str, float]]:
    """``(active, merged count, strengths)`` from a saved extra state, checked against the layer's adapters."""
    try:
        saved = json.loads(bytes(state.to("cpu", torch.uint8).tolist()).decode())
        active, merged, strength = list(saved["active"]), int(saved["merged"]), dict(saved["strength"])
        strength = {str(name): float(value) for name, value in strength.items()}
    except (AttributeError, TypeError, ValueError, KeyError, UnicodeDecodeError) as error:
        raise KeyMismatchError(f"an adapted layer's saved extra state is not one psoft_vision wrote ({error!r}); "
                               "load a state dict saved from a model with the same adapters.") from error
    unknown = sorted({*active, *strength} - set(adapters))
    if unknown or not 0 <= merged <= len(active) or not all(map(math.isfinite, strength.values())):
        raise KeyMismatchError(
            f"the saved layer state (active {active}, {merged} merged, strengths {strength}) does not fit a layer "
            f"with adapters {adapters}: inject the same adapters (names and configs) before load_state_dict.")
    return active, merged, strength


def _pretrained_weight_in_state(layer: AdaptedLayer, state: dict, prefix: str, local_metadata) -> None:
    """A merged layer's state holds the pretrained weight: its extra state says what to merge again on load."""
    if layer.original_weight is not None and prefix + "base.weight" in state:
        state[prefix + "base.weight"] = layer.original_weight


def _merge_as_loaded(layer: AdaptedLayer, incompatible_keys) -> None:
    merged = layer.__dict__.pop("_merge_when_loaded", 0)
    if merged:
        layer.merge(upto=layer.active[merged - 1])
