"""Export an adapter as a plain LoRA that diffusers' ``load_lora_weights`` or PEFT's ``PeftModel`` loads.

A PSOFT update ``B (C - I) A`` has rank ``k = chunks * rank`` (per layer: the rank may be clamped, and
``split_qkv`` triples it on a fused qkv), so it is exactly a LoRA with ``lora_B = B (C - I)`` (out, k),
``lora_A = A`` (k, in) and scaling 1. On a Conv2d ``lora_A`` is a conv with the layer's kernel, stride and
padding and ``lora_B`` a 1x1 conv, which is the layout PEFT builds for a Conv2d LoRA. Scaling 1 everywhere is
written out explicitly: ``lora_alpha = r`` and, for every layer whose rank differs from the most common one, a
``rank_pattern`` and an equal ``alpha_pattern`` entry anchored to that exact module name.

An OFTv2 update ``W R - W`` is not low rank. ``full_deltas=True`` exports any adapter's exact update
``W' - W`` as a LoRA of rank ``min(out, in * kh * kw)`` with an identity on the smaller side: ``lora_B = I`` and
``lora_A = W' - W`` when the layer has no more outputs than inputs, else ``lora_B = W' - W`` and ``lora_A = I``
(for a Conv2d the identity ``lora_A`` is the patch-extraction kernel). No SVD is involved, so it is exact up to
fp32 rounding; it is as large as the layer's weight (or the larger of the two factors), so it is only worth it
for OFT. Both formats support it.

An export holds one adapter's own update, relative to the pretrained weight, whatever else is on the model:
stacked adapters compose (``T_2(T_1(W))``), so a LoRA of one of them alone does not reproduce the stack, and
exporting warns when other adapters are active on the same layers. Merge state does not matter: the update is
computed from the adapter, not read from the weight. The adapter's strength (``set_strength``) is baked in.
"""

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .diffusers import denoiser
from .errors import ConfigError, LoRAExportError, NotLowRankError
from .files import atomic_write
from .layer import AdaptedLayer
from .lifecycle import adapted_layers, one_adapter_name
from .targets import candidate_modules

FORMATS = ("diffusers", "peft")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(dir) looks for by default
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"


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
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (up, down)}`` in fp32 with ``up @ down.flatten(1)`` the update of adapter ``name``.

    up is (out, k); down is (k, in) for a Linear and (k, in, kh, kw) for a Conv2d. Raises
    :class:`NotLowRankError` for an adapter without a low-rank form unless ``full_deltas=True``, and
    :class:`LoRAExportError` for a dilated Conv2d (PEFT's conv LoRA has no dilation).
    """
    name = one_adapter_name(model, name)
    factors, stacked, inactive = {}, [], []
    with torch.no_grad():
        for layer_name, layer in adapted_layers(model):
            if name not in layer.adapters:
                continue
            adapter = layer.adapters[name]
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
                    "(as large as the adapted weights), or share the psoft_vision adapter file (save_adapter)."
                )
            factors[layer_name] = (up.detach().float(), down.detach().float())
            if name not in layer.active:
                inactive.append(layer_name)
            elif [n for n in layer.active if n != name]:
                stacked.append(layer_name)
    if stacked:
        warnings.warn(
            f"{len(stacked)} layers (first: {stacked[0]!r}) also have other active adapters; stacked adapters "
            f"compose, and this LoRA holds only adapter {name!r}'s own update, so it alone does not reproduce the "
            "stacked model.", stacklevel=3,
        )
    if inactive:
        warnings.warn(
            f"adapter {name!r} is not active on {len(inactive)} layers (first: {inactive[0]!r}); its update is "
            "exported anyway.", stacklevel=3,
        )
    return factors


def _lora_config(ranks: dict[str, int], names: list[str]) -> dict:
    """LoraConfig arguments that give every layer its own rank and scaling ``alpha / r == 1``.

    Pattern keys are anchored (``^``) and escaped: PEFT matches them as ``(.*\\.)?(key)$``, so a bare name would
    also catch the same name nested deeper. ``target_modules`` is the exact list of names, or an anchored regex
    when one of them is a dotted suffix of another module's name (PEFT matches list entries as suffixes).
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(n)}": k for n, k in ranks.items() if k != r}
    targets = sorted(ranks)
    if any(n not in ranks and n.endswith(tuple("." + t for t in targets)) for n in names):
        targets = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": targets, "use_dora": False, "lora_bias": False}


def _state_dict(factors: dict, prefix: str, dtype: torch.dtype) -> tuple[dict, dict[str, int]]:
    tensors, ranks = {}, {}
    for layer_name, (up, down) in factors.items():
        if down.dim() == 4:  # Conv2d: lora_B is a 1x1 conv
            up = up[..., None, None]
        tensors[f"{prefix}{layer_name}.lora_A.weight"] = down.to("cpu", dtype).contiguous()
        tensors[f"{prefix}{layer_name}.lora_B.weight"] = up.to("cpu", dtype).contiguous()
        ranks[layer_name] = up.shape[1]
    return tensors, ranks


def _resolve(model, prefix: str | None) -> tuple[nn.Module, str]:
    """The denoiser and its diffusers prefix, for a model or a pipeline."""
    if not isinstance(model, nn.Module):
        model, attribute = denoiser(model)
        return model, prefix or attribute
    return model, prefix or ("unet" if "UNet" in type(model).__name__ else "transformer")


def _train_modules(model: nn.Module, name: str) -> list[str]:
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            return list(layer.adapters[name].config.train_modules)
    return []


def export_lora(model, path: str | os.PathLike, format: str = "diffusers", name: str | None = None,
                full_deltas: bool = False, *, prefix: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write adapter ``name`` (optional when the model has one) as a LoRA; returns what a loader takes: the
    ``.safetensors`` file (diffusers) or the directory (peft).

    ``format="diffusers"``: one ``.safetensors`` with keys ``<prefix>.<module>.lora_A.weight`` /
    ``lora_B.weight`` and the LoraConfig arguments in the ``lora_adapter_metadata`` entry, for
    ``pipe.load_lora_weights(directory, weight_name=file)``. ``model`` is the pipeline's ``unet`` or
    ``transformer`` (or the pipeline itself); ``prefix`` defaults to ``"unet"`` for a UNet and ``"transformer"``
    otherwise. A ``path`` that does not end in ``.safetensors`` is a directory that receives
    ``pytorch_lora_weights.safetensors``, the name ``load_lora_weights(directory)`` looks for.

    ``format="peft"``: ``path`` is a directory that receives ``adapter_config.json`` and
    ``adapter_model.safetensors``, for ``peft.PeftModel.from_pretrained(base_model, path)``; the weights of the
    config's ``train_modules`` go in as ``modules_to_save``. (diffusers LoRA files cannot carry them: they are
    left out with a warning.)

    ``full_deltas=True`` writes each layer's exact full update (see the module docstring); required for OFT.
    ``dtype`` is the dtype of the stored factors (fp32 keeps the export exact).
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of {FORMATS}.")
    model, prefix = _resolve(model, prefix)
    name = one_adapter_name(model, name)
    factors = lora_weights(model, name, full_deltas)
    module_names = [n for n, _ in candidate_modules(model)]
    train_modules = _train_modules(model, name)
    path = Path(path)
    info = {"adapter": name, "full_deltas": full_deltas, "layers": len(factors)}
    with torch.no_grad():
        if format == "diffusers":
            if train_modules:
                warnings.warn(f"the weights of train_modules {train_modules} are not in the diffusers LoRA file "
                              "(it holds LoRA factors only); ship them separately.", stacklevel=2)
            tensors, ranks = _state_dict(factors, f"{prefix}.", dtype)
            config = {f"{prefix}.{k}": v for k, v in _lora_config(ranks, module_names).items()}
            if path.suffix != ".safetensors":
                path = path / DIFFUSERS_WEIGHT_NAME
            path.parent.mkdir(parents=True, exist_ok=True)
            metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True),
                        "psoft_vision_export": json.dumps(info)}
            atomic_write(path, lambda f: save_file(tensors, f, metadata=metadata))
            return path

        if path.suffix == ".safetensors":
            raise ConfigError(f"format='peft' writes a directory (adapter_config.json and {PEFT_WEIGHT_NAME}); "
                              f"got the file name {str(path)!r}: pass a directory path.")
        tensors, ranks = _state_dict(factors, "base_model.model.", dtype)
        for module_name in train_modules:
            clashes = [n for n in module_names if n != module_name and n.endswith(module_name)]
            if clashes:
                raise LoRAExportError(
                    f"train_modules entry {module_name!r} is also the end of {clashes[:3]}: PEFT's modules_to_save "
                    "matches plain suffixes and would wrap those too. Rename or export without train_modules."
                )
            for key, p in model.get_submodule(module_name).named_parameters():
                tensors[f"base_model.model.{module_name}.{key}"] = p.detach().to("cpu").contiguous()
        config = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "inference_mode": True,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "modules_to_save": train_modules or None,
            **_lora_config(ranks, module_names),
        }
        path.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "pt", "psoft_vision_export": json.dumps(info)}
        atomic_write(path / PEFT_WEIGHT_NAME, lambda f: save_file(tensors, f, metadata=metadata))
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        atomic_write(path / PEFT_CONFIG_NAME, lambda f: f.write_text(text))
        return path
