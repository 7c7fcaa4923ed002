"""Putting adapters into a model, and saying what is trained."""

import warnings
from collections import Counter, defaultdict

from torch import nn

from . import batching
from .bases import base_of
from .config import AdapterConfig
from .errors import AdapterNameError, ConfigError, TargetNotFoundError, UnsupportedLayerError
from .foreign import guard_fusion, refuse_targets
from .layer import AdaptedLayer
from .model import REQUIRES_GRAD, adapted_layers, adapter_names
from .quantized_layers import keep_training_layout
from .registry import method_of
from .targets import excluder, select

_RESERVED_NAMES = frozenset(dir(nn.ModuleDict()))


def check_adapter_name(name) -> None:
    """A name an adapter can have: a non-empty string, no dots, not an attribute of ``nn.ModuleDict``."""
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterNameError(f"adapter name {name!r} must be a non-empty string without dots.")
    if name in _RESERVED_NAMES:
        raise AdapterNameError(f"adapter name {name!r} is an attribute of torch.nn.Module and cannot name an adapter; "
                               "choose another name, e.g. 'style'.")


def inject(model: nn.Module, config: AdapterConfig | None = None, name: str = "default") -> nn.Module:
    """Add the adapter ``name`` described by ``config`` (default: ``PSOFTConfig()``) to ``model``, in place.

    Every parameter is frozen except the new adapter's and those of ``config.train_modules`` (``remove`` gives the
    flags they had before the first adapter back). Refuses targets that are PEFT's LoRA layers or lie in an attention
    with fused projections, and makes diffusers' ``fuse_qkv_projections`` refuse while adapters are on
    (:mod:`psoft_vision.foreign`). On layers that
    already carry adapters the new one is stacked on top (outermost) and all of them stay active; layers with
    merged adapters stay merged. Arguments are checked and every adapter is built before the model is touched,
    so a failure leaves it exactly as it was.
    """
    from .methods import PSOFTConfig

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"inject() takes a torch.nn.Module, got {type(model).__name__}; for a diffusers pipeline pass "
            "pipe.unet or pipe.transformer."
        )
    config = PSOFTConfig() if config is None else config
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig (PSOFTConfig, OFTConfig, ...), got {type(config).__name__}.")
    method = method_of(config)
    check_adapter_name(name)
    if name in adapter_names(model):
        raise AdapterNameError(f"the model already has an adapter named {name!r}; inject with another name, or "
                               f"remove it first (psoft_vision.remove(model, {name!r})).")

    skip = excluder(model, config.exclude)
    names = [n for n in select(model, config.targets) if not skip(n, model.get_submodule(n))]
    if not names:
        raise TargetNotFoundError(f"exclude={config.exclude!r} removed every target of {config.targets!r}.")
    refuse_targets(model, names)
    trained = select(model, list(config.train_modules), "train_modules") if config.train_modules else []
    adapters = {layer_name: _build(model.get_submodule(layer_name), layer_name, method, config)
                for layer_name in names}
    _warn_adjusted(adapters)

    if not adapter_names(model):  # remove() gives these back once the last adapter is gone
        model.__dict__[REQUIRES_GRAD] = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for layer_name, adapter in adapters.items():
        module = model.get_submodule(layer_name)
        if not isinstance(module, AdaptedLayer):
            keep_training_layout(module)
            module = AdaptedLayer(module).train(module.training)
            model.set_submodule(layer_name, module)
        module.add(name, adapter.train(module.training))  # an eval-mode model stays in eval mode: no dropout
    for module_name in trained:
        model.get_submodule(module_name).requires_grad_(True)
    batching.refresh(model)
    batching.attach(model)
    guard_fusion(model)
    return model


def _build(module: nn.Module, layer_name: str, method, config):
    """The adapter of ``method`` for one layer, built from its pretrained weight (unmerged) without changing it."""
    if isinstance(module, AdaptedLayer):
        base = base_of(module.base, layer_name, module.pretrained_weight)
    else:
        base = base_of(module, layer_name)
    if base.kind.name not in method.layer_kinds:
        raise UnsupportedLayerError(f"{layer_name!r} is a {base.kind.name} layer; method {method.name!r} adapts "
                                    f"{', '.join(method.layer_kinds)} layers. Leave it out of `targets`.")
    adapter = method.adapter(base, config)
    if adapter.config is not config:
        raise ConfigError(f"{type(adapter).__name__} must keep the config it is built from (Adapter.__init__).")
    return adapter


def _warn_adjusted(adapters: dict) -> None:
    """One warning per setting that some layers could not take, listing what those layers use instead."""
    changed = defaultdict(list)
    for layer_name, adapter in adapters.items():
        for setting, (asked, used, reason) in adapter.adjusted.items():
            changed[setting, asked, reason].append(f"{used} on {layer_name!r}")
    for (setting, asked, reason), layers in changed.items():
        shown = ", ".join(layers[:6]) + (f", ... ({len(layers)} layers)" if len(layers) > 6 else "")
        warnings.warn(f"{setting} {asked} {reason} {len(layers)} of {len(adapters)} layers; using {setting} "
                      f"{shown}.", stacklevel=3)


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
