"""Writing files so that an interruption never leaves one half written."""

import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """``write(temporary)`` beside ``path``, then rename over it: ``path`` is never left half written."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
