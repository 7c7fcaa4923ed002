"""One table and one chart from the runs of several suite folders, each with a label (such as its base's precision).

    python -m train.vtab.combine runs/vtab-quant="NF4 base" runs/vtab-fp32="fp32 base" \
        --tasks photo-crops,textures,rotation --chart docs/quantized_vtab.png

Reads every finished run (``<folder>/<task>/<method>-seed<seed>/metrics.json``), so it also reports a suite that
is still running, over the seeds finished so far. Each row is "<method>, <label>"; the table is train.vtab.suite's.
"""

import argparse
import json
from pathlib import Path

from ..offline.data import TASKS
from .suite import aggregate, label, markdown


def finished_runs(folder: Path, tasks) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*/*-seed*/metrics.json"))]
    return [r for r in runs if r.get("finished") and r["task"] in tasks]


def combined_rows(suites: list[tuple[Path, str]], tasks=tuple(TASKS)) -> list[dict]:
    rows = []
    for folder, suffix in suites:
        runs = finished_runs(folder, tasks)
        if not runs:
            raise SystemExit(f"{folder}: no finished run (no <task>/<method>-seed<n>/metrics.json)")
        rows += [dict(row, method=f"{label(row['method'])}, {suffix}") for row in aggregate(runs)]
    return rows


def chart(rows: list[dict], path: Path) -> None:
    """Test accuracy per task, one bar per row with its std over seeds, and the score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(t in r["task_mean"] for r in rows)]
    columns = [*tasks, "score"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 2, 4))
    for i, r in enumerate(rows):
        means = [r["task_mean"].get(t, float("nan")) for t in tasks] + [r["score"]]
        stds = [r["task_std"].get(t, 0.0) for t in tasks] + [r["score_std"]]
        ax.bar([c + (i - (len(rows) - 1) / 2) * width for c in range(len(columns))], means, width, yerr=stds,
               capsize=2, label=f"{r['method']} (seeds: {r['seeds']})")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("test accuracy % (mean ± std over seeds)")
    low = min(r["task_mean"].get(t, 100) for r in rows for t in tasks)
    ax.set_ylim(max(0, low - 15), 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_suite(text: str) -> tuple[Path, str]:
    folder, sep, suffix = text.partition("=")
    if not sep or not suffix:
        raise argparse.ArgumentTypeError(f"{text!r}: give FOLDER=LABEL, e.g. runs/vtab-quant=\"NF4 base\"")
    return Path(folder), suffix


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m train.vtab.combine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="+", type=parse_suite, metavar="FOLDER=LABEL")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks to report (default all)")
    parser.add_argument("--chart", type=Path, help="write the bar chart here (png)")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    for task in tasks:
        if task not in TASKS:
            parser.error(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rows = combined_rows(args.suites, tasks)
    table = markdown(rows, name=str)
    print(table)
    if args.chart:
        chart(rows, args.chart)
        print(f"wrote {args.chart}")
    return table


if __name__ == "__main__":
    main()
