"""What both trainers do with the Hugging Face hub: the upload flags, the repository made before training (so that a
token or name that does not work fails in seconds, not after the run), and the output folder uploaded at the end
with its model card (psoft_vision/card.py)."""

import argparse
from pathlib import Path

from psoft_vision import hub

#: Not uploaded: the resume checkpoint (optimiser state; the adapter files are the result), generated class images,
#: and temporaries of interrupted writes.
NOT_UPLOADED = ["checkpoint/**", "class_images/**", "*.psoft-tmp"]
#: Arguments a resume may change: where the result goes, not what is trained.
MAY_DIFFER = frozenset({"push_to_hub", "hub_model_id", "cache_dir"})


def add_hub_args(group: argparse._ArgumentGroup, dashed: bool) -> None:
    """``--push_to_hub``, ``--hub_model_id``, ``--hub_token`` (diffusers' names; with ``dashed``, ``--push-to-hub``
    and so on first, the underscored names as aliases)."""
    def flags(name: str) -> list[str]:
        return [f"--{name.replace('_', '-')}", f"--{name}"] if dashed else [f"--{name}"]

    group.add_argument(*flags("push_to_hub"), dest="push_to_hub", action="store_true",
                       help="upload the output folder (adapters, LoRA files, model card, metrics, validation images; "
                            f"not {', '.join(NOT_UPLOADED[:2])}) to a hub model repository at the end")
    group.add_argument(*flags("hub_model_id"), dest="hub_model_id", help="the repository: org/name, or a name under "
                       "your user (default: the output folder's name)")
    group.add_argument(*flags("hub_token"), dest="hub_token", help="a hub token with write access (default: the "
                       "login's, `hf auth login`, or HF_TOKEN); never written to any file")


def start_repo(args, is_main: bool) -> str | None:
    """With --push_to_hub, the repository (created if missing) on the main process: its full id."""
    if not (args.push_to_hub and is_main):
        return None
    return hub.create_repo(args.hub_model_id or Path(args.output_dir).name, token=args.hub_token)


def publish(output_dir: Path, repo_id: str | None, args) -> str | None:
    """Upload the output folder as it is (less NOT_UPLOADED) to ``repo_id``; returns the commit URL."""
    if repo_id is None:
        return None
    return hub.upload_folder(output_dir, repo_id, token=args.hub_token, ignore_patterns=NOT_UPLOADED,
                             commit_message=f"psoft-vision: {args.method} run {Path(output_dir).name}")
