"""Images in and out of the DreamBooth trainer: folders of subject and class images, PNG files, sample grids and the
base model's class images."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from psoft_vision.files import atomic_write

from ..common.images import check_images, read_rgb
from .errors import DreamBoothError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: Path, what: str, allow_empty: bool = False) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DreamBoothError(f"{what} {str(folder)!r} is not a folder; pass a folder of images "
                              f"({', '.join(IMAGE_SUFFIXES)}).")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images and not allow_empty:
        raise DreamBoothError(f"{what} {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return images


def load_images(paths: list[Path], resolution: int) -> torch.Tensor:
    """(N, 3, resolution, resolution) in [-1, 1]: each image as a viewer shows it (:mod:`train.common.images`),
    the shorter side resized to ``resolution``, centre-cropped."""
    out = []
    for path in paths:
        image = ImageOps.fit(read_rgb(path), (resolution, resolution), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)


def image_sizes(paths: list[Path], resolution: int) -> list[tuple[int, int, int, int]]:
    """Per image, what SDXL conditions on: the original (height, width) and the top-left (top, left) of the centre
    crop that :func:`load_images` takes, in the image resized so that its shorter side is ``resolution``."""
    sizes = []
    for height, width in check_images(paths):  # upright: a sideways phone photo's EXIF orientation applied
        scale = resolution / min(width, height)
        sizes.append((height, width, round((height * scale - resolution) / 2), round((width * scale - resolution) / 2)))
    return sizes


def save_png(array: np.ndarray, path: Path) -> None:
    """An (H, W, 3) array in [0, 1] written atomically as PNG."""
    image = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def generate(pipe, prompt: str, seeds: list[int], args, batch: int | None = None, **call) -> np.ndarray:
    """(len(seeds), H, W, 3) images in [0, 1] of ``prompt``, one generator per seed (each image reproducible alone);
    ``call``: more arguments of the pipeline's ``__call__`` (a family's ``max_sequence_length``)."""
    images = []
    batch = batch or len(seeds)
    for i in range(0, len(seeds), batch):
        chunk = seeds[i:i + batch]
        out = pipe([prompt] * len(chunk), num_inference_steps=args.num_inference_steps,
                   guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
                   generator=[torch.Generator().manual_seed(s) for s in chunk], output_type="np", **call)
        images.append(out.images)
    return np.concatenate(images)


def generate_class_images(pipe, args, accelerator, **call) -> int:
    """Fill ``class_data_dir`` up to ``num_class_images`` with base-model images of the class prompt."""
    existing = list_images(args.class_data_dir, "--class_data_dir", allow_empty=True) \
        if args.class_data_dir.exists() else []
    missing = args.num_class_images - len(existing)
    if missing <= 0 or not accelerator.is_main_process:
        return 0
    args.class_data_dir.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in existing}
    names = [n for n in (f"class-{i:05d}.png" for i in range(args.num_class_images + len(existing)))
             if n not in taken][:missing]
    bar = tqdm(range(0, missing, args.sample_batch_size), desc="class images", disable=args.quiet)
    for start in bar:
        chunk = names[start:start + args.sample_batch_size]
        seeds = [10_000 * (args.seed + 1) + int(n[6:11]) for n in chunk]
        for name, image in zip(chunk, generate(pipe, args.class_prompt, seeds, args, **call), strict=True):
            save_png(image, args.class_data_dir / name)
    return missing


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of (N, H, W, 3) images -> one (rows * H, N * W, 3) image."""
    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)


