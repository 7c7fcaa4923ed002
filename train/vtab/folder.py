"""The VTAB-1k task folder (SPEC section 8): list files ``train800.txt``, ``val200.txt``, ``train800val200.txt``
and ``test.txt``, each line ``images/<split>/000123.jpg <label>`` relative to the folder; read, checked and written.
"""

from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train800", "val200", "train800val200", "test")
#: The most classes a task may have (labels 0 .. MAX_CLASSES - 1): a mistyped label of 10**12 would otherwise ask
#: for a head of 10**12 outputs. ImageNet-21k has 21,843.
MAX_CLASSES = 100_000


class VTABFolderError(ValueError):
    """A VTAB-1k task folder that cannot be read: the message names the file, the line and the fix."""


def write_folder(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write (N, H, W, 3) uint8 images and their labels per split in the VTAB-1k layout, as PNG, with the list
    files and train800val200.txt when train800 and val200 are given."""
    lists = {}
    for split, (images, labels) in splits.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lists[split] = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            relative = f"images/{split}/{i:06d}.png"
            Image.fromarray(image).save(folder / relative)
            lists[split].append(f"{relative} {label}")
    if "train800" in lists and "val200" in lists:
        lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def read_list(folder: Path, split: str) -> list[tuple[Path, int]]:
    """The (image path, label) pairs of one list file, every path checked to exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VTABFolderError(f"--data-dir {folder} is not a folder; point it at one VTAB-1k task folder")
    list_file = folder / f"{split}.txt"
    if not list_file.is_file():
        present = sorted(p.name for p in folder.glob("*.txt"))
        raise VTABFolderError(f"{list_file} is missing (list files present: {present}); a VTAB-1k task folder "
                              f"needs {', '.join(s + '.txt' for s in SPLITS)}")
    samples, missing = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise VTABFolderError(f"{list_file}:{number}: expected '<relative image path> <integer label>', "
                                  f"got {line!r}")
        label = int(parts[1])
        if not 0 <= label < MAX_CLASSES:
            raise VTABFolderError(f"{list_file}:{number}: label {label} is outside 0 .. {MAX_CLASSES - 1}; labels "
                                  "are 0 .. classes-1 (the classifier gets one output per class)")
        path = folder / parts[0]
        if not path.is_file():
            missing.append(parts[0])
        samples.append((path, label))
    if missing:
        raise VTABFolderError(f"{list_file}: {len(missing)} listed images do not exist, e.g. {missing[:3]}")
    if not samples:
        raise VTABFolderError(f"{list_file} lists no images")
    return samples
