"""diffusers pipelines: find the denoiser, load a psoft_vision adapter file onto it.

diffusers' own ``load_lora_weights`` cannot read psoft_vision files; for that, export a LoRA with
:func:`psoft_vision.export.export_lora`.
"""

import os

from torch import nn

from .io import load_adapter


def denoiser(pipe) -> tuple[nn.Module, str]:
    """``(module, attribute)`` of the pipeline's denoiser: ``pipe.unet`` if it has one, else ``pipe.transformer``."""
    for attribute in ("unet", "transformer"):
        module = getattr(pipe, attribute, None)
        if isinstance(module, nn.Module):
            return module, attribute
    raise TypeError(
        f"{type(pipe).__name__} has neither a `unet` nor a `transformer` module; pass a torch.nn.Module, or a "
        "diffusers pipeline with a unet or transformer."
    )


def load_adapter_into_pipeline(pipe, path: str | os.PathLike, name: str | None = None, check_base: bool = True):
    """Load the psoft_vision adapter file at ``path`` onto the pipeline's denoiser (see :func:`denoiser`) with
    :func:`psoft_vision.io.load_adapter`; returns the pipeline."""
    module, _ = denoiser(pipe)
    load_adapter(module, path, name=name, check_base=check_base)
    return pipe
