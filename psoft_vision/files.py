"""Writing files so that an interruption never leaves one half written, nor litter that nothing removes."""

import os
import re
from pathlib import Path

_SUFFIX = ".psoft-tmp"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries that writes of ``path`` by processes no longer running left behind (a kill -9 in
    the middle of a save); returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+){re.escape(_SUFFIX)}")
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _permissions(path: Path) -> int:
    """What the file would get from a plain ``open``: the existing file's mode, else 0o666 less the umask."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write) -> None:
    """``write(temporary)`` beside ``path``, then rename over it: ``path`` is never left half written.

    The temporary is named after ``path`` and this process, so the next write of ``path`` removes what a killed
    write left. The file gets ordinary permissions (some writers, safetensors among them, create 0600 files).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    temporary = _temporary(path)
    try:
        write(temporary)
        os.chmod(temporary, _permissions(path))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
