"""Moved to :mod:`psoft_vision.formats.kohya_lora`; names read from here warn (DeprecationWarning)."""


def __getattr__(name: str):
    from .moved import moved_name

    return moved_name(__name__, name, "formats.kohya_lora")
