"""Moved: ``denoiser`` is :mod:`psoft_vision.model`'s, ``load_adapter_into_pipeline``
:mod:`psoft_vision.formats.native`'s, ``load_peft_lora`` :mod:`psoft_vision.formats.peft_adapter`'s. Names read
from here warn (DeprecationWarning)."""


def __getattr__(name: str):
    from .moved import moved_name

    return moved_name(__name__, name, "formats.native", {"denoiser": "model", "load_peft_lora": "formats.peft_adapter"})
