"""Training images as a person sees them, in both trainers (issue 21): 16-bit, palette, transparency, CMYK and
EXIF-rotated images; unreadable images, labels and run folders refused by name before training starts."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.common.images import ImageReadError, read_rgb
from train.dreambooth import images as db_images
from train.vtab import trainer as vtab
from train.vtab.data import Preprocess, folder_splits
from train.vtab.folder import VTABFolderError, write_folder

PREPROCESS = Preprocess((20, 20), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # x = pixel / 255


def gradient(h=20, w=30) -> np.ndarray:
    """An (h, w, 3) uint8 image where every pixel differs from its mirror images (so a rotation shows)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + 2 * y) % 256], -1).astype(np.uint8)


def sideways(path: Path, upright: np.ndarray) -> Path:
    """The upright image stored rotated, with the EXIF orientation (6: rotate 90 clockwise to view) a phone writes."""
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)
    return path


def grey16(path: Path) -> tuple[Path, np.ndarray]:
    values = (np.arange(20 * 30).reshape(20, 30) * 109).astype(np.uint16)  # up to 65291
    Image.fromarray(values).save(path)
    return path, values


# ------------------------------------------------------------------------------------------------ the reader
def test_a_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(tmp_path):
    path, values = grey16(tmp_path / "a.png")
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(read_rgb(path))
    assert np.array_equal(pixels[..., 0], np.round(values / 257).astype(np.uint8))
    assert (pixels == 255).mean() < 0.01  # convert("RGB") made 99% of these 255


def test_exif_orientation_is_applied(tmp_path):
    upright = gradient()
    assert np.array_equal(np.asarray(read_rgb(sideways(tmp_path / "a.png", upright))), upright)


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, ..., 3] = 255  # the top half opaque red, the bottom half transparent (its stored colour: dark yellow)
    rgba[2:, ..., 1] = 50
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba).convert("LA").save(tmp_path / "la.png")
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.save(tmp_path / "p.png", transparency=palette.getpixel((0, 3)))
    for name in ("rgba.png", "la.png", "p.png"):
        pixels = np.asarray(read_rgb(tmp_path / name))
        assert (pixels[2:] == 255).all(), name
        assert (pixels[:2] != 255).any(), name


@pytest.mark.parametrize("mode", ["P", "L", "CMYK", "1"])
def test_other_modes_load_as_pillow_converts_them(tmp_path, mode):
    image = Image.fromarray(gradient()).convert(mode)
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    image.save(path)
    assert np.array_equal(np.asarray(read_rgb(path)), np.asarray(Image.open(path).convert("RGB")))


def _truncated(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:6000])
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


def _text(path: Path) -> Path:
    path.write_text("not an image")
    return path


BAD = {"truncated": _truncated, "corrupt": _garbage, "not an image": _text}


@pytest.mark.parametrize("bad", list(BAD))
def test_an_unreadable_image_is_a_named_error_naming_the_file(tmp_path, bad):
    path = BAD[bad](tmp_path / "photo.png")
    with pytest.raises(ImageReadError, match="photo.png' is not a readable image"):
        read_rgb(path)


# --------------------------------------------------------------------------------------------------- VTAB
def vtab_folder(root: Path) -> Path:
    def split(n):
        return np.stack([gradient(20, 20)] * n), np.arange(n) % 2

    return write_folder(root, {"train800": split(4), "val200": split(2), "test": split(2)})


def test_vtab_reads_rotated_and_sixteen_bit_images_as_a_viewer_shows_them(tmp_path):
    folder = vtab_folder(tmp_path / "task")
    upright = gradient(20, 20)
    sideways(folder / "images/train800/000000.png", upright)
    values = (np.arange(400).reshape(20, 20) * 163).astype(np.uint16)
    Image.fromarray(values).save(folder / "images/train800/000001.png")
    train, *_ = folder_splits(folder, "train800", "val200", PREPROCESS)
    torch.testing.assert_close(train[0][0], torch.from_numpy(upright).permute(2, 0, 1).float() / 255)
    grey = torch.from_numpy(np.round(values / 257)).float() / 255
    torch.testing.assert_close(train[1][0], grey.expand(3, -1, -1))


@pytest.mark.parametrize("bad", list(BAD))
def test_vtab_finds_a_bad_test_image_before_training(tmp_path, bad):
    folder = vtab_folder(tmp_path / "task")
    BAD[bad](folder / "images/test/000001.png")
    with pytest.raises(ImageReadError, match="images/test/000001.png' is not a readable image"):
        folder_splits(folder, "train800", "val200", PREPROCESS)  # what build() calls before the model exists


def test_vtab_refuses_a_label_of_ten_to_the_twelve(tmp_path):
    folder = vtab_folder(tmp_path / "task")
    (folder / "train800.txt").write_text(f"images/train800/000000.png {10**12}\n")
    with pytest.raises(VTABFolderError, match=r"train800\.txt:1: label 1000000000000 is outside 0 \.\. 99999"):
        folder_splits(folder, "train800", "val200", PREPROCESS)


def test_vtab_output_dir_that_is_a_file_is_refused_before_anything_runs(tmp_path):
    blocking = tmp_path / "runs"
    blocking.write_text("a file")
    for output in (blocking, blocking / "vtab"):
        with pytest.raises(vtab.TrainerFlagError, match="runs' is a regular file, not a folder"):
            vtab.parse_args(["--task", "count", "--output-dir", str(output)])
    assert blocking.read_text() == "a file"


# ---------------------------------------------------------------------------------------------- DreamBooth
def test_dreambooth_loads_rotated_and_sixteen_bit_images_upright(tmp_path):
    upright = gradient(20, 30)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    rotated = sideways(tmp_path / "rotated.png", upright)
    assert db_images.image_sizes([rotated], 16) == db_images.image_sizes([tmp_path / "upright.png"], 16) \
        == [(20, 30, 0, 4)]  # SDXL's size conditioning: height 20, width 30, not swapped
    assert torch.equal(db_images.load_images([rotated], 16), db_images.load_images([tmp_path / "upright.png"], 16))
    path, values = grey16(tmp_path / "grey16.png")
    Image.fromarray(np.round(values / 257).astype(np.uint8)).save(tmp_path / "grey8.png")
    assert torch.equal(db_images.load_images([path], 16), db_images.load_images([tmp_path / "grey8.png"], 16))
