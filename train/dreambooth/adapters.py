"""Adapters of a DreamBooth run: which models get them (the denoiser, and with --train_text_encoder the text encoders
the family's LoRA loader reads back), on which layers and at which sizes, and the files a finished run writes.

Files: ``adapter.safetensors`` (the denoiser's, our format) and ``adapter_<text encoder>.safetensors`` for each
trained text encoder; ``lora/pytorch_lora_weights.safetensors``, one diffusers LoRA file with every trained model
under its pipeline prefix (``unet.`` / ``transformer.``, ``text_encoder.``, ``text_encoder_2.``), for
``pipe.load_lora_weights``; and ``lora/kohya.safetensors`` where psoft_vision writes the family's kohya layout
(SD 1.x/2.x, SDXL, Flux), else metrics.json says why not.
"""

from pathlib import Path

import psoft_vision as pv
from psoft_vision.formats.names import DIFFUSERS_WEIGHT_NAME
from psoft_vision.model import denoiser as find_denoiser
from psoft_vision.targets import select
from psoft_vision.targets.structure import is_diffusers_model

from ..common.methods import build_config, registered, size_pattern_fields
from .errors import DreamBoothError
from .ranks import layer_sizes, only_layers, parse_pattern

TEXT_ENCODER_TARGETS = "transformers"  # the preset of psoft_vision/targets for a transformers text encoder
LORA_FILE = DIFFUSERS_WEIGHT_NAME
KOHYA_FILE = "kohya.safetensors"


def trained_models(pipe, family, args) -> dict:
    """``{pipeline attribute: model}``: the denoiser first, then the text encoders --train_text_encoder adapts."""
    model, attribute = find_denoiser(pipe)
    models = {attribute: model}
    if not args.train_text_encoder:
        return models
    if not family.text_encoders:
        raise DreamBoothError(f"--train_text_encoder: {family.name} has no text encoder whose LoRA diffusers' "
                              "load_lora_weights reads back (Sana's Gemma); leave the flag out.")
    models.update({name: getattr(pipe, name) for name in family.text_encoders if getattr(pipe, name, None) is not None})
    return models


def targets_for(role: str, model, args) -> str | list[str]:
    """The layers a model's adapters go on: the denoiser's --targets preset (only its --lora_layers, when given), a
    text encoder's preset."""
    if role not in ("unet", "transformer"):
        return TEXT_ENCODER_TARGETS
    if not args.lora_layers:
        return args.targets
    return only_layers(model, select(model, args.targets), args.lora_layers, "--lora_layers")


def _sizes(models: dict, args) -> tuple[str | None, dict[str, dict[str, int]]]:
    """The pattern flag of the method (its declared size-pattern field; LoRA's rank_pattern) and its size per layer of
    each model. Another method's pattern flag is refused."""
    method = registered(args.method)
    flag = method.size_pattern_field if method else "rank_pattern"
    other = next((f for f in ("rank_pattern", *size_pattern_fields()) if f != flag and getattr(args, f, None)), None)
    if other:
        instead = f"use --{flag}" if flag else "it has no per-layer size"
        raise DreamBoothError(f"--{other} does not apply to --method {args.method}; {instead}.")
    pattern = parse_pattern(getattr(args, flag), f"--{flag}") if flag else {}
    layers = {role: (model, select(model, targets_for(role, model, args))) for role, model in models.items()}
    return flag, layer_sizes(layers, pattern, f"--{flag}") if pattern else {role: {} for role in models}


def apply_method(models: dict, args) -> None:
    """Adapters on each model's target layers, in place; only they require gradients."""
    flag, sizes = _sizes(models, args)
    method = registered(args.method)
    for role, model in models.items():
        targets = targets_for(role, model, args)
        if method is None:
            _add_lora(model, targets, args, sizes[role])
            continue
        pattern = {flag: sizes[role]} if flag else {}
        pv.inject(model, build_config(method, args, targets=targets, **pattern))


def _add_lora(model, targets: str, args, sizes: dict[str, int]) -> None:
    """PEFT LoRA on the layers ours adapts, added the way diffusers' trainers add it (alpha = rank): a diffusers
    model's ``add_adapter``; a text encoder gets PEFT's own injection, which is what transformers' ``add_adapter``
    does (and that one insists on newer PEFT releases than diffusers does)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=select(model, targets),
                        rank_pattern=dict(sizes), alpha_pattern=dict(sizes), init_lora_weights=True)
    if is_diffusers_model(model):
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model)


def peft_lora_state(model) -> dict:
    """A model's PEFT LoRA tensors under the keys diffusers' ``save_lora_weights`` takes (no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    if getattr(model, "peft_config", None):
        return get_peft_model_state_dict(model)
    return {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}


def adapter_path(output_dir: Path, role: str) -> Path:
    name = "adapter" if role in ("unet", "transformer") else f"adapter_{role}"
    return Path(output_dir) / f"{name}.safetensors"


def save_outputs(pipe, models: dict, family, args, written: dict[str, Path] | None = None) -> dict:
    """Write the run's adapter files (see the module docstring); returns their paths for metrics.json.
    ``written``: adapter files already written from a sharded model (:func:`sharded_savers`); the LoRA files are then
    exported from an unsharded copy of that model with the file loaded."""
    output_dir = Path(args.output_dir)
    lora = output_dir / "lora" / LORA_FILE
    method = registered(args.method)
    if method is None:
        type(pipe).save_lora_weights(lora.parent, **{f"{role}_lora_layers": peft_lora_state(model)
                                                     for role, model in models.items()})
        return {"lora": str(lora), "kohya": "not written: PEFT LoRA runs save diffusers' own LoRA file only"}
    written = dict(written or {})
    saved = {adapter_path(output_dir, role).stem: str(written.get(role) or pv.save_adapter(
        model, adapter_path(output_dir, role))) for role, model in models.items()}
    if written:
        pipe = unsharded(pipe, models, written, args)
    pv.export_lora(pipe, lora, format="diffusers", full_deltas=not method.low_rank)
    return dict(saved, lora=str(lora), kohya=_kohya(pipe, family, lora.with_name(KOHYA_FILE), method))


def card_files(saved: dict, output_dir: Path) -> dict[str, str]:
    """The files :func:`save_outputs` wrote (its return value), as the model card lists them: ``{path in the output
    folder: kind}`` (kinds of psoft_vision.card.KINDS)."""
    kinds = {"lora": "lora", "kohya": "kohya"}
    return {Path(path).relative_to(output_dir).as_posix(): kinds.get(key, "adapter") for key, path in saved.items()
            if not str(path).startswith("not written")}


def sharded_savers(models: dict, args) -> dict:
    """Under FSDP, before the models are sharded: an AdapterSaver (psoft_vision.distributed) for each, which later
    writes its adapter file from the gathered adapter tensors alone. The PEFT LoRA baseline is not offered there."""
    from psoft_vision.distributed import AdapterSaver

    if registered(args.method) is None:
        raise DreamBoothError("--method lora under FSDP: the PEFT LoRA baseline runs unsharded; use --method psoft "
                              "or oft, or launch without FSDP.")
    return {role: AdapterSaver(model) for role, model in models.items()}


def unsharded(pipe, models: dict, written: dict[str, Path], args):
    """A stand-in pipeline for the LoRA exports: each sharded model loaded again from the pipeline folder (on the CPU,
    whole) with its adapter file loaded."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import FSDPModule

    parts = {}
    for role, model in models.items():
        if role in written:  # fully_shard made the class FSDP<class>: load the model's own class
            cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
            fresh = cls.from_pretrained(args.pretrained_model_name_or_path, subfolder=role, revision=args.revision,
                                        variant=args.variant, cache_dir=args.cache_dir)
            parts[role] = pv.load_adapter(fresh, written[role])
        else:
            parts[role] = model
    return SimpleNamespace(**(dict(pipe.components) | parts))


def _kohya(pipe, family, path: Path, method) -> str:
    """The kohya-format LoRA where psoft_vision writes the family's layout; else why not."""
    if not family.kohya:
        return (f"not written: psoft_vision writes no kohya layout for {family.name} (diffusers reads kohya files "
                "only for SD 1.x/2.x, SDXL and Flux.1; see psoft_vision/formats/kohya_lora.py)")
    try:
        return str(pv.export_lora(pipe, path, format="kohya", full_deltas=not method.low_rank))
    except pv.LoRAExportError as error:
        return f"not written: {error}"
