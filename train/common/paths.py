"""Where the project's shipped assets live."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"
#: The offline text-to-image pipeline (a tiny Stable Diffusion), trained by ``python -m train.offline.pretrain_t2i``.
TINY_T2I = ASSETS / "tiny-t2i"


def run_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot become a run folder (it, or a folder above it, is a file or a device), or None: asked
    before a run starts, so that it fails at once instead of at its first save."""
    from psoft_vision.files import kind_of

    for path in (folder, *folder.parents):
        kind = kind_of(path)
        if kind == "a directory":
            return None
        if kind != "nothing":
            return f"{str(path)!r} is {kind}, not a folder"
    return None
