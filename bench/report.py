"""The benchmark's reports: repeated runs pooled, a table with ratios against the floor and PEFT LoRA, markdown, and
a chart."""

import statistics
from pathlib import Path


def pool(runs: list[dict]) -> dict:
    """One result from repeated runs of a configuration: medians over every measured step and every run."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0], runs=len(ok))
    out["step_ms_all"] = [t for r in ok for t in r["step_ms_all"]]
    out["step_ms"] = statistics.median(out["step_ms_all"])
    for key in ("peak_mib", "setup_s", "infer_ms", "infer_merged_ms", "step_ops", "step_syncs"):
        values = [r[key] for r in ok if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _ratio(value, reference):
    return None if value is None or not reference else value / reference


def rows(results: list[dict]) -> list[tuple[str, ...]]:
    """The report as text cells, header first; ratios against the floor and PEFT LoRA (on the same kind of base) of
    the same workload."""
    by = {(r["workload"], r["method"]): r for r in results if "error" not in r}
    head = ("workload", "method", "base", "trainable", "step ms", "x floor", "x lora", "ops/step", "x lora", "syncs",
            "peak MiB", "x floor", "x lora", "base MiB", "setup s", "infer ms", "merged ms", "file KiB")
    out = [head]

    def fmt(value, spec=".2f"):
        return "" if value is None else format(value, spec)

    for r in results:
        if "error" in r:
            out.append((r["workload"], r["method"], "error: " + r["error"][:60], *[""] * (len(head) - 3)))
            continue
        # LoRA on the same kind of base: PEFT's QLoRA for rows on a quantized base
        floor = by.get((r["workload"], "floor"))
        lora = by.get((r["workload"], "peft-lora" if r.get("base", "float") == "float" else "peft-qlora"))
        out.append((
            r["workload"], r["method"], r.get("base", "float"), f"{r['trainable']:,}", fmt(r["step_ms"], ".0f"),
            fmt(_ratio(r["step_ms"], floor and floor["step_ms"])), fmt(_ratio(r["step_ms"], lora and lora["step_ms"])),
            fmt(r.get("step_ops"), ".0f"), fmt(_ratio(r.get("step_ops"), lora and lora.get("step_ops"))),
            fmt(r.get("step_syncs"), ".0f"),
            fmt(r["peak_mib"], ".0f"), fmt(_ratio(r["peak_mib"], floor and floor["peak_mib"])),
            fmt(_ratio(r["peak_mib"], lora and lora["peak_mib"])), fmt(r.get("base_mib"), ".1f"), fmt(r["setup_s"]),
            fmt(r["infer_ms"], ".0f"),
            fmt(r["infer_merged_ms"], ".0f"), fmt(r["adapter_bytes"] and r["adapter_bytes"] / 1024, ".1f"),
        ))
    return out


def table(results: list[dict]) -> str:
    cells = rows(results)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                      strict=True))) for row in cells)


def markdown(results: list[dict]) -> str:
    cells = rows(results)
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "---|" * len(cells[0]))
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    workloads = list(dict.fromkeys(r["workload"] for r in ok))
    fig, axes = plt.subplots(len(workloads), 2, figsize=(12, 3.5 * len(workloads)), squeeze=False)
    for row, workload in zip(axes, workloads, strict=True):
        rs = [r for r in ok if r["workload"] == workload]
        labels = [r["method"] for r in rs]
        colors = ["#c44" if not r["method"].startswith(("peft", "floor", "full")) else "#888" for r in rs]
        floor = next((r for r in rs if r["method"] == "floor"), None)
        for ax, key, title in ((row[0], "step_ms", "training step (ms, median)"), (row[1], "peak_mib", "peak MiB")):
            ax.barh(labels, [r[key] for r in rs], color=colors)
            if floor is not None:
                ax.axvline(floor[key], color="black", linestyle="--", linewidth=1)
            ax.set_title(f"{workload}: {title}")
            ax.invert_yaxis()
    fig.suptitle("ours in red, PEFT and references in grey; dashed: the floor (frozen model, gradient to the input)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


