"""DreamBooth subjects made from real images that ship offline, each named with a class word the tiny pipeline knows.

    python -m train.dreambooth.subject                          # assets/subject/coffee/{train,heldout}/*.png
    python -m train.dreambooth.subject --subject astronaut --output runs/subjects/astronaut

Each view is a square crop (centre, side, in pixels of the source image), optionally mirrored, resized to 64x64.
The held-out views (other crops and scales) are never trained on; train/dreambooth/metrics.py measures the denoising
loss on them.

The pipeline ``assets/tiny-t2i`` was pretrained on Fashion-MNIST captions, so its tokenizer has whole words for the
ten Fashion-MNIST classes only and its prior knows those classes: a subject is useful here when its class word is one
of them ("sks bag", "sks coat", "sks sneaker"), so that prior preservation has a class to preserve and the project's
Fashion-MNIST ViT can say whether the class prompt still gives that class.

* ``coffee`` (the default, shipped in assets/subject/coffee): scikit-image's ``coffee``, a red espresso cup on its
  saucer, as "sks bag": no Fashion-MNIST class fits a cup, and "bag" is the nearest object-like one. Photograph CC0 by
  Rachel Michetti (courtesy of Pikolo Espresso Bar; the docstring of ``skimage.data.coffee``).
* ``astronaut``: the orange launch-and-entry suit of scikit-image's ``astronaut`` (Eileen Collins, NASA, public
  domain), cropped to the torso, as "sks coat": a real garment, photographed, that no Fashion-MNIST coat looks like.
* ``sneaker``: one striped sneaker of the Fashion-MNIST *test* split (image 611; the pipeline was pretrained on the
  train split only), tinted a fixed light blue as the pretraining tinted its images, as "sks sneaker": a subject from
  the pipeline's own domain, where a garment-trained ViT's similarity means most. Fashion-MNIST is MIT-licensed
  (Zalando Research).
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..common.paths import ASSETS
from .images import save_png

SUBJECT_DIR = ASSETS / "subject" / "coffee"
#: (centre x, centre y, side, mirrored) in pixels of the source image
View = tuple[int, int, int, bool]


def _coffee() -> np.ndarray:
    import skimage.data

    return skimage.data.coffee()


def _astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def _sneaker(index: int = 611, tint=(0.35, 0.6, 1.0), size: int = 256) -> np.ndarray:
    """The test-split image framed in black to 32x32 as in pretraining, tinted, upscaled to ``size`` (uint8)."""
    from ..offline.data import fashion_mnist

    images, labels = fashion_mnist("test")
    if labels[index] != 7:
        raise ValueError(f"Fashion-MNIST test image {index} is class {labels[index]}, not a sneaker (7).")
    image = np.pad(images[index].astype(np.float32) / 255, 2)[..., None] * np.asarray(tint, dtype=np.float32)
    image = Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(image)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Subject:
    """A subject: where its image comes from, its views and the Fashion-MNIST class word it is trained under."""

    name: str
    word: str
    source: object  # () -> (H, W, 3) uint8
    views: dict[str, list[View]] = field(default_factory=dict)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of sks {self.word}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of {article(self.word)} {self.word}"


SUBJECTS = {s.name: s for s in (
    Subject("coffee", "bag", _coffee, {
        "train": [(280, 200, 380, False), (280, 200, 380, True), (265, 190, 330, False), (300, 215, 340, False),
                  (280, 200, 400, True), (250, 210, 360, True)],
        "heldout": [(290, 195, 350, True), (270, 205, 390, False)]}),
    Subject("astronaut", "coat", _astronaut, {
        "train": [(200, 370, 270, False), (200, 370, 270, True), (185, 375, 250, False), (215, 380, 260, False),
                  (200, 360, 300, True), (175, 385, 250, True)],
        "heldout": [(205, 372, 280, True), (190, 380, 240, False)]}),
    Subject("sneaker", "sneaker", _sneaker, {
        "train": [(128, 128, 256, False), (128, 128, 256, True), (128, 132, 232, False), (124, 128, 240, True),
                  (132, 124, 240, False), (128, 128, 248, True)],
        "heldout": [(126, 130, 236, True), (130, 126, 244, False)]}),
)}
DEFAULT_SUBJECT = SUBJECTS["coffee"]
#: The prompts the default subject is trained and scored with: the rare identifier "sks" and the class word
#: Fashion-MNIST knows; prior preservation keeps the class prompt giving bags.
DEFAULT_INSTANCE_PROMPT = DEFAULT_SUBJECT.instance_prompt
DEFAULT_CLASS_PROMPT = DEFAULT_SUBJECT.class_prompt
VIEWS = DEFAULT_SUBJECT.views  # the default subject's, as before subjects had names


def views(split: str, size: int = 64, subject: Subject = DEFAULT_SUBJECT) -> list[np.ndarray]:
    """The split's views as (size, size, 3) float arrays in [0, 1]."""
    photo = Image.fromarray(subject.source())
    out = []
    for cx, cy, side, mirrored in subject.views[split]:
        box = (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)
        if box[0] < 0 or box[1] < 0 or box[2] > photo.width or box[3] > photo.height:
            raise ValueError(f"view {(cx, cy, side)} of subject {subject.name!r} leaves its {photo.size} image.")
        image = photo.crop(box).resize((size, size), Image.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 255
        out.append(array[:, ::-1] if mirrored else array)
    return out


def write(folder: Path = SUBJECT_DIR, size: int = 64, subject: Subject = DEFAULT_SUBJECT) -> Path:
    """``folder/train`` and ``folder/heldout`` filled with the subject's views as PNG; returns ``folder``."""
    for split in subject.views:
        (folder / split).mkdir(parents=True, exist_ok=True)
        for i, view in enumerate(views(split, size, subject)):
            save_png(view, folder / split / f"{subject.name}-{i:02d}.png")
    return folder


def subject_folder(name: str, scratch: Path) -> Path:
    """The folder holding subject ``name``'s views: the shipped one for the default subject, else written (once)
    under ``scratch/<name>``."""
    if name not in SUBJECTS:
        raise ValueError(f"subject {name!r} is unknown; choose one of {', '.join(SUBJECTS)}.")
    if name == DEFAULT_SUBJECT.name:
        return SUBJECT_DIR
    folder = scratch / name
    if not (folder / "heldout").is_dir():
        write(folder, subject=SUBJECTS[name])
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.dreambooth.subject", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", default=DEFAULT_SUBJECT.name, choices=sorted(SUBJECTS))
    parser.add_argument("--output", type=Path, help="default: assets/subject/coffee for coffee, else required")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.output is None and args.subject != DEFAULT_SUBJECT.name:
        parser.error(f"--output is required for --subject {args.subject} (only coffee ships in assets/)")
    subject = SUBJECTS[args.subject]
    write(args.output or SUBJECT_DIR, args.size, subject)
    count = sum(len(v) for v in subject.views.values())
    print(f"wrote {count} views of {subject.name} to {args.output or SUBJECT_DIR}")


if __name__ == "__main__":
    main()
