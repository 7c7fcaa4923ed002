"""A trainer's checkpoint folder: accelerate's state, ``trainer_state.json``, ``run_args.json`` (the arguments the run
was started with, for the resume check of train/common/resume_args.py), ``best.safetensors`` where a trainer keeps
the best epoch's tensors, and ``manifest.json``, written last: every other file's size and sha256.

A checkpoint is *sealed* once its manifest exists, and *whole* when every file matches it. ``<output>/checkpoint``
is replaced so that a kill between any two file operations leaves a whole checkpoint to resume from:

1. discard a leftover ``checkpoint.tmp`` (its manifest first, so a half-deleted folder is never taken as sealed);
2. write the new checkpoint into ``checkpoint.tmp``; fsync every file; write the manifest (temporary, fsync, rename);
   ``checkpoint.tmp`` is now sealed;
3. discard ``checkpoint.old`` if ``checkpoint`` exists beside it (a kill's leftover, older than ``checkpoint``);
4. rename ``checkpoint`` to ``checkpoint.old``; rename ``checkpoint.tmp`` to ``checkpoint``; fsync the folder;
5. discard ``checkpoint.old``.

:func:`find_checkpoint` therefore takes, newest first: a sealed ``checkpoint.tmp`` (a kill came after step 2),
``checkpoint``, ``checkpoint.old`` (a kill came between the two renames). ``checkpoint`` is only ever made by renaming
a sealed folder, so a ``checkpoint`` without a manifest, or with a file that does not match it, is damage, and a
:class:`CheckpointError` says what is wrong; an unsealed ``checkpoint.tmp`` is an interrupted write and is ignored.

``PSOFT_VISION_KILL_AT=n`` ends the process (``os._exit(KILLED_EXIT_CODE)``) right after the n-th file operation of
the checkpoint writes in this process, and ``PSOFT_VISION_KILL_LOG=path`` appends each operation's name to ``path``:
the hooks tests/test_checkpoint_kills.py kills real training runs with.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
ARGS_FILE = "run_args.json"
BEST_FILE = "best.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
KILL_AT_ENV = "PSOFT_VISION_KILL_AT"
KILL_LOG_ENV = "PSOFT_VISION_KILL_LOG"
KILLED_EXIT_CODE = 86

_operations = {"pid": None, "done": 0}


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is damaged: a file is missing, truncated or changed, or it cannot be read."""


# ------------------------------------------------------------------------------------------------ kill hook
def _operation_done(what: str) -> None:
    """Count one file operation of a checkpoint write, for the kill-point test: log it, and end the process at the
    operation ``PSOFT_VISION_KILL_AT`` names. The count starts anew in a forked child, so a test can fork runs."""
    kill_at, log = os.environ.get(KILL_AT_ENV), os.environ.get(KILL_LOG_ENV)
    if kill_at is None and log is None:
        return
    if _operations["pid"] != os.getpid():
        _operations.update(pid=os.getpid(), done=0)
    _operations["done"] += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{_operations['done']} {what}\n")
    if kill_at is not None:
        if not kill_at.strip().isdigit():
            raise ValueError(f"{KILL_AT_ENV}={kill_at!r} is not a whole number; give the operation to die after "
                             "(1, 2, ...) or unset it")
        if _operations["done"] == int(kill_at):
            os._exit(KILLED_EXIT_CODE)


# ------------------------------------------------------------------------------------------- file primitives
def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _digest(path: Path, sync: bool = False) -> dict:
    """The file's size and sha256 (read in 1 MiB pieces); ``sync`` also flushes it to the disk first."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while piece := f.read(1 << 20):
            sha.update(piece)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def _siblings(folder: Path) -> tuple[Path, Path]:
    """``checkpoint.tmp`` and ``checkpoint.old`` beside ``checkpoint``."""
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


def _discard(folder: Path) -> None:
    """Remove a folder, its manifest first: a kill halfway through leaves an unsealed folder, which is ignored."""
    if not folder.exists():
        return
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    _fsync_folder(folder)
    _operation_done(f"unseal {folder.name}")
    shutil.rmtree(folder)
    _operation_done(f"remove {folder.name}")


def _rename(source: Path, target: Path) -> None:
    source.rename(target)
    _fsync_folder(target.parent)
    _operation_done(f"rename {source.name} -> {target.name}")


# --------------------------------------------------------------------------------------------------- writing
def _seal(folder: Path, processes: int) -> None:
    """Flush every file to the disk and write the manifest last (to a temporary, renamed): the folder is whole."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest = dict(format=MANIFEST_FORMAT, processes=processes,
                    files={p.relative_to(folder).as_posix(): _digest(p, sync=True) for p in files})
    partial = folder / (MANIFEST_FILE + ".part")
    _write_synced(partial, json.dumps(manifest, indent=1))
    partial.rename(folder / MANIFEST_FILE)
    _fsync_folder(folder)
    _operation_done(f"seal {folder.name}")


def _swap(folder: Path, tmp: Path, old: Path) -> None:
    """Put the sealed ``tmp`` in place of ``folder``, keeping the previous one as ``old`` until the new is in."""
    if folder.exists():
        _discard(old)  # a kill's leftover, older than folder
        _rename(folder, old)
    _rename(tmp, folder)
    _discard(old)


def write_checkpoint(accelerator, folder: Path, state: dict, *, run_args: dict, best: dict | None = None) -> None:
    """Write the checkpoint to ``<folder>.tmp``, seal it, and swap it in (see the module docstring for why a kill at
    any point leaves a whole checkpoint). ``run_args``: the run's arguments, as metrics_files.recorded_args gives
    them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp, old = _siblings(folder)
    if accelerator.is_main_process:
        _discard(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's random_states_<i>.pkl is written
    if accelerator.is_main_process:
        _operation_done(f"save_state {tmp.name}")
        for name, data in ((STATE_FILE, state), (ARGS_FILE, run_args)):
            (tmp / name).write_text(json.dumps(data, indent=1))
            _operation_done(f"write {name}")
        if best is not None:
            save_file(best, tmp / BEST_FILE)
            _operation_done(f"write {BEST_FILE}")
        _seal(tmp, accelerator.num_processes)
        _swap(folder, tmp, old)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------- finding
def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` looks like a checkpoint this project wrote (whole or not: loading says)."""
    return (Path(folder) / MANIFEST_FILE).is_file() or (Path(folder) / STATE_FILE).is_file()


def _candidates(folder: Path) -> list[Path]:
    """The checkpoints a resume could take, newest first: a sealed ``.tmp`` (its swap was cut short), the
    checkpoint itself, or ``.old`` where the checkpoint is gone (a kill between the two renames). An unsealed
    ``.tmp`` was never finished and counts for nothing."""
    tmp, old = _siblings(folder)
    found = [tmp] if (tmp / MANIFEST_FILE).is_file() else []
    if folder.exists():
        found.append(folder)
    elif old.exists():
        found.append(old)
    return found


def find_checkpoint(output_dir: Path, name: str = "checkpoint") -> Path | None:
    """The checkpoint to resume from in ``output_dir``, or None when there is none at all. A damaged one (a file
    missing, or of the wrong size) is a :class:`CheckpointError`, never a silent fresh start; the file contents are
    checked by :func:`load_checkpoint`."""
    candidates = _candidates(Path(output_dir) / name)
    if not candidates:
        return None
    verify_checkpoint(candidates[0], contents=False, fallback=candidates[1] if len(candidates) > 1 else None)
    return candidates[0]


# --------------------------------------------------------------------------------------------------- checking
def read_manifest(folder: Path) -> dict:
    """The manifest of ``folder``; a :class:`CheckpointError` where there is none or it cannot be read."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        what = "is empty" if Path(folder).is_dir() and not any(Path(folder).iterdir()) else "has no manifest.json"
        raise CheckpointError(f"{folder} {what}: it is not a whole checkpoint (a checkpoint is sealed by its "
                              "manifest, written last; a folder without one was emptied or changed by hand, or "
                              "written by a trainer older than manifests)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a readable manifest ({type(error).__name__}: {error})") from error
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}; this trainer reads format "
                              f"{MANIFEST_FORMAT}: resume with the version that wrote it")
    for required in (STATE_FILE, ARGS_FILE):
        if required not in files:
            raise CheckpointError(f"{path} lists no {required}: the checkpoint cannot be resumed exactly")
    return manifest


def _problems(folder: Path, files: dict, contents: bool) -> list[str]:
    """What differs between the folder and its manifest: missing files, sizes, and (``contents``) sha256 digests."""
    problems = []
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes where the manifest says {expected['bytes']}")
        elif contents and _digest(path)["sha256"] != expected["sha256"]:
            problems.append(f"{name} does not match its sha256 in the manifest (its bytes changed after writing)")
    return problems


def verify_checkpoint(folder: Path, contents: bool = True, fallback: Path | None = None) -> dict:
    """The manifest of ``folder`` once every file it lists is there with its size (and, ``contents``, its
    sha256); otherwise a :class:`CheckpointError` naming each bad file and what to do. ``fallback``: the older
    checkpoint a resume would take were ``folder`` deleted."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
        problems = _problems(folder, manifest["files"], contents)
        if problems:
            raise CheckpointError(f"{folder} is damaged: {'; '.join(problems)}")
    except CheckpointError as error:
        then = f"resume from {fallback}" if fallback is not None else "start the run again from its beginning"
        raise CheckpointError(f"{error}. Resuming from it would not continue the run exactly. Restore the files, or "
                              f"delete {folder} to {then}.") from error.__cause__
    return manifest


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path} is not readable JSON ({error}), though it matches the manifest: it was "
                              "written so; delete the checkpoint to start again") from error


def read_run_args(folder: Path) -> dict:
    """The arguments the run in ``folder`` was started with (see :func:`write_checkpoint`)."""
    return _read_json(Path(folder) / ARGS_FILE)


def _settle(loaded: Path) -> None:
    """Finish what a kill left undone once ``loaded`` (one of :func:`_candidates`) is in memory: swap a sealed
    ``.tmp`` in, rename a lone ``.old`` back, discard the rest, each step as kill-safe as in a write. A run that
    resumes only to finish (its last checkpoint was written) leaves the folder as an uninterrupted one."""
    folder = loaded.with_name(loaded.name.removesuffix(".tmp").removesuffix(".old"))
    tmp, old = _siblings(folder)
    if loaded == tmp:
        _swap(folder, tmp, old)
    elif loaded == old:
        _rename(old, folder)
    _discard(old)
    _discard(tmp)


def load_checkpoint(accelerator, folder: Path, settle: bool = False) -> tuple[dict, dict | None]:
    """Check every file of ``folder`` against its manifest, then restore accelerate's state (models, optimisers,
    schedulers, random states); returns the trainer state and the best tensors (None if none). Anything unreadable
    is a :class:`CheckpointError` naming the file. ``settle``: ``folder`` came from :func:`find_checkpoint`, and
    the leftovers of an interrupted write beside it are cleared once it is loaded."""
    folder = Path(folder)
    state, best = _load(accelerator, folder)
    if settle:
        accelerator.wait_for_everyone()  # every process has read the folder
        if accelerator.is_main_process:
            _settle(folder)
        accelerator.wait_for_everyone()
    return state, best


def _quantized(model) -> bool:
    """Whether the model holds bitsandbytes layers. Once quantized, they cannot load the quantization-state entries
    of their own state dict (``weight.absmax``, ``weight.quant_map``, ...), so such a model's state is loaded
    without strict key matching: its frozen base is rebuilt the same from the base weights and --quantize, the
    manifest vouches for the files and the argument check for the run, and the trainable tensors load as usual."""
    return any(type(p).__module__.startswith("bitsandbytes") for p in model.parameters())


def _load(accelerator, folder: Path) -> tuple[dict, dict | None]:
    manifest = verify_checkpoint(folder)
    rng = f"random_states_{accelerator.process_index}.pkl"
    if rng not in manifest["files"]:  # accelerate would go on without it, with other random numbers
        raise CheckpointError(f"{folder} holds no {rng}: it was written by {manifest['processes']} process(es), "
                              f"and this is process {accelerator.process_index}; resume with as many processes")
    try:
        accelerator.load_state(str(folder), strict=not any(_quantized(model) for model in accelerator._models))
    except Exception as error:
        raise CheckpointError(f"{folder} matches its manifest but accelerate cannot load it ({type(error).__name__}: "
                              f"{error}); was it written for another model or method? Resume with the run's own "
                              "arguments, or delete it to start again") from error
    state = _read_json(folder / STATE_FILE)
    if BEST_FILE not in manifest["files"]:
        return state, None
    from safetensors.torch import load_file

    try:
        return state, load_file(folder / BEST_FILE)
    except Exception as error:
        raise CheckpointError(f"{folder / BEST_FILE} matches the manifest but safetensors cannot read it "
                              f"({type(error).__name__}: {error}); delete the checkpoint to start again") from error
