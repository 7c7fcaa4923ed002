"""Datasets for the VTAB trainer: VTAB-1k task folders (SPEC section 8) and the offline suite.

A task folder holds list files ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``, each line
``images/<split>/000123.jpg <label>`` relative to the folder. Images are resized to the model's input size (no
augmentation, as in VTAB-1k) and normalised with the model's mean and std.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

SPLITS = ("train800", "val200", "train800val200", "test")


class VTABFolderError(ValueError):
    """A VTAB-1k task folder that cannot be read: the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Preprocess:
    """uint8 CHW image -> normalised float CHW at the model's input size."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_model(cls, model) -> "Preprocess":
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        return cls(tuple(config["input_size"][1:]), tuple(config["mean"]), tuple(config["std"]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255)
        batched = x.unsqueeze(0) if x.ndim == 3 else x
        if tuple(batched.shape[-2:]) != self.size:
            batched = F.interpolate(batched, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        batched = (batched - mean) / std
        return batched[0] if x.ndim == 3 else batched


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
        if label < 0:
            raise VTABFolderError(f"{list_file}:{number}: label {label} is negative; labels are 0 .. classes-1")
        path = folder / parts[0]
        if not path.is_file():
            missing.append(parts[0])
        samples.append((path, label))
    if missing:
        raise VTABFolderError(f"{list_file}: {len(missing)} listed images do not exist, e.g. {missing[:3]}")
    if not samples:
        raise VTABFolderError(f"{list_file} lists no images")
    return samples


class FolderDataset(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], preprocess: Preprocess):
        self.samples, self.preprocess = samples, preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return self.preprocess(pixels), label


def folder_splits(folder: Path, train_split: str, eval_split: str | None, preprocess: Preprocess):
    """Datasets for training, model selection (or None) and test, and the number of classes."""
    lists = {split: read_list(folder, split) for split in dict.fromkeys(s for s in (train_split, eval_split, "test")
                                                                         if s)}
    train_labels = {label for _, label in lists[train_split]}
    classes = max(train_labels) + 1
    for split, samples in lists.items():
        unseen = sorted({label for _, label in samples} - train_labels)
        if unseen:
            raise VTABFolderError(f"{folder / (split + '.txt')} has labels {unseen[:5]} that {train_split}.txt never "
                                  f"shows; the model cannot learn them. Check the list files.")
    datasets = {split: FolderDataset(samples, preprocess) for split, samples in lists.items()}
    return datasets[train_split], datasets.get(eval_split), datasets["test"], classes


def offline_splits(task: str, train_split: str, eval_split: str | None, preprocess: Preprocess):
    """The same for a task of VTAB-offline, preprocessed once in memory (2000-3000 small images)."""
    from .offline_data import TASKS, task_split

    def dataset(split: str) -> TensorDataset:
        images, labels = task_split(task, split)
        pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)
        return TensorDataset(preprocess(pixels), torch.from_numpy(labels))

    return dataset(train_split), dataset(eval_split) if eval_split else None, dataset("test"), len(TASKS[task].classes)
