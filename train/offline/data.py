"""VTAB-offline: seven transfer tasks in the VTAB-1k shape, built deterministically from real images that ship offline.

Sources (all real photographs or scans, none synthetic):
  * Fashion-MNIST test split (shipped as ``assets/data/fashion-mnist-t10k-*.gz``, MIT licence); the backbone was
    pretrained on the *train* split only, so no downstream image was seen in pretraining;
  * scikit-image's sample images (photographs, textures and microscopy, BSD-style licences, see assets/data/NOTICE);
  * scikit-learn's handwritten digits (UCI optdigits, CC BY 4.0).

Every task has 800 train, 200 val and 2000 test images of 32x32 RGB, drawn from disjoint source material per split
(disjoint Fashion-MNIST images or digit glyphs, disjoint tiles of each photograph), with balanced labels.

    python -m train.offline.data --export runs/vtab-offline   # writes every task in the VTAB-1k folder layout
    python -m train.offline.data --preview docs/vtab_offline_tasks.png
"""

import argparse
import gzip
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..common.paths import ASSETS
from ..vtab.folder import write_folder

FASHION_TEST = ASSETS / "data"
FASHION_TRAIN = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
SIZE = 32
SPLIT_SIZES = {"train800": 800, "val200": 200, "test": 2000}


# --------------------------------------------------------------------------------------------- raw sources
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped: big-endian dims after a 4-byte magic."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


@cache
def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels of Fashion-MNIST; "test" ships in assets/, "train" comes from Debian."""
    if split == "train":
        names = (FASHION_TRAIN / "train-images-idx3-ubyte.gz", FASHION_TRAIN / "train-labels-idx1-ubyte.gz")
    else:
        names = (FASHION_TEST / "fashion-mnist-t10k-images-idx3-ubyte.gz",
                 FASHION_TEST / "fashion-mnist-t10k-labels-idx1-ubyte.gz")
    missing = [str(p) for p in names if not p.exists()]
    if missing:
        hint = "apt-get install dataset-fashion-mnist" if split == "train" else "restore assets/data from git"
        raise FileNotFoundError(f"Fashion-MNIST {split} files missing: {missing}; fix: {hint}")
    return read_idx(names[0]), read_idx(names[1])


@cache
def _sample_image(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


@cache
def _digit_glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).astype(np.uint8), digits.target


# ------------------------------------------------------------------------------------------------ helpers
def _pool(n: int, split: str, seed: int) -> np.ndarray:
    """Indices of the source items a split may use: a fixed 60/15/25 partition of a shuffled range."""
    order = np.random.default_rng(seed).permutation(n)
    cut = {"train800": (0, 0.6), "val200": (0.6, 0.75), "test": (0.75, 1.0)}[split]
    return order[int(cut[0] * n):int(cut[1] * n)]


def _balanced_labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    return labels


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _paste(canvas: np.ndarray, item: np.ndarray, top: int, left: int) -> None:
    h, w = item.shape[:2]
    region = canvas[top:top + h, left:left + w]
    np.maximum(region, item, out=region)


def _fashion_items(rng, split: str, n: int) -> np.ndarray:
    images, _ = fashion_mnist("test")
    return images[rng.choice(_pool(len(images), split, seed=11), n, replace=False)]


# ------------------------------------------------------------------------------------------------- tasks
def _photo_crops(names: tuple[str, ...]):
    """Random crops from disjoint tiles of each photograph (a 4x4 grid: 10 train, 2 val, 4 test tiles)."""

    def build(rng, split, n):
        labels = _balanced_labels(rng, n, len(names))
        tiles = {"train800": range(0, 10), "val200": range(10, 12), "test": range(12, 16)}[split]
        out = np.empty((n, SIZE, SIZE, 3), np.uint8)
        for i, label in enumerate(labels):
            image = _sample_image(names[label])
            tile_order = np.random.default_rng(label).permutation(16)  # fixed per photograph, shared by splits
            tile = tile_order[rng.choice(list(tiles))]
            th, tw = image.shape[0] // 4, image.shape[1] // 4
            side = int(rng.uniform(0.5, 1.0) * min(th, tw))
            top = (tile // 4) * th + rng.integers(0, th - side + 1)
            left = (tile % 4) * tw + rng.integers(0, tw - side + 1)
            out[i] = _resize(np.ascontiguousarray(image[top:top + side, left:left + side]), SIZE)
        return out, labels

    return build


def _fashion_shift(rng, split, n):
    """Fashion-MNIST classes seen through another sensor: negative, blurred, grainy, on a 32x32 frame."""
    images, labels = fashion_mnist("test")
    index = rng.choice(_pool(len(images), split, seed=12), n, replace=False)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, j in enumerate(index):
        frame = np.zeros((SIZE, SIZE), np.float32)
        frame[2:30, 2:30] = images[j]
        blurred = np.asarray(Image.fromarray(frame.astype(np.uint8)).resize((16, 16), Image.BILINEAR)
                             .resize((SIZE, SIZE), Image.BILINEAR), np.float32)
        negative = 255 - blurred + rng.normal(0, 24, blurred.shape)
        out[i] = _rgb(np.clip(negative, 0, 255).astype(np.uint8))
    return out, labels[index].astype(np.int64)


def _rotation(rng, split, n):
    """Which of four quarter turns was applied to a garment (smallNORB-azimuth-like)."""
    labels = _balanced_labels(rng, n, 4)
    out = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    for i, (item, k) in enumerate(zip(_fashion_items(rng, split, n), labels, strict=True)):
        out[i, 2:30, 2:30] = _rgb(np.rot90(item, k))
    return out, labels


def _location(rng, split, n):
    """In which cell of a 3x3 grid a small garment sits (dSprites-location-like)."""
    labels = _balanced_labels(rng, n, 9)
    out = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    item_side, cell = 10, SIZE / 3
    for i, (item, label) in enumerate(zip(_fashion_items(rng, split, n), labels, strict=True)):
        row, col = divmod(int(label), 3)
        centre = [rng.uniform(max(c * cell, item_side / 2), min((c + 1) * cell, SIZE - item_side / 2) - 1e-6)
                  for c in (row, col)]
        top, left = (int(c - item_side / 2) for c in centre)
        _paste(out[i], _rgb(_resize(item, item_side)), top, left)
    return out, labels


def _count(rng, split, n):
    """How many handwritten digits (1 to 6) are on the canvas (CLEVR-count-like)."""
    glyphs, _ = _digit_glyphs()
    pool = _pool(len(glyphs), split, seed=13)
    labels = _balanced_labels(rng, n, 6)
    out = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    for i, label in enumerate(labels):
        cells = rng.choice(16, label + 1, replace=False)  # a 4x4 grid of 8x8 cells, jittered inside each
        for cell_index, glyph in zip(cells, glyphs[rng.choice(pool, label + 1)], strict=True):
            side = int(rng.integers(6, 9))
            top = (cell_index // 4) * 8 + rng.integers(0, 9 - side)
            left = (cell_index % 4) * 8 + rng.integers(0, 9 - side)
            _paste(out[i], _rgb(_resize(glyph, side)), top, left)
    return out, labels


def _scale(rng, split, n):
    """Which of five sizes a garment was drawn at, anywhere on the canvas (dSprites-scale-like)."""
    sides = (10, 14, 18, 23, 28)
    labels = _balanced_labels(rng, n, len(sides))
    out = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    for i, (item, label) in enumerate(zip(_fashion_items(rng, split, n), labels, strict=True)):
        side = sides[label]
        top, left = rng.integers(0, SIZE - side + 1, size=2)
        _paste(out[i], _rgb(_resize(item, side)), int(top), int(left))
    return out, labels


@dataclass(frozen=True)
class Task:
    name: str
    group: str  # natural | specialized | structured, as in VTAB
    classes: tuple[str, ...]
    build: object
    seed: int


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "coins", "clock")
TEXTURES = ("brick", "grass", "gravel", "cell", "immunohistochemistry", "page")
FASHION = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")

TASKS = {task.name: task for task in (
    Task("photo-crops", "natural", PHOTOS, _photo_crops(PHOTOS), 101),
    Task("textures", "specialized", TEXTURES, _photo_crops(TEXTURES), 102),
    Task("fashion-shift", "specialized", FASHION, _fashion_shift, 103),
    Task("rotation", "structured", ("0", "90", "180", "270"), _rotation, 104),
    Task("location", "structured", tuple(f"cell{i}" for i in range(9)), _location, 105),
    Task("count", "structured", tuple(str(i) for i in range(1, 7)), _count, 106),
    Task("scale", "structured", ("10px", "14px", "18px", "23px", "28px"), _scale, 107),
)}


@cache
def task_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and int64 labels of one split; the same bytes on every machine and call."""
    if name not in TASKS:
        raise KeyError(f"unknown offline task {name!r}; choose from {sorted(TASKS)}")
    task = TASKS[name]
    if split == "train800val200":
        parts = [task_split(name, s) for s in ("train800", "val200")]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if split not in SPLIT_SIZES:
        raise KeyError(f"unknown split {split!r}; choose from {sorted(SPLIT_SIZES) + ['train800val200']}")
    rng = np.random.default_rng([task.seed, list(SPLIT_SIZES).index(split)])
    images, labels = task.build(rng, split, SPLIT_SIZES[split])
    images.setflags(write=False)
    return images, np.asarray(labels, np.int64)


def export_vtab_folder(name: str, root: Path) -> Path:
    """Write one task in the VTAB-1k folder layout (SPEC section 8), PNG so that the pixels stay exact."""
    return write_folder(Path(root) / name, {split: task_split(name, split) for split in SPLIT_SIZES})


def preview(path: Path, per_task: int = 12, zoom: int = 2) -> Path:
    """One row of train images per task, task names on the left, as a PNG."""
    from PIL import ImageDraw

    label_width, side = 110, SIZE * zoom
    sheet = Image.new("RGB", (label_width + per_task * side, len(TASKS) * side), "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(TASKS):
        images, labels = task_split(name, "train800")
        draw.text((4, row * side + side // 2 - 6), name, fill="black")
        for col in range(per_task):
            tile = Image.fromarray(images[col]).resize((side, side), Image.NEAREST)
            sheet.paste(tile, (label_width + col * side, row * side))
    sheet.save(path)
    return Path(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.offline.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, help="folder to write the tasks into, in the VTAB-1k layout")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: all)")
    parser.add_argument("--preview", type=Path, help="write a PNG with a row of train images per task")
    args = parser.parse_args(argv)
    if args.export is None and args.preview is None:
        parser.error("give --export FOLDER and/or --preview PNG")
    if args.preview is not None:
        print(preview(args.preview))
    for name in args.tasks.split(",") if args.export is not None else ():
        print(export_vtab_folder(name, args.export))


if __name__ == "__main__":
    main()
