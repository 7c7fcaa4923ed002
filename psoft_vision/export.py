"""Export an adapter as a plain LoRA that diffusers' ``load_lora_weights``, PEFT's ``PeftModel`` or the kohya-ss
tools (sd-scripts, ComfyUI, A1111/Forge) load.

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
for OFT. Every format supports it. (:func:`psoft_vision.export_oft.export_oft` writes OFTv2 compactly, as PEFT's
own OFT adapter.)

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

from . import kohya
from .adapter import fp32
from .diffusers import denoiser
from .errors import AdapterNameError, ConfigError, LoRAExportError, NotLowRankError
from .files import atomic_folder, atomic_write, check_name, ordinary_permissions
from .layer import AdaptedLayer
from .lifecycle import adapted_layers, adapter_names, one_adapter_name, plainly_named_layers, require_loaded, unwrapped
from .targets import candidate_modules

FORMATS = ("diffusers", "peft", "kohya")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(dir) looks for by default
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


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


def lora_weights(model: nn.Module, name: str | None = None, full_deltas: bool = False
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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


def target_modules(targets: list[str], names: list[str]) -> list[str] | str:
    """PEFT's ``target_modules`` for exactly ``targets``: the list of names, or an anchored regex when one of them is
    a dotted suffix of another module's name (PEFT matches list entries as suffixes)."""
    targets = sorted(targets)
    if any(n not in targets and n.endswith(tuple("." + t for t in targets)) for n in names):
        return "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    return targets


def _lora_config(ranks: dict[str, int], names: list[str]) -> dict:
    """LoraConfig arguments that give every layer its own rank and scaling ``alpha / r == 1``.

    Pattern keys are anchored (``^``) and escaped: PEFT matches them as ``(.*\\.)?(key)$``, so a bare name would
    also catch the same name nested deeper.
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(n)}": k for n, k in ranks.items() if k != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": target_modules(list(ranks), names), "use_dora": False, "lora_bias": False}


def _state_dict(factors: dict, prefix: str, dtype: torch.dtype) -> tuple[dict, dict[str, int]]:
    tensors, ranks = {}, {}
    for layer_name, (up, down) in factors.items():
        if down.dim() == 4:  # Conv2d: lora_B is a 1x1 conv
            up = up[..., None, None]
        tensors[f"{prefix}{layer_name}.lora_A.weight"] = down.to("cpu", dtype).contiguous()
        tensors[f"{prefix}{layer_name}.lora_B.weight"] = up.to("cpu", dtype).contiguous()
        ranks[layer_name] = up.shape[1]
    return tensors, ranks


def _kohya_state_dict(factors: dict, dtype: torch.dtype) -> dict:
    """kohya tensors for ``{kohya module name: (up, down)}``.

    ``alpha`` (the scale is ``alpha / rank``) is written, equal to the rank, only when every module has the same
    rank. With mixed ranks it is left out, which sd-scripts, ComfyUI, Forge and diffusers all read as scale 1:
    diffusers' SD/SDXL converter keys the alpha of an attention projection by its old processor name
    (``...attn1.processor.to_q_lora.down.weight``), which matches no module, so an attention layer whose alpha
    differs from the file's most common one would get the wrong scale there. ``alpha`` is fp32, where every rank
    is exact (bf16 would round a rank such as 257).
    """
    tensors, ranks = {}, set()
    for module, pair in factors.items():
        up, down = pair
        if down.dim() == 4:
            up = up[..., None, None]
        tensors[f"{module}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
        tensors[f"{module}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
        ranks.add(up.shape[1])
    if len(ranks) == 1:
        tensors.update({f"{module}.alpha": torch.tensor(float(*ranks)) for module in factors})
    return tensors


def _resolve(model, prefix: str | None) -> tuple[nn.Module, str]:
    """The module and its diffusers prefix: a pipeline's denoiser, or the module with the pipeline attribute it
    most likely is."""
    if not isinstance(model, nn.Module):
        model, attribute = denoiser(model)
        return model, prefix or attribute
    model = unwrapped(model)
    if prefix:
        return model, prefix
    if kohya.is_clip_text(model):
        return model, "text_encoder"
    return model, "unet" if "UNet" in type(model).__name__ else "transformer"


def _pipeline_parts(pipe, name: str | None) -> tuple[list[tuple[nn.Module, str]], str]:
    """The pipeline's denoiser and text encoders that hold adapter ``name`` (its only adapter when None), with
    their attribute names."""
    module, attribute = denoiser(pipe)
    parts = [(module, attribute)] + [(unwrapped(getattr(pipe, a)), a) for a in TEXT_ENCODERS
                                     if isinstance(getattr(pipe, a, None), nn.Module)]
    names = list(dict.fromkeys(n for part, _ in parts for n in adapter_names(part)))
    if not names:
        raise AdapterNameError(f"{type(pipe).__name__} has no adapters on its denoiser or text encoders; inject (or "
                               "load) one first.")
    if name is None and len(names) > 1:
        raise AdapterNameError(f"the pipeline has adapters {names}; pass name= to choose one.")
    if name is not None and name not in names:
        raise AdapterNameError(f"no adapter named {name!r} on the pipeline; it has {names}.")
    name = name or names[0]
    return [(part, a) for part, a in parts if name in adapter_names(part)], name


def _parts(model, format: str, prefix: str | None, name: str | None) -> tuple[list[tuple[nn.Module, str]], str]:
    """``([(module, key prefix)], adapter name)``: a module is one part; a pipeline gives every component that
    holds the adapter, each under its own prefix."""
    if isinstance(model, nn.Module):
        model = unwrapped(model)
        if format == "kohya":
            return [(model, prefix or kohya.default_prefix(model))], one_adapter_name(model, name)
        return [_resolve(model, prefix)], one_adapter_name(model, name)
    if prefix is not None:
        raise ConfigError("prefix names the role of a single module; a pipeline's components each get their own "
                          "(unet / transformer / text_encoder / text_encoder_2). Pass the module itself to choose.")
    parts, name = _pipeline_parts(model, name)
    if format == "kohya":
        return [(part, kohya.prefix_for(a, model)) for part, a in parts], name
    return parts, name


def train_modules_of(model: nn.Module, name: str) -> list[str]:
    """The ``train_modules`` of adapter ``name``'s config (they travel beside the adapter, not in it)."""
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            return list(layer.adapters[name].config.train_modules)
    return []


def _file_path(path: Path) -> Path:
    """A ``.safetensors`` path as is; any other path is a directory that receives the name diffusers looks for."""
    check_name(path, "file or folder")
    return path if path.suffix == ".safetensors" else path / DIFFUSERS_WEIGHT_NAME


def modules_to_save(model: nn.Module, train_modules: list[str]) -> dict[str, torch.Tensor]:
    """The weights of ``train_modules`` under the keys PEFT's ``modules_to_save`` reads back; refuses a name that
    is also the end of another module's, which PEFT's suffix match would wrap too."""
    names = [n for n, _ in candidate_modules(model)]
    tensors = {}
    for module_name in train_modules:
        clashes = [n for n in names if n != module_name and n.endswith(module_name)]
        if clashes:
            raise LoRAExportError(
                f"train_modules entry {module_name!r} is also the end of {clashes[:3]}: PEFT's modules_to_save "
                "matches plain suffixes and would wrap those too. Rename or export without train_modules."
            )
        for key, p in model.get_submodule(module_name).named_parameters():
            tensors[f"base_model.model.{module_name}.{key}"] = p.detach().to("cpu").contiguous()
    return tensors


def _export_file(parts: list, format: str, name: str, full_deltas: bool, dtype: torch.dtype, path: Path) -> Path:
    """One ``.safetensors`` holding every part: diffusers keys with LoraConfig metadata, or kohya keys."""
    tensors, config, named, layers = {}, {}, {}, 0
    for module, prefix in parts:
        train_modules = train_modules_of(module, name)
        if train_modules:
            warnings.warn(f"the weights of train_modules {train_modules} are not in the {format} LoRA file (it holds "
                          "LoRA factors only); ship them separately.", stacklevel=3)
        factors = lora_weights(module, name, full_deltas)
        layers += len(factors)
        if format == "kohya":
            named.update(kohya.module_factors(module, prefix, factors))
            continue
        part, ranks = _state_dict(factors, f"{prefix}.", dtype)
        tensors.update(part)
        names = [n for n, _ in candidate_modules(module)]
        config.update({f"{prefix}.{k}": v for k, v in _lora_config(ranks, names).items()})
    if format == "kohya":
        tensors = _kohya_state_dict(named, dtype)
    info = {"adapter": name, "full_deltas": full_deltas, "layers": layers}
    metadata = {"format": "pt", "psoft_vision_export": json.dumps(info)}
    if format == "diffusers":
        metadata["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
    path = _file_path(path)
    atomic_write(path, lambda f: save_file(tensors, f, metadata=metadata))
    return path


def _export_peft(model, name: str | None, full_deltas: bool, dtype: torch.dtype, path: Path) -> Path:
    if not isinstance(model, nn.Module):
        _warn_text_encoders_left_out(model)
    model, _ = _resolve(model, None)
    name = one_adapter_name(model, name)
    if path.suffix == ".safetensors":
        raise ConfigError(f"format='peft' writes a directory (adapter_config.json and {PEFT_WEIGHT_NAME}); "
                          f"got the file name {str(path)!r}: pass a directory path.")
    factors = lora_weights(model, name, full_deltas)
    train_modules = train_modules_of(model, name)
    tensors, ranks = _state_dict(factors, "base_model.model.", dtype)
    tensors.update(modules_to_save(model, train_modules))
    config = {**peft_config("LORA", train_modules), "lora_dropout": 0.0, "init_lora_weights": True,
              "use_rslora": False, **_lora_config(ranks, [n for n, _ in candidate_modules(model)])}
    info = {"adapter": name, "full_deltas": full_deltas, "layers": len(factors)}
    write_peft_directory(path, tensors, config, info)
    return path


def _warn_text_encoders_left_out(pipe) -> None:
    left = [a for a in TEXT_ENCODERS
            if isinstance(getattr(pipe, a, None), nn.Module) and adapter_names(getattr(pipe, a))]
    if left:
        warnings.warn(f"format='peft' holds one model, the pipeline's denoiser; the adapters on {left} are not in it. "
                      "Export each text encoder to its own directory (export_lora(pipe.text_encoder, ...)), or use "
                      "format='diffusers' or 'kohya', whose one file holds them all.", stacklevel=4)


def peft_config(peft_type: str, train_modules: list[str]) -> dict:
    """The PeftConfig entries every exported adapter shares: inference mode, no bias, no base model id."""
    return {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "bias": "none", "fan_in_fan_out": False, "modules_to_save": train_modules or None}


def write_peft_directory(path: Path, tensors: dict, config: dict, info: dict) -> None:
    """``adapter_model.safetensors`` and ``adapter_config.json`` in the folder ``path``, swapped in as a whole
    (:func:`psoft_vision.files.atomic_folder`): a kill never leaves new weights beside an old config."""
    metadata = {"format": "pt", "psoft_vision_export": json.dumps(info)}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        save_file(tensors, folder / PEFT_WEIGHT_NAME, metadata=metadata)
        (folder / PEFT_CONFIG_NAME).write_text(text)
        for name in (PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME):
            ordinary_permissions(folder / name)

    atomic_folder(path, write)


def export_lora(model, path: str | os.PathLike, format: str = "diffusers", name: str | None = None,
                full_deltas: bool = False, *, prefix: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write adapter ``name`` (optional when the model has one) as a LoRA; returns what a loader takes: the
    ``.safetensors`` file (diffusers, kohya) or the directory (peft).

    ``model`` is a module (a denoiser, a text encoder, a timm model) or a diffusers pipeline. For the file
    formats a pipeline's denoiser and text encoders that hold the adapter all go into the one file, each under its
    own prefix; ``format="peft"`` takes the pipeline's denoiser only.

    ``format="diffusers"``: one ``.safetensors`` with keys ``<prefix>.<module>.lora_A.weight`` /
    ``lora_B.weight`` and the LoraConfig arguments in the ``lora_adapter_metadata`` entry, for
    ``pipe.load_lora_weights(directory, weight_name=file)``. For a module, ``prefix`` is the pipeline attribute
    it stands for and defaults to ``"unet"`` for a UNet, ``"text_encoder"`` for a CLIP text encoder (pass
    ``"text_encoder_2"`` for SDXL's second one) and ``"transformer"`` otherwise.

    ``format="kohya"``: one ``.safetensors`` in the kohya-ss layout (``lora_unet_...`` / ``lora_te_...`` keys with
    ``lora_down``, ``lora_up`` and ``alpha``; see :mod:`psoft_vision.kohya` for the names of each model family) for
    ComfyUI, A1111/Forge, sd-scripts and ``pipe.load_lora_weights``. For a module, ``prefix`` is the kohya prefix
    (``"lora_unet"``, ``"lora_te"``, ``"lora_te1"``, ``"lora_te2"``); it defaults to ``"lora_te"`` for a CLIP text
    encoder and ``"lora_unet"`` otherwise.

    A file ``path`` that does not end in ``.safetensors`` is a directory that receives
    ``pytorch_lora_weights.safetensors``, the name ``load_lora_weights(directory)`` looks for.

    ``format="peft"``: ``path`` is a directory that receives ``adapter_config.json`` and
    ``adapter_model.safetensors``, for ``peft.PeftModel.from_pretrained(base_model, path)``; the weights of the
    config's ``train_modules`` go in as ``modules_to_save``. (The file formats cannot carry them: they are left
    out with a warning.)

    ``full_deltas=True`` writes each layer's exact full update (see the module docstring); required for OFT.
    ``dtype`` is the floating dtype of the stored factors (fp32 keeps the export exact).
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of {FORMATS}.")
    dtype = floating_dtype(dtype)
    path = Path(path)
    if format == "peft":
        return _export_peft(model, name, full_deltas, dtype, path)
    parts, name = _parts(model, format, prefix, name)
    with torch.no_grad():
        return _export_file(parts, format, name, full_deltas, dtype, path)
