"""Side-by-side benchmark of psoft_vision against Hugging Face PEFT, each configuration in its own process.

    python -m psoft_vision.bench --workloads vit-b16 --methods psoft,peft-lora,peft-psoft --out runs/bench

Per configuration: trainable parameters, set-up time (injection, SVD included), the median time of a training
step (forward, backward, AdamW), the peak memory of the training steps (CUDA: max_memory_allocated; CPU: the
process's peak resident set, reset after set-up), the adapter file size, and the median eval-mode inference time
unmerged and merged. The "floor" freezes every weight and back-propagates to the input: every adapter pays that.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VIT_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


# ----------------------------------------------------------------------------------------------- workloads
def _timm_classifier(name: str, batch: int, size: int, device):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=100).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(100, (batch,), generator=gen).to(device)

    def loss_fn(model, x=x):
        return F.cross_entropy(model(x), y)

    return model, (x,), loss_fn, dict(targets=VIT_TARGETS, head="head", lora_rank=8, psoft_rank=46)


def vit_b16(device):
    return _timm_classifier("vit_base_patch16_224", 8, 224, device)


def test_vit(device):
    """A seconds-long smoke workload (timm's test_vit, batch 2): checks the machinery, measures nothing."""
    return _timm_classifier("test_vit", 2, 160, device)


def unet_small(device):
    from diffusers import UNet2DConditionModel

    from .targets import PRESETS

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    ).to(device)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(4, 4, 32, 32, generator=gen).to(device)
    context = torch.randn(4, 77, 256, generator=gen).to(device)
    timesteps = torch.randint(1000, (4,), generator=gen).to(device)
    noise = torch.randn(4, 4, 32, 32, generator=gen).to(device)

    def loss_fn(model, x=sample):
        return F.mse_loss(model(x, timesteps, encoder_hidden_states=context).sample, noise)

    # Rank 16 is to these 64-256 channels about what 46 is to ViT-B's 768 (the adapter path costs r (in + out)).
    return model, (sample,), loss_fn, dict(targets=PRESETS["unet"], head=None, lora_rank=4, psoft_rank=16)


WORKLOADS = {"vit-b16": vit_b16, "unet-small": unet_small, "test-vit": test_vit}


# ------------------------------------------------------------------------------------------------- methods
def _ours(config_factory):
    def apply(model, spec):
        import psoft_vision as pv

        config = config_factory(spec)
        config.targets = spec["targets"]
        config.train_modules = (spec["head"],) if spec["head"] else ()
        pv.inject(model, config)
        return model, lambda m: pv.merge(m)

    return apply


def _peft(config_factory):
    def apply(model, spec):
        import peft

        from .targets import select

        config = config_factory(peft, spec)
        config.target_modules = select(model, spec["targets"])  # exactly the layers ours adapts
        config.modules_to_save = [spec["head"]] if spec["head"] else None
        model = peft.get_peft_model(model, config)
        return model, lambda m: m.merge_adapter()

    return apply


def _frozen(model, spec):
    model.requires_grad_(False)
    return model, None


def _full(model, spec):
    return model, None


def _psoft_config(**kwargs):
    def make(spec):
        import psoft_vision as pv

        return pv.PSOFTConfig(rank=spec["psoft_rank"], **kwargs)

    return make


def _oft_config(spec):
    import psoft_vision as pv

    return pv.OFTConfig(block_size=32)


METHODS = {
    "floor": _frozen,
    "full": _full,
    "psoft": _ours(_psoft_config()),
    "psoft-neumann": _ours(_psoft_config(neumann_terms=4)),
    "oft": _ours(_oft_config),
    "peft-lora": _peft(lambda peft, spec: peft.LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"])),
    "peft-oft": _peft(lambda peft, spec: peft.OFTConfig(r=0, oft_block_size=32)),
    "peft-boft": _peft(lambda peft, spec: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2)),
    "peft-psoft": _peft(lambda peft, spec: peft.PsoftConfig(r=spec["psoft_rank"])),
}


# -------------------------------------------------------------------------------------------------- worker
def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set
            f.write("5")


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) / 1024


def _timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _adapter_bytes(model, method) -> int | None:
    if method in ("floor", "full"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        if method.startswith("peft-"):
            model.save_pretrained(tmp)
            return sum(p.stat().st_size for p in Path(tmp).rglob("*.safetensors"))
        from .io import save_adapter

        return save_adapter(model, Path(tmp, "adapter.safetensors")).stat().st_size


def run_config(workload: str, method: str, steps: int, warmup: int, device: str) -> dict:
    device = torch.device(device)
    torch.manual_seed(0)
    model, inputs, loss_fn, spec = WORKLOADS[workload](device)
    start = time.perf_counter()
    model, merge = METHODS[method](model, spec)
    setup_s = time.perf_counter() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    x = inputs[0].clone().requires_grad_(method == "floor")
    model.train()

    def step():
        loss = loss_fn(model, x)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(warmup):
        step()
    reset_peak_memory(device)
    step_s = [_timed(step, device, 1) for _ in range(steps)]
    peak = peak_memory_mib(device)

    model.eval()
    with torch.no_grad():
        infer_s = _timed(lambda: loss_fn(model, inputs[0]), device, max(3, steps // 2))
        merged_s = None
        if merge is not None:
            merge(model)
            merged_s = _timed(lambda: loss_fn(model, inputs[0]), device, max(3, steps // 2))
    return dict(
        workload=workload, method=method, device=str(device), trainable=sum(p.numel() for p in trainable),
        setup_s=setup_s, step_ms=1000 * statistics.median(step_s), step_ms_all=[1000 * s for s in step_s],
        peak_mib=peak, adapter_bytes=_adapter_bytes(model, method), infer_ms=1000 * infer_s,
        infer_merged_ms=None if merged_s is None else 1000 * merged_s,
    )


def svd_report(workloads: list[str]) -> str:
    """Set-up time of the principal subspaces of every targeted layer, "full" against "lowrank", and how far the
    lowrank rank-r approximation is from the exact one (relative Frobenius error, median and worst layer)."""
    from .methods import principal_subspace
    from .targets import select

    lines = []
    for workload in workloads:
        model, _, _, spec = WORKLOADS[workload](torch.device("cpu"))
        weights = [model.get_submodule(n).weight.detach().flatten(1) for n in select(model, spec["targets"])]
        rank = spec["psoft_rank"]
        timings, factors = {}, {}
        for mode in ("full", "lowrank"):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                factors[mode] = [principal_subspace(w, min(rank, *w.shape), mode) for w in weights]
                times.append(time.perf_counter() - start)
            timings[mode] = statistics.median(times)
        errors = [((bl @ al - bf @ af).norm() / (bf @ af).norm()).item()
                  for (af, bf), (al, bl) in zip(factors["full"], factors["lowrank"], strict=True)]
        lines.append(f"{workload}: {len(weights)} layers at rank {rank}: full {timings['full']:.2f} s, lowrank "
                     f"{timings['lowrank']:.2f} s; lowrank error median {statistics.median(errors):.1e}, "
                     f"worst {max(errors):.1e}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- driver
def pool(runs: list[dict]) -> dict:
    """One result from repeated runs of a configuration: medians over every measured step and every run."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0], runs=len(ok))
    out["step_ms_all"] = [t for r in ok for t in r["step_ms_all"]]
    out["step_ms"] = statistics.median(out["step_ms_all"])
    for key in ("peak_mib", "setup_s", "infer_ms", "infer_merged_ms"):
        values = [r[key] for r in ok if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _ratio(value, reference):
    return None if value is None or not reference else value / reference


def rows(results: list[dict]) -> list[tuple[str, ...]]:
    """The report as text cells, header first; ratios against the floor and PEFT LoRA of the same workload."""
    by = {(r["workload"], r["method"]): r for r in results if "error" not in r}
    head = ("workload", "method", "trainable", "step ms", "x floor", "x lora", "peak MiB", "x floor", "x lora",
            "setup s", "infer ms", "merged ms", "file KiB")
    out = [head]

    def fmt(value, spec=".2f"):
        return "" if value is None else format(value, spec)

    for r in results:
        if "error" in r:
            out.append((r["workload"], r["method"], "error: " + r["error"][:60], *[""] * (len(head) - 3)))
            continue
        floor, lora = by.get((r["workload"], "floor")), by.get((r["workload"], "peft-lora"))
        out.append((
            r["workload"], r["method"], f"{r['trainable']:,}", fmt(r["step_ms"], ".0f"),
            fmt(_ratio(r["step_ms"], floor and floor["step_ms"])), fmt(_ratio(r["step_ms"], lora and lora["step_ms"])),
            fmt(r["peak_mib"], ".0f"), fmt(_ratio(r["peak_mib"], floor and floor["peak_mib"])),
            fmt(_ratio(r["peak_mib"], lora and lora["peak_mib"])), fmt(r["setup_s"]), fmt(r["infer_ms"], ".0f"),
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="psoft-vision bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="vit-b16,unet-small", help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=10, help="measured training steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the list this many times, round robin, pooling the step times (noisy machines)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one configuration may take")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="directory for JSON, CSV and PNG")
    parser.add_argument("--svd-report", action="store_true",
                        help="only time the SVD set-up (full and lowrank) of the workloads and the lowrank error")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    workloads, methods = args.workloads.split(","), args.methods.split(",")
    for name, known in ((workloads, WORKLOADS), (methods, METHODS)):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"unknown {unknown}; choose from {', '.join(known)}")
    if args.svd_report:
        print(svd_report(workloads))
        return
    if args.worker:
        print(json.dumps(run_config(workloads[0], methods[0], args.steps, args.warmup, args.device)))
        return

    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    configs = [(w, m) for _ in range(args.repeats) for w in workloads for m in methods]
    for workload, method in (bar := tqdm(configs, desc="bench", unit="config")):
        bar.set_postfix_str(f"{workload} {method}")
        command = [sys.executable, "-m", "psoft_vision.bench", "--worker", "--workloads", workload, "--methods",
                   method, "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            result = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                      dict(workload=workload, method=method, error=(done.stderr.strip().splitlines() or ["?"])[-1]))
        except subprocess.TimeoutExpired:
            result = dict(workload=workload, method=method, error=f"timed out after {args.timeout:.0f} s")
        runs.setdefault((workload, method), []).append(result)
    results = [pool(rs) for rs in runs.values()]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    keys = [k for k in results[0] if k != "step_ms_all"] if "error" not in results[0] else ["workload", "method"]
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in results for k in r if k != "step_ms_all"},
                                                     key=lambda k: (keys.index(k) if k in keys else 99, k)))
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "step_ms_all"} for r in results)
    chart(results, args.out / "results.png")
    (args.out / "results.md").write_text(markdown(results))
    print(table(results))
    print(f"\nwritten: {args.out}/results.json, results.csv, results.md, results.png")


if __name__ == "__main__":
    main()
