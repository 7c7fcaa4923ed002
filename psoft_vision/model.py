"""Queries on a whole model: its adapted layers and their names (as files name them, without wrappers), its
adapter names, the layers and train_modules of one adapter, the model inside training wrappers, a pipeline's
denoiser, and where inject keeps the requires_grad flags it changed."""

import warnings
from collections.abc import Iterator, Sequence

from torch import nn

from .errors import AdapterNameError
from .layer import AdaptedLayer

#: The attribute under which inject keeps the model's requires_grad flags from before its first adapter.
REQUIRES_GRAD = "_psoft_vision_requires_grad"


#: Wrappers that hold the model as ``.module`` and prefix every name with ``module.``: DDP, DataParallel, FSDP1
#: (also what accelerate's ``prepare`` returns for them) and DeepSpeed's engine.
_MODULE_WRAPPERS = frozenset({"DistributedDataParallel", "DataParallel", "FullyShardedDataParallel",
                              "DeepSpeedEngine"})


def unwrapped(model):
    """The model inside the wrappers that training code puts around it (``torch.compile``'s ``_orig_mod``, DDP,
    DataParallel, FSDP1, DeepSpeed, in any nesting), or ``model`` itself: adapter files and exports name layers as
    the model defines them, not with a wrapper's ``_orig_mod.`` or ``module.`` prefix."""
    while isinstance(model, nn.Module):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and type(model).__name__ in _MODULE_WRAPPERS:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


#: Attributes under which wrappers inside a model hold what they wrap (FSDP1's auto-wrapped blocks, activation
#: checkpointing, a compiled submodule): not part of a layer's name as the model defines it.
_INNER_WRAPPERS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def plain_name(name: str) -> str:
    """``name`` without the wrapper attributes in it: ``blocks.0._fsdp_wrapped_module.attn.qkv`` is
    ``blocks.0.attn.qkv``, the name adapter files and exports use."""
    return ".".join(part for part in name.split(".") if part not in _INNER_WRAPPERS)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """``(name, layer)`` for every adapted layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def plainly_named_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """:func:`adapted_layers` under the names files use (:func:`plain_name`)."""
    for name, layer in adapted_layers(model):
        yield plain_name(name), layer


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


def holding(model: nn.Module, name: str) -> list[tuple[str, AdaptedLayer, nn.Module]]:
    """``(layer name, layer, adapter)`` for every layer that holds adapter ``name``; warns (once each) when other
    adapters are active on those layers or ``name`` is not active, since an export holds its update alone."""
    found, stacked, inactive = [], [], []
    for layer_name, layer in plainly_named_layers(model):
        if name not in layer.adapters:
            continue
        found.append((layer_name, layer, layer.adapters[name]))
        if name not in layer.active:
            inactive.append(layer_name)
        elif [n for n in layer.active if n != name]:
            stacked.append(layer_name)
    if stacked:
        warnings.warn(
            f"{len(stacked)} layers (first: {stacked[0]!r}) also have other active adapters; stacked adapters "
            f"compose, and this export holds only adapter {name!r}'s own update, so it alone does not reproduce the "
            "stacked model.", stacklevel=3,
        )
    if inactive:
        warnings.warn(
            f"adapter {name!r} is not active on {len(inactive)} layers (first: {inactive[0]!r}); its update is "
            "exported anyway.", stacklevel=3,
        )
    return found


def train_modules_of(model: nn.Module, name: str) -> list[str]:
    """The ``train_modules`` of adapter ``name``'s config (they travel beside the adapter, not in it)."""
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            return list(layer.adapters[name].config.train_modules)
    return []


def denoiser(pipe) -> tuple[nn.Module, str]:
    """``(module, attribute)`` of a diffusers pipeline's denoiser: ``pipe.unet`` if it has one, else
    ``pipe.transformer`` (inside its ``torch.compile`` or other wrapper)."""
    for attribute in ("unet", "transformer"):
        module = getattr(pipe, attribute, None)
        if isinstance(module, nn.Module):
            return unwrapped(module), attribute
    raise TypeError(
        f"{type(pipe).__name__} has neither a `unet` nor a `transformer` module; pass a torch.nn.Module, or a "
        "diffusers pipeline with a unet or transformer."
    )
