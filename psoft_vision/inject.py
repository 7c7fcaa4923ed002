"""Putting adapters into a model, and saying what is trained."""

from collections import Counter

from torch import nn

from .errors import AdapterNameError, TargetNotFoundError
from .layer import AdaptedLayer
from .lifecycle import adapted_layers
from .methods import AdapterConfig, PSOFTConfig
from .targets import excluder, select


def inject(model: nn.Module, config: AdapterConfig | None = None, name: str = "default") -> nn.Module:
    """Add the adapter ``name`` described by ``config`` (default: ``PSOFTConfig()``) to ``model``, in place.

    Every parameter is frozen except the new adapter's and those of ``config.train_modules``. On layers that
    already carry adapters the new one is stacked on top (outermost) and all of them stay active. Arguments are
    checked and every adapter is built before the model is touched, so a failure leaves it as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"inject() takes a torch.nn.Module, got {type(model).__name__}; for a diffusers pipeline pass "
            "pipe.unet or pipe.transformer."
        )
    config = PSOFTConfig() if config is None else config
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a PSOFTConfig or an OFTConfig, got {type(config).__name__}.")
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterNameError(f"adapter name {name!r} must be a non-empty string without dots.")

    skip = excluder(model, config.exclude)
    names = [n for n in select(model, config.targets) if not skip(n, model.get_submodule(n))]
    if not names:
        raise TargetNotFoundError(f"exclude={config.exclude!r} removed every target of {config.targets!r}.")
    trained = select(model, list(config.train_modules), "train_modules") if config.train_modules else []

    adapters = {}
    for layer_name in names:
        module = model.get_submodule(layer_name)
        if isinstance(module, AdaptedLayer):
            if name in module.adapters:
                raise AdapterNameError(
                    f"{layer_name!r} already has an adapter named {name!r}; inject with another name."
                )
            module.unmerge()  # a new subspace comes from the pretrained weight, not a merged one
            module = module.base
        adapters[layer_name] = config.make_adapter(module, layer_name)
        adapters[layer_name].config = config

    model.requires_grad_(False)
    for layer_name, adapter in adapters.items():
        module = model.get_submodule(layer_name)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            model.set_submodule(layer_name, module)
        module.add(name, adapter)
    for module_name in trained:
        model.get_submodule(module_name).requires_grad_(True)
    return model


def _count(params) -> int:
    return sum(p.numel() for p in params)


def trainable_summary(model: nn.Module) -> str:
    """A table of adapter parameters (all, and trainable) per adapter, method and layer type, and the totals."""
    layers, params, trainable = Counter(), Counter(), Counter()
    adapter_params = set()
    for _, layer in adapted_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            key = (adapter_name, adapter.method, type(layer.base).__name__)
            layers[key] += 1
            params[key] += _count(adapter.parameters())
            trainable[key] += _count(p for p in adapter.parameters() if p.requires_grad)
            adapter_params.update(id(p) for p in adapter.parameters())
    all_params = list(model.parameters())
    other = [p for p in all_params if id(p) not in adapter_params]
    total_trainable = _count(p for p in all_params if p.requires_grad)
    total = _count(all_params)

    rows = [("adapter", "method", "layer", "layers", "params", "trainable")]
    rows += [(*key, f"{layers[key]}", f"{params[key]:,}", f"{trainable[key]:,}") for key in layers]
    rows.append(("other", "", "", "", f"{_count(other):,}", f"{_count(p for p in other if p.requires_grad):,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    share = 100 * total_trainable / max(total, 1)
    lines.append(f"trainable {total_trainable:,} of {total:,} parameters ({share:.3f}%)")
    return "\n".join(lines)
