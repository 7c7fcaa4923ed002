"""LoRA factors of an adapter: per layer, ``(up, down)`` whose product is its update, which every LoRA format
(:mod:`~psoft_vision.formats.peft_adapter`, :mod:`~psoft_vision.formats.diffusers_lora`,
:mod:`~psoft_vision.formats.kohya_lora`) writes; :func:`psoft_vision.export_lora` puts them together.

A PSOFT update ``B (C - I) A`` has rank ``k = chunks * rank`` (per layer: the rank may be clamped, and
``split_qkv`` triples it on a fused qkv), so it is exactly a LoRA with ``lora_B = B (C - I)`` (out, k),
``lora_A = A`` (k, in) and scaling 1. On a Conv2d ``lora_A`` is a conv with the layer's kernel, stride and
padding and ``lora_B`` a 1x1 conv, which is the layout PEFT and sd-scripts build for a Conv2d LoRA. Scaling 1
everywhere is written out explicitly: ``lora_alpha = r`` and, for every layer whose rank differs from the most
common one, a ``rank_pattern`` and an equal ``alpha_pattern`` entry anchored to that exact module name (kohya: an
``alpha`` equal to the rank, or none at all where the ranks differ, which kohya readers also take as scale 1).

An OFTv2 update ``W R - W`` is not low rank. ``full_deltas=True`` exports any adapter's exact update
``W' - W`` as a LoRA of rank ``min(out, in * kh * kw)`` with an identity on the smaller side: ``lora_B = I`` and
``lora_A = W' - W`` when the layer has no more outputs than inputs, else ``lora_B = W' - W`` and ``lora_A = I``
(for a Conv2d the identity ``lora_A`` is the patch-extraction kernel). No SVD is involved, so it is exact up to
fp32 rounding; it is as large as the layer's weight (or the larger of the two factors), so it is only worth it
for OFT. Every format supports it. (:func:`psoft_vision.export_oft` writes OFTv2 compactly, as PEFT's
own OFT adapter.)

An export holds one adapter's own update, relative to the pretrained weight, whatever else is on the model:
stacked adapters compose (``T_2(T_1(W))``), so a LoRA of one of them alone does not reproduce the stack, and
exporting warns when other adapters are active on the same layers. Merge state does not matter: the update is
computed from the adapter, not read from the weight. The adapter's strength (``set_strength``) is baked in.
"""

import torch
from torch import nn

from ..adapter import fp32
from ..errors import ConfigError, LoRAExportError, NotLowRankError
from ..layer import AdaptedLayer
from ..lifecycle import require_loaded
from ..model import adapted_layers, holding, one_adapter_name

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def floating_dtype(dtype) -> torch.dtype:
    """``dtype`` if it is a floating torch dtype: factors and rotations are real numbers, and an integer or
    complex file would either fail to load or silently round the update away."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype={dtype!r} is not a floating torch dtype; pass torch.float32 (exact), "
                          "torch.float16 or torch.bfloat16 (half the size, rounded).")
    return dtype


def _identity_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact ``up @ down.flatten(1) == delta.flatten(1)`` of rank ``min(out, in * kh * kw)``."""
    out, width = delta.shape[0], delta.flatten(1).shape[1]
    if out <= width:
        return torch.eye(out, device=delta.device), delta
    down = torch.eye(width, device=delta.device).reshape(width, *delta.shape[1:])
    return delta.flatten(1), down


def _full_delta(layer: AdaptedLayer, adapter: nn.Module) -> torch.Tensor:
    weight = layer.pretrained_weight.detach().float()
    return adapter.merge_into(weight).float() - weight


def lora_weights(model: nn.Module, name: str | None = None, full_deltas: bool = False
                 ) -> Factors:
    """``{layer name: (up, down)}`` in fp32 with ``up @ down.flatten(1)`` the update of adapter ``name``.

    up is (out, k); down is (k, in) for a Linear and (k, in, kh, kw) for a Conv2d. Raises
    :class:`NotLowRankError` for an adapter without a low-rank form unless ``full_deltas=True``, and
    :class:`LoRAExportError` for a dilated Conv2d (PEFT's conv LoRA has no dilation).
    """
    name = one_adapter_name(model, name)
    require_loaded(dict(adapted_layers(model)), "a LoRA export")
    factors = {}
    with torch.no_grad(), fp32(next(model.parameters()).device):  # the factors never depend on the caller's autocast
        for layer_name, layer, adapter in holding(model, name):
            if isinstance(layer.base, nn.Conv2d) and tuple(layer.base.dilation) != (1, 1):
                raise LoRAExportError(
                    f"{layer_name!r} is a Conv2d with dilation={tuple(layer.base.dilation)}; the LoRA layers PEFT and "
                    "diffusers build for a Conv2d have no dilation, so no LoRA file can reproduce it. Inject with "
                    "this layer in `exclude`, or share the psoft_vision adapter file (save_adapter) instead."
                )
            low_rank = None if full_deltas else adapter.lora_factors()
            if full_deltas:
                up, down = _identity_factors(_full_delta(layer, adapter))
            elif low_rank is not None:
                up, down = low_rank
            else:
                raise NotLowRankError(
                    f"adapter {name!r} is {adapter.method!r}: its update "
                    f"W R - W (on {layer_name!r} and every other layer) is not low rank, so no small LoRA holds it. "
                    "Pass full_deltas=True to export the exact update as a LoRA of rank min(out, in) per layer "
                    "(as large as the adapted weights), export_oft to write PEFT's own OFT adapter, or share the "
                    "psoft_vision adapter file (save_adapter)."
                )
            factors[layer_name] = (up.detach().float(), down.detach().float())
    return factors
