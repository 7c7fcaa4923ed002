"""diffusers' LoRA file, what ``pipe.load_lora_weights`` reads: PEFT's LoRA keys and LoraConfig
(:mod:`~psoft_vision.formats.peft_adapter`) for each pipeline component under its attribute name (``unet.``,
``transformer.``, ``text_encoder.``, ``text_encoder_2.``), in one ``.safetensors`` whose ``lora_adapter_metadata``
entry holds each component's LoraConfig arguments as ``<component>.<argument>``."""

import json
from pathlib import Path

import torch
from torch import nn

from ..files import write_safetensors
from ..targets import candidate_modules
from .lora_factors import Factors
from .names import DIFFUSERS_METADATA, export_metadata
from .peft_adapter import lora_config, lora_state_dict


def write_lora(path: Path, parts: list[tuple[nn.Module, str, Factors]], dtype: torch.dtype, info: dict) -> Path:
    """The diffusers file of ``(module, component prefix, its factors)`` for every part, at ``path``."""
    tensors, config = {}, {}
    for module, prefix, factors in parts:
        part, ranks = lora_state_dict(factors, f"{prefix}.", dtype)
        tensors.update(part)
        names = [n for n, _ in candidate_modules(module)]
        config.update({f"{prefix}.{k}": v for k, v in lora_config(ranks, names).items()})
    metadata = {**export_metadata(info), DIFFUSERS_METADATA: json.dumps(config, sort_keys=True)}
    write_safetensors(path, tensors, metadata)
    return path
