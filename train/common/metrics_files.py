"""A run's ``metrics.json`` and ``metrics.csv``, each written whole or not at all."""

import csv
import json
from pathlib import Path

from psoft_vision.files import atomic_write


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per dict, the columns those of the first row."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


#: Arguments never written to a file (metrics.json and the checkpoint are uploaded with --push_to_hub).
SECRETS = frozenset({"hub_token"})


def recorded_args(args) -> dict:
    """Parsed arguments as metrics.json records them: paths as strings, secrets left out."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in SECRETS}
