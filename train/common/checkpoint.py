"""A trainer's checkpoint folder: accelerate's state plus ``trainer_state.json`` (and ``best.safetensors``, the
trainable tensors of the best epoch so far, where a trainer keeps one).

``<output>/checkpoint`` is replaced whole: the new one is written to ``checkpoint.tmp`` and swapped in, so an
interruption leaves the previous checkpoint intact; ``checkpoint.old`` exists only if the swap itself was cut short,
and is then the one to resume from.
"""

import json
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
BEST_FILE = "best.safetensors"


def write_checkpoint(accelerator, folder: Path, state: dict, best: dict | None = None) -> None:
    """Save to checkpoint.tmp, then swap it in: an interruption leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    tmp, old = folder.with_name("checkpoint.tmp"), folder.with_name("checkpoint.old")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if best is not None:
            save_file(best, tmp / BEST_FILE)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint to resume from in ``output_dir``, or None."""
    for name in ("checkpoint", "checkpoint.old"):  # .old survives only an interruption during the swap
        if (output_dir / name / STATE_FILE).is_file():
            return output_dir / name
    return None


def is_checkpoint(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def load_checkpoint(accelerator, folder: Path) -> tuple[dict, dict | None]:
    """Restore accelerate's state from ``folder``; returns the trainer state and the best tensors (None if none)."""
    accelerator.load_state(str(folder))
    state = json.loads((folder / STATE_FILE).read_text())
    if not (folder / BEST_FILE).is_file():
        return state, None
    from safetensors.torch import load_file

    return state, load_file(folder / BEST_FILE)
