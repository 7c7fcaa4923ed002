"""The default DreamBooth subject: views of scikit-image's ``coffee`` photograph (a red espresso cup on its saucer).

    python -m train.dreambooth.subject   # writes assets/subject/coffee/{train,heldout}/*.png (64x64)

Each view is a square crop (centre, side) of the 400x600 photograph, optionally mirrored, resized to 64x64.
The held-out views (other crops and scales) are never trained on; train/dreambooth/metrics.py measures the denoising
loss on them. The photograph (courtesy of Pikolo Espresso Bar) is CC0 by the photographer, Rachel Michetti (the
docstring of ``skimage.data.coffee``).
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from ..common.paths import ASSETS
from .images import save_png

SUBJECT_DIR = ASSETS / "subject" / "coffee"
#: The prompts the subject is trained and scored with: the rare identifier "sks" and the class word Fashion-MNIST
#: knows; prior preservation keeps the class prompt giving bags.
DEFAULT_INSTANCE_PROMPT = "a photo of sks bag"
DEFAULT_CLASS_PROMPT = "a photo of a bag"
#: (centre x, centre y, side, mirrored) in pixels of the 400x600 photograph
VIEWS = {
    "train": [(280, 200, 380, False), (280, 200, 380, True), (265, 190, 330, False), (300, 215, 340, False),
              (280, 200, 400, True), (250, 210, 360, True)],
    "heldout": [(290, 195, 350, True), (270, 205, 390, False)],
}


def views(split: str, size: int = 64) -> list[np.ndarray]:
    """The split's views as (size, size, 3) float arrays in [0, 1]."""
    import skimage.data

    photo = Image.fromarray(skimage.data.coffee())
    out = []
    for cx, cy, side, mirrored in VIEWS[split]:
        box = (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)
        image = photo.crop(box).resize((size, size), Image.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 255
        out.append(array[:, ::-1] if mirrored else array)
    return out


def write(folder: Path = SUBJECT_DIR, size: int = 64) -> None:
    for split in VIEWS:
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i, view in enumerate(views(split, size)):
            save_png(view, folder / split / f"coffee-{i:02d}.png")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.dreambooth.subject", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=SUBJECT_DIR)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    write(args.output, args.size)
    print(f"wrote {sum(len(v) for v in VIEWS.values())} views to {args.output}")


if __name__ == "__main__":
    main()
