"""The adapter lifecycle on a whole model: merge, strength, disable, choose active adapters, remove.

The queries (adapted_layers, plainly_named_layers, adapter_names, one_adapter_name, unwrapped) live in
:mod:`psoft_vision.model`; they are importable from here too, as they were before."""

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

from torch import nn

from . import batching
from .errors import AdapterNameError, ConfigError, MergeError, WeightsNotLoadedError
from .foreign import release_fusion
from .layer import AdaptedLayer
from .model import (  # noqa: F401  (adapted_layers, one_adapter_name, plainly_named_layers, unwrapped: re-exported)
    REQUIRES_GRAD,
    adapted_layers,
    adapter_names,
    check_names,
    one_adapter_name,
    plainly_named_layers,
    unwrapped,
)


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


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold the active adapters into the base weights; the forward then costs what the base model costs.

    With ``name``, that adapter and the active ones below it are merged (those below must go first for the
    forward to stay the same); adapters above it stay unmerged.
    """
    if name is not None:
        check_names(model, [name])
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
def unmerged(model: nn.Module):
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
        check_names(model, [name])
    with unmerged(model):
        for _, layer in adapted_layers(model):
            for adapter_name, adapter in layer.adapters.items():
                if name is None or adapter_name == name:
                    adapter.strength = float(t)
    return model


def activate(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make ``names`` the active adapters, applied in that order (first innermost), on every layer that has them."""
    names = [names] if isinstance(names, str) else list(names)
    check_names(model, names)
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
    with unmerged(model):
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
        check_names(model, [name])
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
