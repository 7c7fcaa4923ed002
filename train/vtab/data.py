"""Datasets for the VTAB trainer: VTAB-1k task folders (see :mod:`train.vtab.folder`) and the VTAB-offline tasks.

Images are read as a viewer shows them (:mod:`train.common.images`: EXIF orientation, 16-bit, transparency), every
one of a task folder checked before training; then resized to the model's input size (no augmentation, as in
VTAB-1k) and normalised with the model's mean and std.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..common.images import check_images, read_rgb
from ..offline.data import TASKS, task_split
from .folder import VTABFolderError, read_list


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


class FolderDataset(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], preprocess: Preprocess):
        self.samples, self.preprocess = samples, preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        pixels = torch.from_numpy(np.array(read_rgb(path))).permute(2, 0, 1)
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
    check_images(list(dict.fromkeys(path for samples in lists.values() for path, _ in samples)))  # before training
    datasets = {split: FolderDataset(samples, preprocess) for split, samples in lists.items()}
    return datasets[train_split], datasets.get(eval_split), datasets["test"], classes


def offline_splits(task: str, train_split: str, eval_split: str | None, preprocess: Preprocess):
    """The same for a task of VTAB-offline, preprocessed once in memory (2000-3000 small images)."""

    def dataset(split: str) -> TensorDataset:
        images, labels = task_split(task, split)
        pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)
        return TensorDataset(preprocess(pixels), torch.from_numpy(labels))

    return dataset(train_split), dataset(eval_split) if eval_split else None, dataset("test"), len(TASKS[task].classes)
