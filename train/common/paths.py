"""Where the project's shipped assets live."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"
#: The offline text-to-image pipeline (a tiny Stable Diffusion), trained by ``python -m train.offline.pretrain_t2i``.
TINY_T2I = ASSETS / "tiny-t2i"
