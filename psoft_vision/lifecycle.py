"""The adapter lifecycle on a whole model: merge, strength, disable, choose active adapters, remove."""

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from . import batching
from .errors import AdapterNameError, ConfigError, MergeError, WeightsNotLoadedError
from .foreign import release_fusion
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


def require_loaded(layers: dict[str, AdaptedLayer], doing: str) -> None:
    """Refuse ``doing`` on layers with weights on the meta device: what it reads is not there. A forward is fine:
    accelerate's offloading hooks load each layer's weights for its own call only."""
    empty = [name for name, layer in layers.items() if any(t.is_meta for t in (*layer.parameters(), *layer.buffers()))]
    if empty:
        raise WeightsNotLoadedError(
            f"{len(empty)} adapted layers (first: {empty[0]!r}) hold weights on the meta device (offloaded by "
            f"accelerate's cpu_offload, enable_sequential_cpu_offload or a device_map, or never loaded), so {doing} "
            "cannot read them. Do it before offloading, or after accelerate.hooks.remove_hook_from_submodules(model) "
            "and loading the weights back.")


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


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
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
    _check_names(model, [name])
    return name


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold the active adapters into the base weights; the forward then costs what the base model costs.

    With ``name``, that adapter and the active ones below it are merged (those below must go first for the
    forward to stay the same); adapters above it stay unmerged.
    """
    if name is not None:
        _check_names(model, [name])
    layers = {n: layer for n, layer in adapted_layers(model) if name is None or name in layer.active}
    require_loaded(layers, "merge")
    _refuse_quantized(layers)
    for layer in layers.values():
        layer.merge(upto=name)
    return model


def _refuse_quantized(layers: dict[str, AdaptedLayer]) -> None:
    quantized = {n: layer.kind.quantized for n, layer in layers.items() if layer.kind.quantized}
    if quantized:
        first, kinds = next(iter(quantized)), sorted(set(quantized.values()))
        raise MergeError(
            f"{len(quantized)} adapted layers have quantized bases ({', '.join(kinds)}; first: {first!r}): "
            "merging would have to re-quantize the adapted weight and lose what the adapter learned below the "
            "quantization step. Keep the adapters unmerged, export them with psoft_vision.export_lora and load the "
            "LoRA onto the quantized base, or load the adapter file onto a floating copy of the base and merge there."
        )


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Bake the active adapters into the base weights and take every adapter out: each adapted layer becomes its
    original module again (``nn.Linear``, ``nn.Conv2d``, timm's or diffusers' own class) holding the merged weight,
    and every parameter gets back the requires_grad flag it had before the first inject. Returns ``model`` (or the
    wrapper it was passed in), now an ordinary model for ``save_pretrained`` / ``from_pretrained``,
    ``torch.export``, ``torch.jit.script`` and diffusers' ``fuse_qkv_projections``. Inactive adapters are dropped;
    nothing can be unmerged afterwards. Refused on quantized bases, as :func:`merge` is, before anything changes."""
    inner = unwrapped(model)
    layers = dict(adapted_layers(inner))
    require_loaded(layers, "merge_and_unload")
    _refuse_quantized(layers)
    for layer_name, layer in layers.items():
        layer.merge()
        inner.set_submodule(layer_name, layer.base)
    batching.refresh(inner)
    _undo_inject(inner)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Put every pretrained weight back, bit for bit; the adapters stay on and active."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


@contextmanager
def _unmerged(model: nn.Module):
    """Unmerge for the duration, then merge again as many adapters per layer as were merged."""
    merged = {name: len(layer.merged) for name, layer in adapted_layers(model)}
    unmerge(model)
    try:
        yield
    finally:
        for name, layer in adapted_layers(model):
            if merged.get(name) and layer.active:
                layer.merge(upto=layer.active[min(merged[name], len(layer.active)) - 1])


def set_strength(model: nn.Module, t: float, name: str | None = None) -> nn.Module:
    """Set the strength of adapter ``name`` (default: all): 0 is the base model exactly, 1 the trained adapter.

    Each method moves its parameters toward their identity values (PSOFT and OFT scale the generator Q, and PSOFT
    moves its scaling vectors toward 1), so in between every transform stays orthogonal. Values outside [0, 1]
    extrapolate. Merged layers are merged again at the new strength. Adapter files record the strength.
    """
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t):
        raise ConfigError(f"strength t={t!r} must be a finite number (0 = base model, 1 = trained adapter).")
    if not 0 <= t <= 1:
        warnings.warn(f"strength {t!r} is outside [0, 1]: it extrapolates the trained adapter (PSOFT's scaling "
                      "vectors may change sign, and far from 1 the outputs leave what training ever saw).",
                      stacklevel=2)
    if name is not None:
        _check_names(model, [name])
    with _unmerged(model):
        for _, layer in adapted_layers(model):
            for adapter_name, adapter in layer.adapters.items():
                if name is None or adapter_name == name:
                    adapter.strength = float(t)
    return model


def activate(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` the active adapters, applied in that order (first innermost), on every layer that has them."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    if len(set(names)) != len(names):
        raise AdapterNameError(f"adapter names {names} repeat; give each once.")
    for _, layer in adapted_layers(model):
        layer.unmerge()
        layer.active = [n for n in names if n in layer.adapters]
    return model


@contextmanager
def disabled(model: nn.Module):
    """Run the base model: every adapter is off inside the block and restored (merged state too) after it."""
    active = {name: list(layer.active) for name, layer in adapted_layers(model)}
    with _unmerged(model):
        for _, layer in adapted_layers(model):
            layer.active = []
        try:
            yield model
        finally:
            for name, layer in adapted_layers(model):
                layer.active = active.get(name, [])


def remove(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (default: all). A layer left without adapters becomes its original module again,
    with its original weight, bit for bit; once no adapter is left, every parameter gets back the requires_grad
    flag it had before the first inject."""
    if name is not None:
        _check_names(model, [name])
    for layer_name, layer in list(adapted_layers(model)):
        layer.unmerge()
        if name is not None and name in layer.adapters:
            del layer.adapters[name]
            layer.active = [n for n in layer.active if n != name]
        if name is None or not layer.adapters:
            model.set_submodule(layer_name, layer.base)
    batching.refresh(model)
    if not adapter_names(model):
        _undo_inject(model)
    return model


def _undo_inject(model: nn.Module) -> None:
    """Once the last adapter is gone, what inject set on the model as a whole: every parameter's requires_grad flag
    as it was before the first inject (kept under :data:`REQUIRES_GRAD`), diffusers' fusion allowed again, and no
    hooks that build adapters' transforms together."""
    release_fusion(model)
    batching.detach(model)
    flags = model.__dict__.pop(REQUIRES_GRAD, {})
    for param_name, p in model.named_parameters():
        p.requires_grad_(flags.get(param_name, p.requires_grad))
