"""Writing files and folders so that an interruption never leaves one half written, nor litter that nothing removes,
and only ever replacing a regular file (or, for a folder export, a folder).

A failed write (a full disk, a read-only file system, a path whose folder is a file) raises
:class:`~psoft_vision.errors.OutputPathError` naming the path and the fix; what was at the path stays as it was.
"""

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import OutputPathError

_SUFFIX = ".psoft-tmp"
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"))
_WHY = {errno.ENOSPC: "the disk is full: free some space", errno.EDQUOT: "the disk quota is used up: free some space",
        errno.EROFS: "the file system is read-only: write somewhere else",
        errno.EACCES: "permission denied: write somewhere you may write",
        errno.EPERM: "permission denied: write somewhere you may write"}


def kind_of(path: Path) -> str:
    """What is at ``path``, following symbolic links, in words: "a regular file", "a directory", "a character
    device", ..., "a broken symbolic link" or "nothing"."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # (a component of its folder being a file: nothing there)
        return "a broken symbolic link" if os.path.islink(path) else "nothing"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


def check_name(path: Path, what: str) -> None:
    """Refuse ``""`` and ``"."`` (and a path ending in ``..``): they name no file or folder of their own."""
    if str(path) in ("", ".") or path.name in ("", ".", ".."):
        raise OutputPathError(f"{str(path)!r} names no {what}; pass a path such as 'out/adapter.safetensors'.")


def _check_target(path: Path, want: str) -> None:
    """``path`` holds nothing, or a ``want`` ("a regular file" or "a directory") that may be replaced."""
    kind = kind_of(path)
    if kind not in ("nothing", "a broken symbolic link", want):
        raise OutputPathError(f"{str(path)!r} is {kind}, not {want}; psoft_vision replaces only {want} there. Pass "
                              "another path.")


def make_folder(folder: Path) -> None:
    """Create ``folder`` and its parents, or a named error when a component is a file or the file system refuses."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise OutputPathError(f"cannot create the folder {str(folder)!r}: {str(blocking)!r} is "
                              f"{kind_of(blocking)}, not a folder. Pass a path under a folder.") from None
    except OSError as error:
        raise _failed(folder, error) from None


def _failed(path: Path, error: Exception) -> OutputPathError:
    code = getattr(error, "errno", None)
    if code is None:  # safetensors reports the OS error in its message only: "... (os error 28)"
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    why = _WHY.get(code, "fix the cause and write again")
    return OutputPathError(f"could not write {str(path)!r} ({error}); {why}. Anything that was at that path is "
                           "unchanged.")


def _temporary(path: Path, role: str = "") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{role}{_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries (files, or folders of a folder export) that writes of ``path`` by processes no longer
    running left behind (a kill -9 in the middle of a save); returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)(-old)?{re.escape(_SUFFIX)}")
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _delete(candidate)
            removed.append(candidate)
    return removed


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umasked(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _permissions(path: Path, default: int = 0o666) -> int:
    """What ``path`` would get from a plain ``open`` / ``mkdir``: the existing one's mode, else ``default`` less
    the umask."""
    return path.stat().st_mode & 0o777 if path.exists() else _umasked(default)


def ordinary_permissions(path: Path) -> None:
    """Give a new file the mode a plain ``open`` would (some writers, safetensors among them, create 0600 files)."""
    os.chmod(path, _umasked(0o666))


def atomic_write(path: Path, write) -> None:
    """``write(temporary)`` beside ``path``, then rename over it: ``path`` is never left half written.

    ``path`` must hold nothing or a regular file (never a device, FIFO, socket or directory: those are refused
    before anything is written). The temporary is named after ``path`` and this process, so the next write of
    ``path`` removes what a killed write left. The file gets ordinary permissions (some writers, safetensors among
    them, create 0600 files).
    """
    path = Path(path)
    check_name(path, "file")
    _check_target(path, "a regular file")
    make_folder(path.parent)
    remove_stale_temporaries(path)
    temporary = _temporary(path)
    try:
        write(temporary)
        os.chmod(temporary, _permissions(path))
        os.replace(temporary, path)
    except (OSError, SafetensorError) as error:
        raise _failed(path, error) from None
    finally:
        with contextlib.suppress(OSError):  # a read-only file system refuses even to unlink what is not there
            temporary.unlink(missing_ok=True)


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """``tensors`` and ``metadata`` as the safetensors file ``path``, written by :func:`atomic_write`."""
    atomic_write(path, lambda f: save_file(tensors, f, metadata=metadata))


def atomic_folder(path: Path, write) -> None:
    """``write(temporary folder)`` beside ``path``, then swap it in for ``path`` as a whole: a reader (or a kill)
    sees the old folder or the new one, never a mix of their files. Entries of the old folder that the write does
    not produce (a README, say) are carried over as hard links.

    The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere it is two renames, and a kill between them
    leaves no folder at ``path`` and the old one, whole, at ``.<name>.<pid>-old.psoft-tmp`` beside it.
    """
    path = Path(path)
    check_name(path, "folder")
    _check_target(path, "a directory")
    make_folder(path.parent)
    remove_stale_temporaries(path)
    temporary, old = _temporary(path), _temporary(path, "-old")
    try:
        temporary.mkdir(mode=0o700)
        write(temporary)
        _carry(path, temporary)
        os.chmod(temporary, _permissions(path, 0o777))
        _swap(temporary, path, old)
    except (OSError, SafetensorError) as error:
        raise _failed(path, error) from None
    finally:
        _delete(temporary)
        _delete(old)


def _carry(old: Path, new: Path) -> None:
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if not (new / entry.name).exists() and not entry.name.endswith(_SUFFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, new / entry.name)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _swap(new: Path, path: Path, old: Path) -> None:
    """Put folder ``new`` at ``path``; whatever was at ``path`` ends at ``new`` (exchanged) or ``old`` (renamed)."""
    if not path.exists():
        os.rename(new, path)
    elif not _exchange(new, path):
        os.rename(path, old)
        os.rename(new, path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_cwd, exchange = -100, 2
    if rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))
