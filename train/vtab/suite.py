"""Methods x tasks x seeds of the VTAB trainer, then one table, one CSV and one chart.

    python -m train.vtab.suite --out runs/vtab-suite --search photo-crops,textures,count   # the committed run
    python -m train.vtab.suite --tasks rotation --methods psoft,lora --seeds 0 --extra "--epochs 5"

Every run lands in <out>/<task>/<method>-seed<seed>/ (see train.vtab); a run whose metrics.json exists is not run
again, so an interrupted suite continues where it stopped. --search first picks each method's learning rate on
val200 (LR_GRID), and seed 0 reuses those runs; --extra arguments go to every run after the method's own.
The score is VTAB's: the mean over the three groups of the group means.
"""

import argparse
import csv
import json
import shlex
import statistics
from collections import defaultdict
from pathlib import Path

from ..common.methods import method_choices, registered
from ..common.metrics_files import recorded_args
from ..offline.data import TASKS
from .trainer import BASELINES, parse_args, run

#: Learning rates tried per method by --search (seed 0, the best mean val200 accuracy wins, the grid growing upward
#: while the best is its largest); the linear probe searches the head's learning rate, every other method its own
#: with the head at 5e-3. Registered methods (ours) search ADAPTER_LRS.
ADAPTER_LRS = (1e-3, 5e-3, 2e-2, 5e-2)
LR_GRID = {
    "lora": ("--lr", ADAPTER_LRS),
    "peft-oft": ("--lr", ADAPTER_LRS),
    "peft-psoft": ("--lr", ADAPTER_LRS),
    "full": ("--lr", (1e-4, 3e-4, 1e-3, 3e-3)),
    "linear": ("--head-lr", (5e-3, 2e-2, 5e-2, 1e-1)),
}
#: The baselines' names in tables and charts; a registered method is "ours <its display name>".
LABELS = {"lora": "PEFT LoRA r=8", "qlora": "PEFT QLoRA r=8", "peft-oft": "PEFT OFT", "peft-psoft": "PEFT PSOFT",
          "full": "full fine-tuning", "linear": "linear probing"}
GROUPS = ("natural", "specialized", "structured")


def lr_grid(method: str) -> tuple[str, tuple[float, ...]]:
    """The flag and the learning rates --search starts from for ``method``."""
    return ("--lr", ADAPTER_LRS) if registered(method) is not None else LR_GRID[method]


def label(method: str) -> str:
    found = registered(method)
    return f"ours {found.display_name or found.name}" if found is not None else LABELS.get(method, method)


class StaleRunError(ValueError):
    """A finished run in the suite's folder was made with other settings than the ones asked for now."""


def _run_once(folder: Path, argv: list[str]) -> dict:
    args = parse_args([*argv, "--output-dir", str(folder), "--resume", "--quiet"])
    done = folder / "metrics.json"
    if done.is_file():
        metrics = json.loads(done.read_text())
        # options newer than the run were at their default
        recorded = {**recorded_args(parse_args([])), **metrics["args"]}
        differ = sorted(k for k, v in recorded_args(args).items() if recorded[k] != v)
        if differ:
            raise StaleRunError(f"{done} was run with other settings ({', '.join(differ)}); delete that folder or "
                                "choose another --out")
        return metrics
    metrics = run(args)
    print(f"{folder}: val {metrics['best_val']:.3f}, test {metrics['test_acc']:.3f} ({metrics['train_s']:.0f} s)",
          flush=True)
    return metrics


def _search_folder(out: Path, task: str, method: str, flag: str, lr: float) -> Path:
    return out / "search" / task / f"{method}-{flag[2:]}{lr:g}"


def search(out: Path, methods, tasks, extra: list[str], max_extensions: int = 2) -> dict[str, list[str]]:
    """Each method's learning rate with the best mean val200 accuracy over the tasks (seed 0). While the best is
    the largest tried, the grid grows by a factor of 3 (at most ``max_extensions`` times)."""
    chosen = {}
    for method in methods:
        flag, grid = lr_grid(method)
        grid, val = list(grid), {}
        while True:
            for lr in grid:
                if lr not in val:
                    runs = [_run_once(_search_folder(out, task, method, flag, lr),
                                      ["--task", task, "--method", method, "--seed", "0", flag, str(lr), *extra])
                            for task in tasks]
                    val[lr] = statistics.mean(r["best_val"] for r in runs)
            best = max(grid, key=val.get)
            if best != grid[-1] or len(grid) == len(lr_grid(method)[1]) + max_extensions:
                break
            grid.append(float(f"{grid[-1] * 3:.3g}"))
        chosen[method] = [flag, str(best)]
        print(f"{method}: {flag} {best:g} (mean val200 " + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in val.items())
              + ")", flush=True)
    (out / "search.json").write_text(json.dumps(chosen, indent=1))
    return chosen


def run_suite(out: Path, methods, tasks, seeds, extra: list[str], method_args: dict[str, list[str]]) -> list[dict]:
    results = []
    for seed in seeds:
        for task in tasks:
            for method in methods:
                folder = out / task / f"{method}-seed{seed}"
                if seed == 0 and method in method_args:  # the search already ran this exact configuration
                    flag, lr = method_args[method]
                    searched = _search_folder(out, task, method, flag, float(lr))
                    if (searched / "metrics.json").is_file():
                        folder = searched
                argv = ["--task", task, "--method", method, "--seed", str(seed), *method_args.get(method, []), *extra]
                results.append(_run_once(folder, argv))
    return results


def score(accuracy_by_task: dict[str, float]) -> float:
    """VTAB's mean of group means over the tasks present."""
    groups = defaultdict(list)
    for task, accuracy in accuracy_by_task.items():
        groups[TASKS[task].group].append(accuracy)
    return statistics.mean(statistics.mean(values) for values in groups.values())


def aggregate(results: list[dict]) -> list[dict]:
    """One row per method: per-task mean and std over seeds, group means, the score's mean and std over seeds."""
    by_method = defaultdict(lambda: defaultdict(dict))
    params = {}
    for r in results:
        by_method[r["method"]][r["seed"]][r["task"]] = 100 * r["test_acc"]
        params[r["method"]] = r["trainable"]
    rows = []
    for method, by_seed in by_method.items():
        tasks = sorted({t for accs in by_seed.values() for t in accs}, key=list(TASKS).index)
        complete = [accs for accs in by_seed.values() if set(accs) == set(tasks)]
        per_task = {t: [accs[t] for accs in by_seed.values() if t in accs] for t in tasks}
        scores = [score(accs) for accs in complete]
        groups = {g: statistics.mean(statistics.mean(per_task[t]) for t in tasks if TASKS[t].group == g)
                  for g in GROUPS if any(TASKS[t].group == g for t in tasks)}
        rows.append(dict(
            method=method, trainable=params[method], seeds=len(complete),
            task_mean={t: statistics.mean(v) for t, v in per_task.items()},
            task_std={t: statistics.stdev(v) if len(v) > 1 else 0.0 for t, v in per_task.items()},
            groups=groups, score=statistics.mean(scores) if scores else float("nan"),
            score_std=statistics.stdev(scores) if len(scores) > 1 else 0.0,
        ))
    order = {m: i for i, m in enumerate(method_choices(BASELINES))}
    return sorted(rows, key=lambda row: order.get(row["method"], len(order)))


def markdown(rows: list[dict], name=label) -> str:
    """The table of :func:`aggregate`'s rows; ``name`` turns a row's method into its first cell."""
    tasks = [t for t in TASKS if any(t in r["task_mean"] for r in rows)]
    groups = [g for g in GROUPS if any(g in r["groups"] for r in rows)]
    header = ["method", "trainable", *tasks, *groups, "score"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [name(r["method"]), f"{r['trainable']:,}"]
        cells += [f"{r['task_mean'][t]:.1f} ± {r['task_std'][t]:.1f}" if t in r["task_mean"] else "" for t in tasks]
        cells += [f"{r['groups'][g]:.1f}" if g in r["groups"] else "" for g in groups]
        cells.append(f"**{r['score']:.1f} ± {r['score_std']:.1f}**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        x, ours = max(r["trainable"], 1), registered(r["method"]) is not None
        ax.errorbar(x, r["score"], yerr=r["score_std"], fmt="o", capsize=3, color="tab:red" if ours else "tab:gray")
        # ours above, PEFT's below: ours and PEFT's version of a method train the same numbers, so share an x
        ax.annotate(label(r["method"]), (x, r["score"]), textcoords="offset points",
                    xytext=(6, 5 if ours else -11), fontsize=8)
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xlabel("trainable parameters outside the head (log)")
    ax.set_ylabel("VTAB-offline score (mean of group means, %)")
    ax.set_title("Accuracy against trainable parameters (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: list[dict], out: Path) -> str:
    fields = ["task", "method", "seed", "test_acc", "best_val", "best_epoch", "trainable", "head_params", "train_s",
              "peak_mib", "setup_s"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    rows = aggregate(results)
    table = markdown(rows)
    (out / "summary.md").write_text(table)
    chart(rows, out / "accuracy_vs_params.png")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.vtab.suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/vtab-suite"))
    known = method_choices(BASELINES)
    parser.add_argument("--methods", default=",".join(known), help=f"comma-separated, from {', '.join(known)}")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated VTAB-offline tasks (default all)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", default="", help="more train.vtab arguments for every run, one quoted string")
    parser.add_argument("--search", metavar="TASKS", help="first pick each method's learning rate from LR_GRID on "
                        "these comma-separated tasks (seed 0, best mean val200); otherwise use <out>/search.json "
                        "if present, else train.vtab's defaults")
    args = parser.parse_args(argv)
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    for method in methods:
        if method not in known:
            parser.error(f"unknown method {method!r}; choose from {', '.join(known)}")
    for task in tasks:
        if task not in TASKS:
            parser.error(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.extra)
    if args.search:
        method_args = search(args.out, methods, args.search.split(","), extra)
    elif (args.out / "search.json").is_file():
        method_args = json.loads((args.out / "search.json").read_text())
    else:
        method_args = {}
    results = run_suite(args.out, methods, tasks, [int(s) for s in args.seeds.split(",")], extra, method_args)
    print(write_reports(results, args.out))
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'summary.md'}, {args.out / 'accuracy_vs_params.png'}")


if __name__ == "__main__":
    main()
