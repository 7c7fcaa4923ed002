"""Moved to :mod:`psoft_vision.formats.fingerprint`; names read from here warn (DeprecationWarning)."""


def __getattr__(name: str):
    from .moved import moved_name

    return moved_name(__name__, name, "formats.fingerprint")
