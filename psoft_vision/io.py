"""Moved: adapter files are :mod:`psoft_vision.formats.native` (``save_adapter``: :mod:`psoft_vision.publish`).
Names read from here warn (DeprecationWarning)."""


def __getattr__(name: str):
    from .moved import moved_name

    return moved_name(__name__, name, "formats.native", {"save_adapter": "publish"})
