"""``export_oft``: an OFTv2 adapter as PEFT's own OFT adapter, as small as the adapter itself; the mapping and what
is refused are :mod:`psoft_vision.formats.peft_adapter`'s."""

import os
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .formats import peft_adapter
from .formats.lora_factors import floating_dtype
from .formats.peft_adapter import FALLBACK
from .model import denoiser, one_adapter_name, unwrapped


def export_oft(model, path: str | os.PathLike, format: str = "peft", name: str | None = None, *,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write OFTv2 adapter ``name`` (optional when the model has one) as a PEFT OFT adapter directory
    (``adapter_config.json`` and ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(base_model,
    path)``, which then computes what the adapted model computes; returns the directory.

    ``model`` is a module or a diffusers pipeline (its denoiser). The config's ``train_modules`` go in as
    ``modules_to_save``. ``dtype`` is the floating dtype of the stored parameters. The adapter's strength is baked
    in. See :mod:`psoft_vision.formats.peft_adapter` for the mapping to PEFT's parameters and for what is refused
    (kernels larger than 1x1, mixed block sizes or transforms), where ``export_lora(..., full_deltas=True)`` remains
    exact.
    """
    if format != "peft":
        raise ConfigError(f"format={format!r}: export_oft writes 'peft' only. kohya's OFT rotates the output side, "
                          f"which no psoft_vision OFT adapter equals; {FALLBACK} for kohya tools.")
    dtype = floating_dtype(dtype)
    path = Path(path)
    if path.suffix == ".safetensors":
        raise ConfigError(f"export_oft writes a directory; got the file name {str(path)!r}: pass a directory path.")
    model = unwrapped(model) if isinstance(model, nn.Module) else denoiser(model)[0]
    name = one_adapter_name(model, name)
    return peft_adapter.write_oft(model, name, dtype, path)


def __getattr__(name: str):
    """The names that moved to :mod:`psoft_vision.formats.peft_adapter`, with a DeprecationWarning."""
    from .moved import moved_name

    return moved_name(__name__, name, "formats.peft_adapter")
