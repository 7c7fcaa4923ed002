"""The search behind each method's DreamBooth defaults: learning rate and size on one search subject, 2 seeds, chosen
by the held-out denoising loss of that subject's held-out views alone (never by the comparison's metrics).

    python -m train.dreambooth.search --out runs/dreambooth-search --doc docs/dreambooth_search.md --jobs 1

Three stages; each reads the results of the one before, so a stopped search resumes where it stopped:

1. ``lr``: each method at its default size, five learning rates half a decade apart (100x), centred on its default.
2. ``size``: each method at its stage-1 learning rate: PSOFT ranks 8, 16 and 32 with and without the scaling
   vectors, OFTv2 block sizes 4, 8 and 16, LoRA ranks 4 and 16.
3. ``refine``: each method's best of stage 2 at the two learning rates beside it (x and / by sqrt(10)); those
   stage 1 ran already cost nothing, and a best at the edge of the grid gets a neighbour beyond it.

A configuration's score is its held-out loss averaged over the seeds. Every run trains in its own process
(``python -m train.dreambooth``, its defaults but the flags of the configuration, no validation grid but the last)
and its record (held-out loss, trainable parameters, training seconds, peak memory) goes to ``<out>/search.json``
and, with ``--doc``, to a JSON file beside the markdown (``docs/dreambooth_search.json``): a run recorded in either
is not run again, so the search continues across machines from the committed file.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from psoft_vision.files import atomic_write

from ..common.metrics_files import write_json
from . import metrics
from .images import list_images, load_images
from .subject import DEFAULT_SUBJECT, SUBJECTS, subject_folder

#: Each method's default size flags and learning rate: the centre of stage 1 (what the trainer used before the search).
CENTRES = {"psoft": (("--rank", "16"), 1e-2), "oft": (("--block_size", "8"), 1e-2),
           "lora": (("--lora_rank", "4"), 5e-3)}
#: The sizes of stage 2, as trainer flags.
SIZES = {
    "psoft": [("--rank", str(r), *scalings) for r in (8, 16, 32) for scalings in ((), ("--no-train_alpha",
                                                                                      "--no-train_beta"))],
    "oft": [("--block_size", str(b)) for b in (4, 8, 16)],
    "lora": [("--lora_rank", str(r)) for r in (4, 16)],
}
LABELS = {"psoft": "ours PSOFT", "oft": "ours OFTv2", "lora": "PEFT LoRA"}
HALF_DECADE = math.sqrt(10)


@dataclass(frozen=True)
class Config:
    """One point of the search: a method, its size flags and a learning rate."""

    method: str
    size: tuple[str, ...]
    lr: float

    @property
    def name(self) -> str:
        """A folder name: ``psoft-rank16-lr0.01``, ``psoft-rank8-no_scalings-lr0.001``."""
        scalings = ["no_scalings"] if len(self.size) > 2 else []
        return "-".join([self.method, f"{self.size[0].strip('-')}{self.size[1]}", *scalings, f"lr{self.lr:.3g}"])

    @property
    def size_label(self) -> str:
        flag, value = self.size[:2]
        short = {"--rank": "r", "--block_size": "b", "--lora_rank": "r"}[flag]
        return f"{short}={value}" + (" no scalings" if len(self.size) > 2 else "")

    def flags(self) -> list[str]:
        return ["--method", self.method, *self.size, "--learning_rate", f"{self.lr:.6g}"]


def config_of(record: dict) -> Config:
    """The configuration a run's record was made with."""
    method = record["method"]
    size = next(s for s in SIZES[method] if Config(method, s, 0.0).size_label == record["size"])
    return Config(method, size, record["lr"])


def losses_of(records: dict[str, dict]) -> dict[Config, list[float]]:
    """Each configuration's held-out losses, one per seed, from the runs' records."""
    losses: dict[Config, list[float]] = {}
    for record in records.values():
        losses.setdefault(config_of(record), []).append(record["heldout_loss"])
    return losses


def lr_grid(centre: float) -> list[float]:
    """Five learning rates half a decade apart around ``centre`` (centre / 10 to centre x 10)."""
    return [float(f"{centre * HALF_DECADE ** k:.3g}") for k in range(-2, 3)]


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def heldout_loss(run: Path, heldout: Path, prompt: str) -> float:
    """The run's held-out loss on the views in ``heldout`` under the instance prompt, as train/dreambooth/metrics.py
    measures it."""
    pipeline = json.loads((run / "metrics.json").read_text())["args"]["pretrained_model_name_or_path"]
    pipe = metrics.load_adapted(pipeline, run)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return metrics.heldout_loss(pipe, load_images(list_images(heldout, "held-out views"), resolution), prompt)


class Search:
    """The runs of one search: what is recorded, and running what is not."""

    def __init__(self, args):
        self.args = args
        self.subject = SUBJECTS[args.subject]
        self.folder = subject_folder(args.subject, args.out / "subjects")
        self.files = [args.out / "search.json", *([args.doc.with_suffix(".json")] if args.doc else [])]
        self.records: dict[str, dict] = {}
        self.scoring = threading.Lock()
        for file in self.files:
            if file.is_file():
                self.records.update(json.loads(file.read_text())["runs"])

    def key(self, config: Config, seed: int) -> str:
        return f"{config.name}/seed{seed}"

    def run(self, config: Config, seed: int) -> dict:
        key = self.key(config, seed)
        if key in self.records:
            return self.records[key]
        folder = self.args.out / self.args.subject / key
        if not (folder / "metrics.json").is_file():  # else it trained before the search stopped: only score it
            self.train(config, seed, folder)
        metrics = json.loads((folder / "metrics.json").read_text())
        # one thread at a time: loading a pipeline is not thread-safe (accelerate's empty-weights patch is global),
        # and neither is rewriting the record files
        with self.scoring:
            loss = heldout_loss(folder, self.folder / "heldout", self.subject.instance_prompt)
            record = dict(method=config.method, size=config.size_label, lr=config.lr, seed=seed, heldout_loss=loss,
                          trainable=metrics["trainable"], train_s=metrics["train_s"], peak_mib=metrics["peak_mib"])
            self.records[key] = record
            self.save()
        print(f"{key}: held-out loss {loss:.4f} (trained in {record['train_s']:.0f} s)", flush=True)
        return record

    def train(self, config: Config, seed: int, folder: Path) -> None:
        command = [sys.executable, "-m", "train.dreambooth", *config.flags(), "--seed", str(seed),
                   "--output_dir", str(folder), "--class_data_dir", str(self.args.out / self.args.subject / "class"),
                   "--instance_data_dir", str(self.folder / "train"), "--instance_prompt", self.subject.instance_prompt,
                   "--class_prompt", self.subject.class_prompt, "--quiet", "--validation_steps", "1000000",
                   "--num_validation_images", "1", *self.args.extra]
        threads = "1" if self.args.jobs > 1 else os.environ.get("OMP_NUM_THREADS", "")
        env = dict(os.environ, **({"OMP_NUM_THREADS": threads} if threads else {}))
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)

    def save(self) -> None:
        for file in self.files:
            write_json(file, {"subject": self.args.subject, "seeds": self.args.seeds,
                              "runs": dict(sorted(self.records.items()))})

    def score(self, config: Config) -> float:
        return float(np.mean([self.records[self.key(config, seed)]["heldout_loss"] for seed in self.args.seeds]))

    def run_all(self, configs: list[Config]) -> dict[Config, float]:
        """Every configuration on every seed (``--jobs`` at a time); their scores."""
        jobs = [(config, seed) for config in configs for seed in self.args.seeds]
        first, rest = jobs[:1], jobs[1:]  # the first run alone: it generates the class images the others share
        with ThreadPoolExecutor(self.args.jobs) as pool:
            for batch in (first, rest):
                list(pool.map(lambda job: self.run(*job), batch))
        return {config: self.score(config) for config in configs}

    def stages(self):
        """Yields ``(stage, {config: score})`` as each stage ends."""
        methods = self.args.methods
        lr_stage = self.run_all([Config(m, CENTRES[m][0], lr) for m in methods for lr in lr_grid(CENTRES[m][1])])
        yield "lr", lr_stage
        best_lr = {m: min((c for c in lr_stage if c.method == m), key=lr_stage.get).lr for m in methods}
        size_stage = self.run_all([Config(m, size, best_lr[m]) for m in methods for size in SIZES[m]])
        yield "size", size_stage
        refine = []
        for m in methods:
            best = min((c for c in size_stage if c.method == m), key=size_stage.get)
            refine += [Config(m, best.size, float(f"{best.lr * f:.3g}")) for f in (1 / HALF_DECADE, HALF_DECADE)]
        yield "refine", self.run_all(refine)


def every_stage(stages: dict[str, dict[Config, float]]) -> dict[Config, float]:
    """Every configuration's score, whichever stage ran it."""
    return {config: score for stage in stages.values() for config, score in stage.items()}


def best_configs(stages: dict[str, dict[Config, float]]) -> dict[str, tuple[Config, float]]:
    """Each method's lowest mean held-out loss over every stage."""
    scored = every_stage(stages)
    methods = dict.fromkeys(c.method for c in scored)
    return {m: min(((c, s) for c, s in scored.items() if c.method == m), key=lambda cs: cs[1]) for m in methods}


def spread(search: Search, config: Config) -> float:
    losses = [search.records[search.key(config, seed)]["heldout_loss"] for seed in search.args.seeds]
    return float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0


def document(search: Search, stages: dict[str, dict[Config, float]]) -> str:
    """The search as markdown: a table per stage (mean ± std over seeds), each method's best, and the plot's name."""
    args = search.args
    lines = [f"# DreamBooth search: {args.subject}, seeds {', '.join(map(str, args.seeds))}", "",
             "Written by `python -m train.dreambooth.search` (its docstring says what each stage runs); selection on "
             f'the held-out denoising loss of the held-out views of `{args.subject}` under "'
             f'{search.subject.instance_prompt}" only. Every run is in `{args.doc.with_suffix(".json").name}`.', ""]
    for stage, scored in stages.items():
        if not scored:
            continue
        lines += [f"## Stage {stage}", "", "| method | size | lr | held-out loss ↓ | trainable | train s | peak MiB |",
                  "|---|---|--:|---|--:|--:|--:|"]
        for config, score in sorted(scored.items(), key=lambda cs: (cs[0].method, cs[0].size_label, cs[0].lr)):
            first = search.records[search.key(config, args.seeds[0])]
            seconds = np.mean([search.records[search.key(config, s)]["train_s"] for s in args.seeds])
            lines.append(f"| {LABELS[config.method]} | {config.size_label} | {config.lr:g} | {score:.4f} ± "
                         f"{spread(search, config):.4f} | {first['trainable']:,} | {seconds:.0f} | "
                         f"{first['peak_mib']:.0f} |")
        lines.append("")
    lines += ["## Best per method", "", "| method | size | lr | held-out loss ↓ | trainable |", "|---|---|--:|---|--:|"]
    for method, (config, score) in best_configs(stages).items():
        trainable = search.records[search.key(config, args.seeds[0])]["trainable"]
        lines.append(f"| {LABELS[method]} | {config.size_label} | {config.lr:g} | {score:.4f} ± "
                     f"{spread(search, config):.4f} | {trainable:,} |")
    lines += ["", f"![held-out loss against learning rate]({args.doc.stem}.png)", ""]
    return "\n".join(lines)


def plot(search: Search, stages: dict[str, dict[Config, float]], path: Path) -> None:
    """Held-out loss against learning rate, a panel per method and a line per size (mean over seeds, bars: std);
    the y range is the useful one, and a diverged run is an arrow at the top with its loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = every_stage(stages)
    methods = list(dict.fromkeys(c.method for c in scored))
    low = min(scored.values())
    top = min(max(scored.values()), low * 1.4) * 1.02
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for size in dict.fromkeys(c.size for c in scored if c.method == method):
            points = sorted((c for c in scored if (c.method, c.size) == (method, size)), key=lambda c: c.lr)
            shown = [c for c in points if scored[c] <= top]
            line = ax.errorbar([c.lr for c in shown], [scored[c] for c in shown],
                               yerr=[spread(search, c) for c in shown], marker="o", capsize=3,
                               label=points[0].size_label)
            for c in points:
                if scored[c] > top:
                    ax.plot(c.lr, top * 0.985, marker="^", color=line[0].get_color())
                    ax.annotate(f"{scored[c]:.2f}", (c.lr, top * 0.985), textcoords="offset points", xytext=(-8, -14),
                                fontsize=7)
        ax.set(xscale="log", xlabel="learning rate", title=LABELS[method], ylim=(low * 0.97, top))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"held-out loss on {search.args.subject} (mean of {len(search.args.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.dreambooth.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/dreambooth-search"))
    parser.add_argument("--subject", default=DEFAULT_SUBJECT.name, choices=sorted(SUBJECTS))
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(CENTRES),
                        help=f"comma-separated, from {', '.join(CENTRES)} (default: all)")
    parser.add_argument("--doc", type=Path, help="write the tables here, the plot and every run's record beside it")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (at most 2 on this project's CPUs), "
                        "one thread each when more than one")
    parser.add_argument("extra", nargs="*", help="more train.dreambooth arguments (after --), for every run")
    return parser


def main(argv=None) -> dict[str, tuple[Config, float]]:
    args = build_parser().parse_args(argv)
    unknown = [m for m in args.methods if m not in CENTRES]
    if unknown:
        raise SystemExit(f"--methods {unknown} unknown; choose from {', '.join(CENTRES)}")
    torch.manual_seed(0)
    search = Search(args)
    stages = {}
    for stage, scored in search.stages():  # the doc is rewritten as each stage ends
        stages[stage] = scored
        if args.doc:
            write_text(args.doc, document(search, stages))
            plot(search, stages, args.doc.with_suffix(".png"))
    best = best_configs(stages)
    for method, (config, score) in best.items():
        print(f"best {LABELS[method]}: {config.size_label} lr {config.lr:g} held-out loss {score:.4f}")
    return best


if __name__ == "__main__":
    main()
