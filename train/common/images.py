"""Training images read as a person sees them in an image viewer, by both trainers (VTAB and DreamBooth).

- EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo stored sideways with an orientation tag
  is upright, and its height and width are the upright ones.
- 16-bit greyscale (PNG and TIFF open as ``I;16``, ``I;16B``, ``I`` ...) is scaled to 8 bits (``v / 257``, so 65535
  is 255); ``convert("RGB")`` would clip every value above 255, turning most of the image white. (``F`` images
  keep Pillow's own conversion; 16-bit RGB PNGs already open as 8-bit ``RGB``.)
- Transparency (``RGBA``, ``LA``, ``PA``, a palette or greyscale image with a transparent colour) is composited onto
  white, the background viewers and product shots use; dropping the alpha would show whatever colour the
  transparent pixels happen to store (often black).
- Everything else (palette, greyscale, CMYK, YCbCr ...) goes through Pillow's ``convert("RGB")``.

Any image that cannot be decoded (corrupt, truncated, not an image) is an :class:`ImageReadError` naming the file;
:func:`check_images` finds them all before training starts.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
BACKGROUND = (255, 255, 255)


class ImageReadError(ValueError):
    """An image file that cannot be read: the message names the file and the fix."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT:
        pixels = np.asarray(image, dtype=np.float64).clip(0, 65535)
        image = Image.fromarray(np.round(pixels / 257).astype(np.uint8))
    if image.mode in ("RGBA", "RGBa", "PA", "LA", "La") or (image.mode in ("P", "L", "RGB")
                                                             and "transparency" in image.info):
        canvas = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright, as a viewer shows it (see the module docstring)."""
    try:
        with Image.open(path) as image:
            return _to_rgb(ImageOps.exif_transpose(image))  # decodes the whole image: truncation shows here
    except Exception as error:  # noqa: BLE001  Pillow raises OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageReadError(f"{str(path)!r} is not a readable image ({type(error).__name__}: {error}); it may be "
                             "truncated, corrupt or of another format. Replace it or remove it (and its list "
                             "entry).") from error


def check_images(paths: list[Path]) -> list[tuple[int, int]]:
    """Read every image once, before any training, so that a bad one fails the run at its start with its name,
    not hours later; returns each image's upright (height, width)."""
    sizes = []
    for path in paths:
        width, height = read_rgb(path).size
        sizes.append((height, width))
    return sizes
