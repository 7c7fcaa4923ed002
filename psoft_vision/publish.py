"""Saving to share: ``save_adapter`` (an adapter file, and with ``model_card=True`` its model card beside it) and
``push_to_hub`` (a trainer's output folder, or a model's adapter with its card, uploaded to a hub model repository).
It sits above the adapter files (:mod:`psoft_vision.formats.native`), the cards (:mod:`psoft_vision.card`, which
read adapter files) and the hub's names and transfers (:mod:`psoft_vision.hub`), which it puts together."""

import os
import tempfile
from pathlib import Path

from torch import nn

from .card import write_adapter_card
from .errors import HubError
from .formats.native import write_adapter_file
from .hub import DEFAULT_WEIGHT_NAME, create_repo, upload_folder


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 include_bases: bool = False, anchors: bool = True, model_card: bool = False) -> Path:
    """Write adapter ``name`` (optional when there is one), its strength and its ``train_modules`` weights.

    ``anchors`` (default) stores each adapter's anchors: PSOFT's is a sketch of its subspace (``8 r^2`` bytes per
    layer) that lets :func:`psoft_vision.load_adapter` rebuild the subspace the adapter was trained in on a copy of
    the base in another precision (bf16, fp16). ``include_bases=True`` stores the subspace itself instead (``A`` and
    ``B``, as large as the layer's input plus output width times r), for bit-exact reloads anywhere.
    ``model_card=True`` also writes README.md beside the file (:func:`psoft_vision.card.write_adapter_card`): the
    folder is then a hub repository, ready for :func:`push_to_hub`.
    """
    path = write_adapter_file(model, path, name, include_bases, anchors)
    if model_card:
        write_adapter_card(model, path)
    return path


def push_to_hub(model_or_folder, repo_id: str, *, name: str | None = None, weight_name: str = DEFAULT_WEIGHT_NAME,
                token: str | None = None, private: bool | None = None, commit_message: str | None = None,
                ignore_patterns: list[str] | None = None, base_model: str | None = None) -> str:
    """Upload to hub model repository ``repo_id`` (created if missing); returns the commit URL.

    A folder (a trainer's output folder) is uploaded as it is, less ``ignore_patterns``. A model: its adapter
    ``name`` is saved as ``weight_name`` with a model card (README.md; ``base_model``: the hub id it was trained
    on, when the model does not tell) in a temporary folder, and that folder is uploaded.
    """
    if not isinstance(model_or_folder, nn.Module):
        folder = Path(model_or_folder)
        if not folder.is_dir():
            raise HubError(f"push_to_hub: {str(folder)!r} is not a folder; pass an output folder or a model with "
                           "an adapter.")
        return upload_folder(folder, create_repo(repo_id, token, private), token, commit_message, ignore_patterns)
    repo_id = create_repo(repo_id, token, private)
    with tempfile.TemporaryDirectory(prefix="psoft-vision-push-") as folder:
        write_adapter_file(model_or_folder, Path(folder) / weight_name, name=name)
        write_adapter_card(model_or_folder, Path(folder) / weight_name, repo_id=repo_id, base_model=base_model)
        return upload_folder(folder, repo_id, token, commit_message, ignore_patterns)
