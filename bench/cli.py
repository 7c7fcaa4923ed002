"""Side-by-side benchmark of psoft_vision against Hugging Face PEFT, each configuration in its own process.

    python -m bench --workloads vit-b16 --methods psoft,peft-lora,peft-psoft --out runs/bench

Per configuration: trainable parameters, set-up time (injection, SVD included), the median time of a training
step (forward, backward, AdamW), the compute ops one training step dispatches and its waits for the device (syncs;
bench/ops.py: deterministic, and what bounds a GPU step of small adapters), the peak memory of the training steps
(CUDA: max_memory_allocated; CPU: the process's peak resident set, reset after set-up), the adapter file size, and
the median eval-mode inference time unmerged and merged. The "floor" freezes every weight and back-propagates to the
input: every adapter pays that.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .measure import run_config, svd_report
from .methods import methods
from .report import chart, markdown, pool, table
from .workloads import WORKLOADS


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="vit-b16,unet-small", help=f"comma list of {', '.join(WORKLOADS)}")
    known_methods = methods()
    parser.add_argument("--methods", default=",".join(known_methods),
                        help=f"comma list of {', '.join(known_methods)}")
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

    workloads, chosen = args.workloads.split(","), args.methods.split(",")
    for name, known in ((workloads, WORKLOADS), (chosen, known_methods)):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"unknown {unknown}; choose from {', '.join(known)}")
    if args.svd_report:
        print(svd_report(workloads))
        return
    if args.worker:
        print(json.dumps(run_config(workloads[0], chosen[0], args.steps, args.warmup, args.device)))
        return

    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    configs = [(w, m) for _ in range(args.repeats) for w in workloads for m in chosen]
    for workload, method in (bar := tqdm(configs, desc="bench", unit="config")):
        bar.set_postfix_str(f"{workload} {method}")
        command = [sys.executable, "-m", "bench", "--worker", "--workloads", workload, "--methods",
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

