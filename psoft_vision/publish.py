"""push_to_hub: a trainer's output folder, or a model's adapter saved with its model card, uploaded to a hub model
repository. It sits above the adapter files (:mod:`psoft_vision.io`), the cards (:mod:`psoft_vision.card`) and the
hub's names and transfers (:mod:`psoft_vision.hub`), which it puts together."""

import tempfile
from pathlib import Path

from torch import nn

from .card import write_adapter_card
from .errors import HubError
from .hub import DEFAULT_WEIGHT_NAME, create_repo, upload_folder
from .io import save_adapter


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
        save_adapter(model_or_folder, Path(folder) / weight_name, name=name)
        write_adapter_card(model_or_folder, Path(folder) / weight_name, repo_id=repo_id, base_model=base_model)
        return upload_folder(folder, repo_id, token, commit_message, ignore_patterns)
