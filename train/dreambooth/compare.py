"""Ours PSOFT, ours OFTv2 and PEFT LoRA on several DreamBooth subjects and seeds, with the same data and steps, each
method at its searched best.

    python -m train.dreambooth.compare --out runs/dreambooth-compare --doc docs/dreambooth_offline.md --jobs 2
    python -m train.dreambooth.compare --subjects coffee --seeds 0 --ship    # the default run only, then ship it

The rows come from the search's record (``--search``, written by ``python -m train.dreambooth.search``): each method
at its lowest held-out loss; PSOFT or LoRA at the other's parameter count, and PSOFT with no more than half LoRA's
parameters, where those are other sizes. Without a record, each method runs at the trainer's defaults (the searched
values).

Each run trains in its own process (``python -m train.dreambooth`` with the row's flags and the subject's prompts,
so the PSOFT run on coffee with seed 0 is exactly the default run), which makes the peak resident memory its own.
Class images are generated once per subject (by its seed-0 run) and shared by every method and seed, so the seeds
vary the training draws alone. Then train/dreambooth/metrics.py scores the base model and every run of a subject on
the same sampling seeds. Writes ``<out>/compare.json`` (every number of every run), markdown tables of the mean and
standard deviation over seeds per subject and over subjects (``--doc``; the hand-written part after
"## What the samples show" is kept when the file is rewritten), a sample grid per subject beside it, and with
``--ship`` copies the default run's PSOFT adapter and its LoRA export to ``assets/``.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.paths import ASSETS
from . import search
from .images import image_grid, list_images, load_images, save_png
from .metrics import NUMBERS, evaluate_runs
from .metrics import build_parser as metrics_parser
from .subject import DEFAULT_SUBJECT, SUBJECTS, subject_folder

SEARCH = ASSETS.parent / "docs" / "dreambooth_search.json"
COLUMNS = (("subject_sim", "subject sim ↑"), ("colour_dist", "colour dist ↓"),
           ("heldout_loss", "held-out loss ↓"), ("class_acc", "class acc"),
           ("class_drift", "class drift ↓"), ("diversity", "diversity"))
COSTS = (("trainable", "trainable"), ("train_s", "train s"), ("peak_mib", "peak MiB"))
PROSE = "## What the samples show"


@dataclass(frozen=True)
class Row:
    """One row of the comparison: a method with the trainer flags of its configuration (none: the defaults)."""

    key: str  # the row's run folders are named after it
    method: str
    label: str
    flags: tuple[str, ...] = ()


DEFAULT_ROWS = (Row("psoft", "psoft", "ours PSOFT"), Row("oft", "oft", "ours OFTv2"), Row("lora", "lora", "PEFT LoRA"))


#: Variants of one row, for --ablate: which layer types it adapts, and the Neumann series for the exact Cayley.
ABLATIONS = {"attn": ("attention only", ("--lora_layers", "attn")),
             "ff": ("feed-forward only", ("--lora_layers", "ff")),
             "proj": ("proj_in/proj_out only", ("--lora_layers", "proj")),
             "neumann": ("Cayley-Neumann, 4 terms", ("--neumann_terms", "4"))}


def ablation_rows(row: Row) -> tuple[Row, ...]:
    """``row`` and each of its :data:`ABLATIONS` (the Neumann one for our methods only)."""
    variants = [Row(f"{row.key}-{key}", row.method, f"{row.label}, {label}", row.flags + flags)
                for key, (label, flags) in ABLATIONS.items() if key != "neumann" or row.method != "lora"]
    return (row, *variants)


def budget_rows(best: dict, losses: dict, trainable: dict, row) -> list[Row]:
    """PSOFT or LoRA at the size whose parameter count is nearest the other's best (whichever comes nearer, at its
    best learning rate there), and PSOFT's best with at most half LoRA's count, where those are other sizes."""
    mismatch = lambda c, target: abs(math.log(trainable[c] / target))  # noqa: E731
    matched = []
    for method, other in (("psoft", "lora"), ("lora", "psoft")):
        target = trainable[best[other]]
        config = min((c for c in losses if c.method == method), key=lambda c: (mismatch(c, target), losses[c]))
        if config.size != best[method].size:
            matched.append((mismatch(config, target), config, other))
    rows, taken = [], {(c.method, c.size) for c in best.values()}
    if matched:
        _, config, other = min(matched, key=lambda m: m[0])
        rows.append(row(f"{config.method}-budget", config, f" ({search.LABELS[other].split()[-1]}'s parameter count)"))
        taken.add((config.method, config.size))
    half = min((c for c in losses if c.method == "psoft" and trainable[c] <= trainable[best["lora"]] / 2),
               key=losses.get, default=None)
    if half is not None and ("psoft", half.size) not in taken:
        rows.append(row("psoft-half", half, " (at most half LoRA's parameters)"))
    return rows


def searched_rows(path: Path) -> tuple[Row, ...]:
    """Each method of the search's record at its lowest mean held-out loss, and the rows of :func:`budget_rows`."""
    records = json.loads(path.read_text())["runs"]
    losses = {config: np.mean(values) for config, values in search.losses_of(records).items()}
    trainable = {search.config_of(r): r["trainable"] for r in records.values()}
    methods = sorted({c.method for c in losses}, key=list(search.CENTRES).index)  # ours first, as the search
    best = {m: min((c for c in losses if c.method == m), key=losses.get) for m in methods}

    def row(key: str, config: search.Config, note: str = "") -> Row:
        label = f"{search.LABELS[config.method]} {config.size_label}{note}"
        return Row(key, config.method, label, (*config.size, "--learning_rate", f"{config.lr:g}"))

    rows = [row(m, c) for m, c in best.items()]
    if "lora" in best and "psoft" in best:
        rows += budget_rows(best, losses, trainable, row)
    return tuple(rows)


def train(method: str, folder: Path, class_dir: Path, extra: list[str], threads: int | None = None) -> dict:
    """One run of ``python -m train.dreambooth`` in its own process (with ``threads`` intra-op threads, else
    torch's default); returns its metrics.json plus the wall time."""
    command = [sys.executable, "-m", "train.dreambooth", "--method", method, "--output_dir", str(folder),
               "--class_data_dir", str(class_dir), "--quiet", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["wall_s"] = round(time.perf_counter() - start, 1)
    return metrics


def run_folder(out: Path, subject: str, seed: int, method: str) -> Path:
    return out / subject / f"seed{seed}" / method


def train_one(args, name: str, seed: int, row: Row) -> dict:
    run = run_folder(args.out, name, seed, row.key)
    if args.reuse and (run / "metrics.json").is_file():
        return json.loads((run / "metrics.json").read_text())
    subject, folder = SUBJECTS[name], subject_folder(name, args.out / "subjects")
    extra = ["--instance_data_dir", str(folder / "train"), "--instance_prompt", subject.instance_prompt,
             "--class_prompt", subject.class_prompt, "--seed", str(seed), *row.flags, *args.extra]
    return train(row.method, run, args.out / name / "class_images", extra, threads=1 if args.jobs > 1 else None)


def train_all(args) -> dict[tuple[str, int, str], dict]:
    """Every (subject, seed, row) run, ``--jobs`` at a time (one thread each when more than one), by row key. Each
    subject's seed-0 run of the first row goes first, alone for its subject: it generates the class images the
    others share."""
    from concurrent.futures import ThreadPoolExecutor

    for name in args.subjects:  # written once, before any run reads them
        subject_folder(name, args.out / "subjects")
    first = [(name, min(args.seeds), args.rows[0]) for name in args.subjects]
    rest = [(name, seed, row) for seed in sorted(args.seeds) for name in args.subjects for row in args.rows
            if (name, seed, row) not in first]
    trained = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for jobs in (first, rest):
            runs = pool.map(lambda job: train_one(args, *job), jobs)
            trained.update({(name, seed, row.key): run for (name, seed, row), run in zip(jobs, runs, strict=True)})
    return trained


def score_subject(args, name: str) -> dict:
    """``{"base": scores, (seed, method): scores}`` for one subject, all on the same sampling seeds."""
    subject, folder = SUBJECTS[name], subject_folder(name, args.out / "subjects")
    margs = metrics_parser().parse_args([
        "--num_samples", str(args.num_samples), "--heldout_dir", str(folder / "heldout"),
        "--instance_prompt", subject.instance_prompt, "--class_prompt", subject.class_prompt,
        "--class_word", subject.word])
    keys = [(seed, row.key) for seed in sorted(args.seeds) for row in args.rows]
    results = evaluate_runs([run_folder(args.out, name, *key) for key in keys], margs)
    scores = {"base": results["base"]}
    scores.update({key: results[str(run_folder(args.out, name, *key))] for key in keys})
    return dict(scores, margs=margs)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(scores: dict, trained: dict, seeds: list[int], rows: tuple[Row, ...], search_subject: str | None
              ) -> dict:
    """``{group: {row key: {metric: (mean, std)}}}`` for each subject, "all" and, when the search subject is among
    them, "unsearched" (the others); a group of several subjects averages each seed's run over them first, so its
    spread is over seeds too."""
    subjects = list(scores)
    per_seed = {}  # (subject, method, seed) -> {metric: value}
    for name in subjects:
        for seed in seeds:
            per_seed[name, "base", seed] = {k: scores[name]["base"][k] for k in NUMBERS}
            for row in rows:
                numbers = {k: scores[name][seed, row.key][k] for k in NUMBERS}
                numbers.update({k: trained[name, seed, row.key][k] for k, _ in COSTS})
                per_seed[name, row.key, seed] = numbers
    groups = {name: [name] for name in subjects} | {"all": subjects}
    if search_subject in subjects and len(subjects) > 1:
        groups["unsearched"] = [name for name in subjects if name != search_subject]
    summary = {}
    for group, members in groups.items():
        summary[group] = {}
        for method in ["base", *(row.key for row in rows)]:
            keys = list(per_seed[members[0], method, seeds[0]])
            summary[group][method] = {k: mean_std([np.mean([per_seed[s, method, seed][k] for s in members])
                                                   for seed in seeds]) for k in keys}
    return dict(summary, runs={f"{s}/seed{seed}/{m}": v for (s, m, seed), v in per_seed.items()})


def cell(value: tuple[float, float], digits: int = 3) -> str:
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(group: dict, rows: tuple[Row, ...]) -> str:
    """One markdown table: a line per row (mean ± std over seeds), the costs without decimals."""
    labels = {"base": "base model", **{row.key: row.label for row in rows}}
    head = ["method", *(label for _, label in COSTS), *(label for _, label in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, numbers in group.items():
        costs = [f"{numbers[k][0]:,.0f}" if k in numbers else "-" for k, _ in COSTS]
        lines.append("| " + " | ".join([labels[key], *costs, *(cell(numbers[k]) for k, _ in COLUMNS)]) + " |")
    return "\n".join(lines)


def upscale(grid: np.ndarray, factor: int) -> np.ndarray:
    return grid.repeat(factor, axis=0).repeat(factor, axis=1)


def write_grids(doc: Path, name: str, scores: dict, seed: int, scratch: Path, rows: tuple[Row, ...]
                ) -> tuple[str, str]:
    """The seed-``seed`` sample grid and the training views of one subject, beside ``doc``; their file names."""
    to_hwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    order = [scores["base"], *(scores[seed, row.key] for row in rows)]
    grid = image_grid([to_hwc(s["instance_samples"]) for s in order] + [to_hwc(s["class_samples"]) for s in order])
    samples = doc.with_name(f"{doc.stem}_samples_{name}.png")
    save_png(upscale(grid, 3), samples)
    folder = subject_folder(name, scratch)
    views = (load_images(list_images(folder / "train", "subject"), 32) + 1) / 2
    subject = doc.with_name(f"{doc.stem}_subject_{name}.png")
    save_png(upscale(image_grid([to_hwc(views)]), 3), subject)
    return samples.name, subject.name


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m train.dreambooth.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/dreambooth-compare"))
    parser.add_argument("--subjects", type=lambda s: s.split(","), default=list(SUBJECTS),
                        help=f"comma-separated, from {', '.join(SUBJECTS)} (default: all)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--doc", type=Path, help="write the markdown tables here, and the sample grids beside it")
    parser.add_argument("--ship", action="store_true",
                        help="copy the default run's PSOFT adapter and LoRA into assets/")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose metrics.json exists")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, one thread each when more than one")
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--ablate", choices=[row.key for row in DEFAULT_ROWS],
                        help="instead of the methods side by side: this one's row and its variants (attention, "
                        "feed-forward or proj_in/out layers only; Cayley-Neumann)")
    parser.add_argument("--search", type=Path, default=SEARCH,
                        help="the search's record of runs to take each method's configuration from (default: "
                        "docs/dreambooth_search.json); 'none': the trainer's defaults")
    parser.add_argument("extra", nargs="*", help="more train.dreambooth arguments (after --), for every run")
    args = parser.parse_args(argv)
    unknown = [s for s in args.subjects if s not in SUBJECTS]
    if unknown:
        parser.error(f"--subjects {unknown} unknown; choose from {', '.join(SUBJECTS)}")

    searched = args.search.name != "none"
    args.rows = searched_rows(args.search) if searched else DEFAULT_ROWS
    if args.ablate:
        args.rows = ablation_rows(next(row for row in args.rows if row.key == args.ablate))
    args.search_subject = json.loads(args.search.read_text())["subject"] if searched else None
    trained = train_all(args)
    scores = {name: score_subject(args, name) for name in args.subjects}
    summary = summarise(scores, trained, sorted(args.seeds), args.rows, args.search_subject)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(dict(summary, rows=[row.label for row in args.rows]), indent=1))
    for group in summary:
        if group != "runs":
            print(f"\n{group}\n{table(summary[group], args.rows)}")
    if args.doc:
        grids = {name: write_grids(args.doc, name, scores[name], min(args.seeds), args.out / "subjects", args.rows)
                 for name in args.subjects}
        kept = args.doc.read_text().partition(PROSE)[2] if args.doc.is_file() else ""
        args.doc.write_text(document(args, summary, grids, trained, scores) + (kept or "\n\n(See below.)\n"))
    if args.ship:
        ship(run_folder(args.out, DEFAULT_SUBJECT.name, 0, "psoft"))
    return summary


def ship(run: Path) -> None:
    from psoft_vision.formats.names import DIFFUSERS_WEIGHT_NAME

    shutil.copyfile(run / "adapter.safetensors", ASSETS / "dreambooth-psoft.safetensors")
    lora = run / "lora" / DIFFUSERS_WEIGHT_NAME
    if lora.stat().st_size < 2 * 2**20:  # r=32 exports 1.6 MB; a bigger one would bloat the repository
        shutil.copyfile(lora, ASSETS / "dreambooth-psoft-lora.safetensors")


def size_text(method: str, a: dict) -> str:
    """A run's size, from its recorded arguments."""
    if method == "psoft":
        scalings = a.get("train_alpha") is not False or a.get("train_beta") is not False
        return f"r={a['rank']}" + ("" if scalings else " without the scaling vectors")
    return f"block size {a['block_size']}" if method == "oft" else f"r={a['lora_rank']} (alpha {a['lora_rank']})"


def settings(trained: dict, rows: tuple[Row, ...], searched: bool) -> str:
    a = next(iter(trained.values()))["args"]
    run_args = {row.key: next(v for (_, _, key), v in trained.items() if key == row.key)["args"] for row in rows}
    each = "; ".join(f"{row.label}{'' if row.flags else ' ' + size_text(row.method, run_args[row.key])} at lr "
                     f"{run_args[row.key]['learning_rate']:g}" for row in rows)
    source = ("each method at its lowest held-out loss in [the search](dreambooth_search.md)" if searched else
              "the trainer's defaults")
    return (f"{a['max_train_steps']} steps, batch {a['train_batch_size']} instance + {a['train_batch_size']} class "
            f"images, prior loss weight {a['prior_loss_weight']}, {a['num_class_images']} class images per subject, "
            f"resolution {a['resolution']}, AdamW with {a['lr_warmup_steps']} warm-up steps and a "
            f"{a.get('lr_scheduler', 'cosine')} schedule; {source}: {each}; every row on the layers of the "
            f"`{a['targets']}` target preset (the UNet's attention, feed-forward and proj_in/proj_out)")


def searched_note(args) -> str:
    if args.search_subject is None:
        return ""
    return (f" `{args.search_subject}` is the search subject: its held-out views chose the settings, so "
            "\"unsearched\" averages the other subjects alone.")


def document(args, summary: dict, grids: dict, trained: dict, scores: dict) -> str:
    seeds = sorted(args.seeds)
    margs = next(iter(scores.values()))["margs"]
    title = f"{args.rows[0].label}: ablations" if args.ablate else "ours PSOFT, ours OFTv2 and PEFT LoRA"
    parts = [f"""# DreamBooth offline: {title} on {len(args.subjects)} subjects x \
{len(seeds)} seeds

Base pipeline `assets/tiny-t2i` (a tiny Stable Diffusion pretrained by `train/offline/pretrain_t2i.py` on
Fashion-MNIST, [model card](../assets/tiny-t2i/MODEL_CARD.md)); subjects from real images that ship offline
(`train/dreambooth/subject.py` says where each comes from and why its class word): {", ".join(
        f'`{n}` as "{SUBJECTS[n].instance_prompt}" with prior preservation on "{SUBJECTS[n].class_prompt}"'
        for n in args.subjects)}. Settings: {settings(trained, args.rows, args.rows != DEFAULT_ROWS)}. Training seeds
{", ".join(map(str, seeds))}. CPU (2 cores), fp32.{searched_note(args)}

```bash
python -m train.dreambooth.compare --out runs/dreambooth-compare --doc docs/dreambooth_offline.md --jobs 2
```

Every cell is the mean ± standard deviation over the {len(seeds)} training seeds (sample std); the base model has
no seed, so its std is 0. Costs: trainable parameters, training time (the steps alone, validation grids excluded)
and the peak resident memory of the training process (`VmHWM`), from each run's `metrics.json`.

## All subjects (each seed's run averaged over the subjects first)

{table(summary["all"], args.rows)}
"""]
    if "unsearched" in summary:
        parts.append(f"""## Unsearched subjects ({", ".join(n for n in args.subjects if n != args.search_subject)})

{table(summary["unsearched"], args.rows)}
""")
    for name in args.subjects:
        samples, subject = grids[name]
        searched = " (the search subject)" if name == args.search_subject else ""
        parts.append(f"""## {name}: "{SUBJECTS[name].instance_prompt}"{searched}

{table(summary[name], args.rows)}

![samples of {name}]({samples})

Rows, top to bottom: "{SUBJECTS[name].instance_prompt}" for the base model, {", ".join(row.label for row in args.rows)}
(seed {seeds[0]} runs); then "{SUBJECTS[name].class_prompt}" in the same order. The training views:

![{name}]({subject})
""")
    parts.append(f"""## Columns

train/dreambooth/metrics.py; proxies, honestly named, on {margs.num_samples} sampling seeds
({1000}-{1000 + margs.num_samples - 1}, {margs.num_inference_steps} DDIM steps, guidance {margs.guidance_scale})
shared by every row of a subject:
- **subject sim**: mean cosine similarity between the project ViT's centred features of the instance prompt's samples
  and of the subject's two held-out views (a stand-in for DreamBooth's DINO score; the ViT knows garments only);
- **colour dist**: total-variation distance between the colour histograms of those samples and of the held-out views
  (no embedder; 0 = same colours);
- **held-out loss**: noise-prediction MSE on the held-out views under the instance prompt, fixed noise and timesteps;
- **class acc**: share of the class prompt's samples that the ViT's Fashion-MNIST head calls the class word;
- **class drift**: relative squared change of the class prompt's noise predictions against the base model;
- **diversity**: mean pairwise cosine distance of the instance prompt's samples across sampling seeds.

""")
    return "\n".join(parts) + PROSE


if __name__ == "__main__":
    main()
