"""``export_lora``: an adapter as a plain LoRA that diffusers' ``load_lora_weights``, PEFT's ``PeftModel`` or the
kohya-ss tools (sd-scripts, ComfyUI, A1111/Forge) load. It takes a module or a pipeline, chooses the parts to export
and their prefixes, and hands the LoRA factors (:mod:`psoft_vision.formats.lora_factors`, which says how each
method's update becomes one) to the format's writer in :mod:`psoft_vision.formats`.
"""

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import model as queries  # (qualified: the names export.py held before they moved warn from here)
from .errors import AdapterNameError, ConfigError
from .files import check_name
from .formats import diffusers_lora, kohya_lora, lora_factors, names, peft_adapter
from .model import adapter_names, one_adapter_name, unwrapped

FORMATS = ("diffusers", "peft", "kohya")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _resolve(model, prefix: str | None) -> tuple[nn.Module, str]:
    """The module and its diffusers prefix: a pipeline's denoiser, or the module with the pipeline attribute it
    most likely is."""
    if not isinstance(model, nn.Module):
        model, attribute = queries.denoiser(model)
        return model, prefix or attribute
    model = unwrapped(model)
    if prefix:
        return model, prefix
    if kohya_lora.is_clip_text(model):
        return model, "text_encoder"
    return model, "unet" if "UNet" in type(model).__name__ else "transformer"


def _pipeline_parts(pipe, name: str | None) -> tuple[list[tuple[nn.Module, str]], str]:
    """The pipeline's denoiser and text encoders that hold adapter ``name`` (its only adapter when None), with
    their attribute names."""
    module, attribute = queries.denoiser(pipe)
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
            return [(model, prefix or kohya_lora.default_prefix(model))], one_adapter_name(model, name)
        return [_resolve(model, prefix)], one_adapter_name(model, name)
    if prefix is not None:
        raise ConfigError("prefix names the role of a single module; a pipeline's components each get their own "
                          "(unet / transformer / text_encoder / text_encoder_2). Pass the module itself to choose.")
    parts, name = _pipeline_parts(model, name)
    if format == "kohya":
        return [(part, kohya_lora.prefix_for(a, model)) for part, a in parts], name
    return parts, name


def _file_path(path: Path) -> Path:
    """A ``.safetensors`` path as is; any other path is a directory that receives the name diffusers looks for."""
    check_name(path, "file or folder")
    return path if path.suffix == ".safetensors" else path / names.DIFFUSERS_WEIGHT_NAME


def _export_file(parts: list, format: str, name: str, full_deltas: bool, dtype: torch.dtype, path: Path) -> Path:
    """One ``.safetensors`` holding every part: diffusers keys with LoraConfig metadata, or kohya keys."""
    factored, named, layers = [], {}, 0
    for module, prefix in parts:
        train_modules = queries.train_modules_of(module, name)
        if train_modules:
            warnings.warn(f"the weights of train_modules {train_modules} are not in the {format} LoRA file (it holds "
                          "LoRA factors only); ship them separately.", stacklevel=3)
        factors = lora_factors.lora_weights(module, name, full_deltas)
        layers += len(factors)
        if format == "kohya":
            named.update(kohya_lora.module_factors(module, prefix, factors))
        else:
            factored.append((module, prefix, factors))
    info = {"adapter": name, "full_deltas": full_deltas, "layers": layers}
    if format == "kohya":
        return kohya_lora.write_lora(_file_path(path), named, dtype, info)
    return diffusers_lora.write_lora(_file_path(path), factored, dtype, info)


def _export_peft(model, name: str | None, full_deltas: bool, dtype: torch.dtype, path: Path) -> Path:
    if not isinstance(model, nn.Module):
        _warn_text_encoders_left_out(model)
    model, _ = _resolve(model, None)
    name = one_adapter_name(model, name)
    if path.suffix == ".safetensors":
        raise ConfigError(f"format='peft' writes a directory ({names.PEFT_CONFIG_NAME} and {names.PEFT_WEIGHT_NAME}); "
                          f"got the file name {str(path)!r}: pass a directory path.")
    return peft_adapter.write_lora(model, name, full_deltas, dtype, path)


def _warn_text_encoders_left_out(pipe) -> None:
    left = [a for a in TEXT_ENCODERS
            if isinstance(getattr(pipe, a, None), nn.Module) and adapter_names(getattr(pipe, a))]
    if left:
        warnings.warn(f"format='peft' holds one model, the pipeline's denoiser; the adapters on {left} are not in it. "
                      "Export each text encoder to its own directory (export_lora(pipe.text_encoder, ...)), or use "
                      "format='diffusers' or 'kohya', whose one file holds them all.", stacklevel=4)


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
    ``lora_down``, ``lora_up`` and ``alpha``; see :mod:`psoft_vision.formats.kohya_lora` for the names of each model
    family) for ComfyUI, A1111/Forge, sd-scripts and ``pipe.load_lora_weights``. For a module, ``prefix`` is the
    kohya prefix (``"lora_unet"``, ``"lora_te"``, ``"lora_te1"``, ``"lora_te2"``); it defaults to ``"lora_te"`` for
    a CLIP text encoder and ``"lora_unet"`` otherwise.

    A file ``path`` that does not end in ``.safetensors`` is a directory that receives
    ``pytorch_lora_weights.safetensors``, the name ``load_lora_weights(directory)`` looks for.

    ``format="peft"``: ``path`` is a directory that receives ``adapter_config.json`` and
    ``adapter_model.safetensors``, for ``peft.PeftModel.from_pretrained(base_model, path)``; the weights of the
    config's ``train_modules`` go in as ``modules_to_save``. (The file formats cannot carry them: they are left
    out with a warning.)

    ``full_deltas=True`` writes each layer's exact full update (see :mod:`psoft_vision.formats.lora_factors`);
    required for OFT.
    ``dtype`` is the floating dtype of the stored factors (fp32 keeps the export exact).
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of {FORMATS}.")
    dtype = lora_factors.floating_dtype(dtype)
    path = Path(path)
    if format == "peft":
        return _export_peft(model, name, full_deltas, dtype, path)
    parts, name = _parts(model, format, prefix, name)
    with torch.no_grad():
        return _export_file(parts, format, name, full_deltas, dtype, path)


def __getattr__(name: str):
    """The names that moved to :mod:`psoft_vision.formats` and :mod:`psoft_vision.model` (the PEFT helpers:
    :mod:`~psoft_vision.formats.peft_adapter`), with a DeprecationWarning."""
    from .moved import moved_name

    places = {"holding": "model", "train_modules_of": "model", "denoiser": "model",
              "floating_dtype": "formats.lora_factors", "lora_weights": "formats.lora_factors",
              **dict.fromkeys(("DIFFUSERS_WEIGHT_NAME", "PEFT_WEIGHT_NAME", "PEFT_CONFIG_NAME"), "formats.names")}
    return moved_name(__name__, name, "formats.peft_adapter", places)
