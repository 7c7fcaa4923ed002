"""What DreamBooth runs changed in the denoiser, per layer type (attn, ff, proj), to say why one method scores as it
does: how far each moved its weights, how much of that change lies in each weight's top-r principal subspace (all
that PSOFT's rotation can reach), the spectrum (the weight's energy in its top r directions) and, for PSOFT, the
trained scaling vectors' ranges.

    python -m train.dreambooth.diagnose RUN_DIR [RUN_DIR ...] [--rank 16]

Each run is a ``python -m train.dreambooth`` output folder (ours: ``adapter.safetensors``; PEFT LoRA: ``lora/``).
Its adapted weights are formed by merging (ours) or fusing (LoRA) and compared with the base pipeline's.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

import psoft_vision as pv

from .metrics import load_adapted
from .ranks import TYPES, module_type


def matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear's or 1x1 conv's weight as (out, in), fp64."""
    return weight.detach().reshape(weight.shape[0], -1).double()


def weights(unet: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: matrix(unet.get_submodule(name).weight) for name in names}


def adapted_weights(run: Path, pipeline: str, base: nn.Module
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """``(base weights, adapted weights, {layer: {"alpha": ..., "beta": ...}})`` of the layers the run adapted, ``base``
    being the pipeline's UNet; the scaling vectors are PSOFT's (none for other methods)."""
    pipe = load_adapted(pipeline, run)
    unet = pipe.unet
    if (run / "adapter.safetensors").is_file():
        layers = dict(pv.adapted_layers(unet))
        adapters = {name: next(iter(layer.adapters.values())) for name, layer in layers.items()}
        scalings = {name: {p: getattr(a, p).detach().clone() for p in ("alpha", "beta") if getattr(a, p, None)
                           is not None} for name, a in adapters.items()}
        pv.merge(unet)
        names = list(layers)
    else:
        names = sorted({k.split(".lora_A")[0] for k, _ in unet.named_parameters() if ".lora_A." in k})
        scalings = {}
        pipe.fuse_lora()
    adapted = {}
    for name in names:
        module = unet.get_submodule(name)
        adapted[name] = matrix(getattr(module, "base_layer", module).weight)
    return weights(base, names), adapted, scalings


def subspace_share(base: torch.Tensor, delta: torch.Tensor, rank: int) -> float:
    """The share of ``delta``'s squared norm inside ``base``'s top-``rank`` left and right singular directions."""
    u, _, vh = torch.linalg.svd(base, full_matrices=False)
    inside = u[:, :rank].T @ delta @ vh[:rank].T
    return (inside.square().sum() / delta.square().sum().clamp_min(1e-30)).item()


def energy(base: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(base).square()
    return (s[:rank].sum() / s.sum()).item()


def diagnose(run: Path, rank: int, pipeline: str) -> dict:
    """Per layer type: layers, mean relative weight change, mean share of the change inside the top-``rank``
    subspace, mean energy of the top-``rank`` directions, and (PSOFT) the scaling vectors' range."""
    unet = load_adapted(pipeline, None).unet
    base, adapted, scalings = adapted_weights(run, pipeline, unet)
    rows = defaultdict(lambda: defaultdict(list))
    for name, weight in base.items():
        kind = module_type(unet, name)
        delta = adapted[name] - weight
        row = rows[kind]
        row["change"].append((delta.norm() / weight.norm()).item())
        row["in_subspace"].append(subspace_share(weight, delta, rank))
        row["energy"].append(energy(weight, rank))
        for p, value in scalings.get(name, {}).items():
            row[p].extend(value.flatten().tolist())
    summary = {}
    for kind in TYPES:
        if kind not in rows:
            continue
        row = rows[kind]
        summary[kind] = {"layers": len(row["change"]), **{k: float(np.mean(row[k])) for k in
                                                          ("change", "in_subspace", "energy")}}
        for p in ("alpha", "beta"):
            if row[p]:
                summary[kind][p] = (float(np.min(row[p])), float(np.max(row[p])))
    return summary


def table(results: dict[str, dict], rank: int | None) -> str:
    r = rank or "r"
    lines = [f"| run | type | layers | relative change of W | share of the change in the top-{r} subspace | "
             f"energy of the top {r} | alpha range | beta range |", "|---|---|--:|--:|--:|--:|---|---|"]
    for run, summary in results.items():
        for kind, row in summary.items():
            ranges = [f"{row[p][0]:.3f} to {row[p][1]:.3f}" if p in row else "-" for p in ("alpha", "beta")]
            lines.append(f"| {run} | {kind} | {row['layers']} | {row['change']:.4f} | {row['in_subspace']:.3f} | "
                         f"{row['energy']:.3f} | {' | '.join(ranges)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m train.dreambooth.diagnose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--rank", type=int, help="the subspace rank to measure against (default: each run's --rank, "
                        "the PSOFT rank it trained with or would have)")
    args = parser.parse_args(argv)
    results = {}
    for run in args.runs:
        run_args = json.loads((run / "metrics.json").read_text())["args"]
        results[str(run)] = diagnose(run, args.rank or run_args["rank"], run_args["pretrained_model_name_or_path"])
    print(table(results, args.rank))
    return results


if __name__ == "__main__":
    main()
