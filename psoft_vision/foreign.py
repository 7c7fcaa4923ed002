"""Layers that other code owns or rewrites, which adapters must not silently fight with.

- PEFT's LoRA layers (``pipe.load_lora_weights``, ``peft.get_peft_model``): a PEFT layer wraps the original layer
  (``base_layer``) beside its own ``lora_A`` / ``lora_B``, which are plain ``nn.Linear`` too. Adapting any of them
  would rotate PEFT's factors or hide the base from PEFT's ``fuse_lora`` / ``merge_and_unload``, which then lose
  the LoRA. :func:`refuse_targets` refuses them by name: fold the LoRA in first (or unload it), then inject.
- diffusers' fused projections (``fuse_qkv_projections``): an attention whose processor runs one ``to_qkv`` (or
  ``to_kv``) made from a copy of ``to_q`` / ``to_k`` / ``to_v`` never calls those. Adapters on them would be
  bypassed, and fusing after inject copies the adapted weights of that moment, which ``disabled``, ``set_strength``
  and later training then no longer reach. :func:`refuse_targets` refuses inject (and ``load_adapter``) inside a
  fused attention, and :func:`guard_fusion` makes ``fuse_projections`` refuse on a model that has adapters, until
  :func:`release_fusion` (the last adapter removed, or ``merge_and_unload``: fuse the plain model then).
"""

import sys
from functools import partial

from torch import nn

from .errors import UnsupportedLayerError

#: The attribute diffusers' attention modules fuse their projections with (``model.fuse_qkv_projections()`` calls
#: it on each of them).
FUSE = "fuse_projections"


def _peft_layers(model: nn.Module) -> dict[str, nn.Module]:
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # no PEFT layer exists unless peft was imported
    if tuners is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, tuners.BaseTunerLayer)}


def _fused(module: nn.Module) -> bool:
    """Whether the attention ``module`` runs fused projections now. diffusers' classic ``Attention`` keeps
    ``to_qkv`` and ``fused_projections`` after ``unfuse_qkv_projections``, which only swaps the processor back, so
    there the processor decides; the newer attention classes read ``fused_projections``."""
    if not getattr(module, "fused_projections", False):
        return False
    processors = sys.modules.get("diffusers.models.attention_processor")
    if processors is not None and isinstance(module, processors.Attention):
        return "Fused" in type(getattr(module, "processor", None)).__name__
    return True


def _inside(name: str, owners: list[str]) -> str | None:
    return next((o for o in owners if name == o or name.startswith(o + ".") or not o), None)


def refuse_targets(model: nn.Module, names: list[str]) -> None:
    """An :class:`UnsupportedLayerError` naming the first targets that are PEFT's layers or lie in a fused
    attention (see the module docstring); nothing when there are none."""
    peft = list(_peft_layers(model))
    inside = [(n, owner) for n in names if (owner := _inside(n, peft)) is not None]
    if inside:
        shown = ", ".join(f"{n!r} (in PEFT's {type(model.get_submodule(o)).__name__} {o!r})" for n, o in inside[:3])
        raise UnsupportedLayerError(
            f"{len(inside)} targets are PEFT LoRA layers or lie inside them ({shown}): adapting them would change "
            "PEFT's own factors or hide the base layer from fuse_lora / merge_and_unload, which would then lose the "
            "LoRA. Fold the LoRA into the weights first (diffusers: pipe.fuse_lora() then pipe.unload_lora_weights(); "
            "PEFT: model = model.merge_and_unload()), or unload it, then inject.")
    fused = [n for n, m in model.named_modules() if _fused(m)]
    inside = [(n, owner) for n in names if (owner := _inside(n, fused)) is not None]
    if inside:
        raise UnsupportedLayerError(
            f"{len(inside)} targets lie in attentions whose q/k/v projections are fused (first: {inside[0][0]!r} in "
            f"{inside[0][1]!r}): the fused to_qkv runs instead of them, so adapters there would be bypassed. Call "
            "model.unfuse_qkv_projections() (or pipe.unfuse_qkv_projections()) before inject or load_adapter; fuse "
            "again after psoft_vision.merge_and_unload, on the plain model.")


def _refuse_fusion(name: str, *args, **kwargs):
    raise UnsupportedLayerError(
        f"{name!r} holds psoft_vision adapters: a fused to_qkv would copy the adapted weights of this moment and run "
        "instead of the adapted q/k/v, so disabled(), set_strength() and further training would no longer reach "
        "them. Fuse after psoft_vision.merge_and_unload(model) (the plain model with the adapters baked in), or "
        "after removing the adapters.")


def guard_fusion(model: nn.Module) -> None:
    """Make every attention of ``model`` that can fuse its projections refuse to, by name (all of them, so that
    ``fuse_qkv_projections`` stops at the first before fusing any)."""
    for name, module in model.named_modules():
        if callable(getattr(type(module), FUSE, None)) and FUSE not in module.__dict__:
            module.__dict__[FUSE] = partial(_refuse_fusion, name)


def release_fusion(model: nn.Module) -> None:
    """Undo :func:`guard_fusion`: the class's own ``fuse_projections`` shows again."""
    for module in model.modules():
        module.__dict__.pop(FUSE, None)
