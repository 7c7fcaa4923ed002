"""diffusers pipelines: find the denoiser, load a psoft_vision adapter file onto it, and load an exported LoRA
onto the denoisers that diffusers gives no LoRA loader.

diffusers' own ``load_lora_weights`` cannot read psoft_vision files; for that, export a LoRA with
:func:`psoft_vision.export.export_lora`.
"""

import os
from pathlib import Path

from torch import nn

from .errors import AdapterFileError
from .io import load_adapter
from .lifecycle import unwrapped


def denoiser(pipe) -> tuple[nn.Module, str]:
    """``(module, attribute)`` of the pipeline's denoiser: ``pipe.unet`` if it has one, else ``pipe.transformer``
    (inside its ``torch.compile`` or other wrapper)."""
    for attribute in ("unet", "transformer"):
        module = getattr(pipe, attribute, None)
        if isinstance(module, nn.Module):
            return unwrapped(module), attribute
    raise TypeError(
        f"{type(pipe).__name__} has neither a `unet` nor a `transformer` module; pass a torch.nn.Module, or a "
        "diffusers pipeline with a unet or transformer."
    )


def load_adapter_into_pipeline(pipe, path: str | os.PathLike, name: str | None = None, check_base: bool = True,
                               **where):
    """Load the psoft_vision adapter at ``path`` (a file, or a folder or hub repository id with ``weight_name``,
    ``revision``, ``cache_dir``, ``token``: see :func:`psoft_vision.io.load_adapter`) onto the pipeline's denoiser
    (see :func:`denoiser`); returns the pipeline."""
    module, _ = denoiser(pipe)
    load_adapter(module, path, name=name, check_base=check_base, **where)
    return pipe


def load_peft_lora(model, path: str | os.PathLike, adapter_name: str = "default"):
    """Load the LoRA that ``export_lora(..., format="peft")`` wrote to the directory ``path`` onto ``model`` (a
    denoiser, or a pipeline: then onto its denoiser), in place; returns what it was given.

    For the denoisers diffusers has no LoRA loader for: neither their pipeline's ``load_lora_weights`` nor a
    ``load_lora_adapter`` on the model (PixArt, DiT, HunyuanDiT, Stable Video Diffusion). It does what
    ``load_lora_adapter`` does for the others: PEFT puts its LoRA layers into the model's own modules, so the
    module keeps its class and a pipeline holding it runs the LoRA with no other change. PEFT's ``PeftModel``
    wrapper is not kept; ``peft.PeftModel.from_pretrained(model, path)`` is the same load with it, for its
    ``unload()`` or ``merge_and_unload()``. Needs peft, as every diffusers LoRA load does.
    """
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise AdapterFileError(
            f"{str(path)!r} is not a PEFT LoRA directory (no adapter_config.json); write one with "
            "psoft_vision.export_lora(model, path, format='peft')."
        )
    try:
        from peft import PeftModel
    except ImportError as error:
        raise ImportError("load_peft_lora needs peft (pip install peft), as diffusers' own LoRA loading does.") \
            from error
    module = model if isinstance(model, nn.Module) else denoiser(model)[0]
    PeftModel.from_pretrained(module, path, adapter_name=adapter_name)  # injects into ``module`` itself
    return model
