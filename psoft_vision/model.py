"""Queries on a whole model: its adapted layers, its adapter names, the module under a torch.compile wrapper, and
where inject keeps the requires_grad flags it changed."""

from collections.abc import Iterator, Sequence

from torch import nn

from .errors import AdapterNameError
from .layer import AdaptedLayer

#: The attribute under which inject keeps the model's requires_grad flags from before its first adapter.
REQUIRES_GRAD = "_psoft_vision_requires_grad"


def uncompiled(model):
    """The module ``torch.compile(module)`` wraps, or ``model`` itself: adapter files and exports name layers as the
    model defines them, not with the wrapper's ``_orig_mod.`` prefix."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(model, nn.Module) and isinstance(inner, nn.Module) else model


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """``(name, layer)`` for every adapted layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model, in the order they were added."""
    names = {}
    for _, layer in adapted_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def check_names(model: nn.Module, names: Sequence[str]) -> None:
    """An ``AdapterNameError`` unless every one of ``names`` is an adapter on the model."""
    present = adapter_names(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise AdapterNameError(f"no adapter named {missing} on {type(model).__name__}; it has {present}.")


def one_adapter_name(model: nn.Module, name: str | None) -> str:
    """``name`` checked to be on the model, or the model's only adapter name when ``name`` is None."""
    names = adapter_names(model)
    if not names:
        raise AdapterNameError(f"{type(model).__name__} has no adapters; inject (or load) one first.")
    if name is None:
        if len(names) > 1:
            raise AdapterNameError(f"the model has adapters {names}; pass name= to choose one.")
        return names[0]
    check_names(model, [name])
    return name
