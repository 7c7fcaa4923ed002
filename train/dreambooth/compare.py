"""Ours PSOFT, ours OFTv2 and PEFT LoRA r=4 on the default DreamBooth subject, with the same data, steps and seed.

    python -m train.dreambooth.compare --out runs/dreambooth-compare --doc docs/dreambooth_offline.md --ship

Each method trains in its own process (``python -m train.dreambooth`` with its defaults, so the PSOFT run is exactly
the default run), which makes the peak resident memory its own; class images are generated once and shared. Then
train/dreambooth/metrics.py scores the base model and every run on the same seeds. Writes ``<out>/compare.json``, the
markdown table (``--doc``) with a sample grid beside it, and with ``--ship`` copies the PSOFT adapter and its LoRA
export to ``assets/dreambooth-psoft.safetensors`` and ``assets/dreambooth-psoft-lora.safetensors``.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..common.paths import ASSETS
from .images import image_grid, list_images, load_images, save_png
from .metrics import NUMBERS, evaluate_runs
from .metrics import build_parser as metrics_parser
from .subject import SUBJECT_DIR

RUNS = (("psoft", "ours PSOFT"), ("oft", "ours OFTv2"), ("lora", "PEFT LoRA r=4"))
LABELS = dict(RUNS, base="base model")
COLUMNS = (("subject_sim", "subject sim ↑"), ("colour_dist", "colour dist ↓"),
           ("heldout_loss", "held-out loss ↓"), ("class_acc", "class acc"),
           ("class_drift", "class drift ↓"), ("diversity", "diversity"))


def train(method: str, out: Path, extra: list[str]) -> dict:
    folder = out / method
    command = [sys.executable, "-m", "train.dreambooth", "--method", method, "--output_dir", str(folder),
               "--class_data_dir", str(out / "class_images"), "--quiet", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["wall_s"] = round(time.perf_counter() - start, 1)
    return metrics


def upscale(grid: np.ndarray, factor: int) -> np.ndarray:
    return grid.repeat(factor, axis=0).repeat(factor, axis=1)


def table(rows: list[tuple[str, dict, dict | None]]) -> str:
    head = ["method", "trainable", "train s", "peak MiB", *(label for _, label in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, scores, trained in rows:
        cells = [LABELS[name]]
        cells += ([f"{trained['trainable']:,}", f"{trained['train_s']:.0f}", f"{trained['peak_mib']:.0f}"]
                  if trained else ["-", "-", "-"])
        cells += [f"{scores[key]:.3f}" for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m train.dreambooth.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/dreambooth-compare"))
    parser.add_argument("--doc", type=Path, help="write the markdown table here, and the sample grid beside it")
    parser.add_argument("--ship", action="store_true", help="copy the PSOFT adapter and LoRA into assets/")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose metrics.json exists")
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("extra", nargs="*", help="more train.dreambooth arguments (after --), for every method")
    args = parser.parse_args(argv)

    trained = {}
    for method, _ in RUNS:
        done = args.out / method / "metrics.json"
        trained[method] = (json.loads(done.read_text()) if args.reuse and done.is_file()
                           else train(method, args.out, args.extra))
    margs = metrics_parser().parse_args(["--num_samples", str(args.num_samples)])
    scores = evaluate_runs([args.out / m for m, _ in RUNS], margs)
    scores = {("base" if k == "base" else Path(k).name): v for k, v in scores.items()}
    summary = {name: dict({k: s[k] for k in NUMBERS}, **{k: trained[name][k] for k in
                                                          ("trainable", "train_s", "peak_mib", "final_loss")}
                          if name in trained else {}) for name, s in scores.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(summary, indent=1))

    order = ["base", *(m for m, _ in RUNS)]
    rows = [(n, scores[n], trained.get(n)) for n in order]
    print(table(rows))
    if args.doc:
        to_hwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
        subject = (load_images(list_images(SUBJECT_DIR / "train", "subject"), 32) + 1) / 2
        grid = image_grid([to_hwc(scores[n]["instance_samples"]) for n in order]
                          + [to_hwc(scores[n]["class_samples"]) for n in order])
        samples = args.doc.with_name(args.doc.stem + "_samples.png")
        save_png(upscale(grid, 3), samples)
        save_png(upscale(image_grid([to_hwc(subject)]), 3), args.doc.with_name(args.doc.stem + "_subject.png"))
        args.doc.write_text(document(rows, samples.name, margs, trained))
    if args.ship:
        shutil.copyfile(args.out / "psoft" / "adapter.safetensors", ASSETS / "dreambooth-psoft.safetensors")
        lora = args.out / "psoft" / "lora" / "pytorch_lora_weights.safetensors"
        if lora.stat().st_size < 2**20:
            shutil.copyfile(lora, ASSETS / "dreambooth-psoft-lora.safetensors")
    return summary


def document(rows, samples: str, margs, trained: dict) -> str:
    a = trained["psoft"]["args"]
    lr = {m: trained[m]["args"]["learning_rate"] for m, _ in RUNS}
    settings = (f"{a['max_train_steps']} steps, batch {a['train_batch_size']} instance + {a['train_batch_size']} "
                f"class images, prior loss weight {a['prior_loss_weight']}, {a['num_class_images']} class images, "
                f"resolution {a['resolution']}, seed {a['seed']}, AdamW with {a['lr_warmup_steps']} warm-up steps "
                f"and a cosine decay; PSOFT r={a['rank']} at lr {lr['psoft']:g}, OFTv2 block size {a['block_size']} "
                f"at lr {lr['oft']:g}, LoRA r={a['lora_rank']} (alpha {a['lora_rank']}) at lr {lr['lora']:g} "
                "(`DEFAULT_LR` in `train/dreambooth/trainer.py`; one run each, no search); all three on the layers of "
                f"the `{a['targets']}` target preset (the UNet's attention, feed-forward and proj_in/proj_out)")
    return f"""# DreamBooth offline: ours PSOFT, ours OFTv2 and PEFT LoRA on one subject

Subject: six views of scikit-image's `coffee` photograph (a red espresso cup), `"{a['instance_prompt']}"`, with
prior preservation on `"{a['class_prompt']}"`; base pipeline `assets/tiny-t2i` (a tiny Stable Diffusion pretrained
by `train/offline/pretrain_t2i.py` on Fashion-MNIST, [model card](../assets/tiny-t2i/MODEL_CARD.md)).
Settings: {settings}. CPU (2 cores), fp32.

```bash
python -m train.dreambooth.compare --out runs/dreambooth-compare --doc docs/dreambooth_offline.md --ship
```

{table(rows)}

Columns (train/dreambooth/metrics.py; proxies, honestly named, on {margs.num_samples} seeds shared by every row):
- **subject sim**: mean cosine similarity between the project ViT's centred features of the instance prompt's samples
  and of the two held-out views of the cup (a stand-in for DreamBooth's DINO score; the ViT knows garments, not cups);
- **colour dist**: total-variation distance between the colour histograms of those samples and of the held-out views
  (no embedder; 0 = same colours);
- **held-out loss**: noise-prediction MSE on the held-out views under the instance prompt, fixed noise and timesteps;
- **class acc**: share of the class prompt's samples that the ViT's Fashion-MNIST head calls "bag" (prior kept);
- **class drift**: relative squared change of the class prompt's noise predictions against the base model;
- **diversity**: mean pairwise cosine distance of the instance prompt's samples across seeds.

Trainable parameters, training time (the training steps alone, validation grids excluded) and the peak resident
memory of the training process (`VmHWM`, reset before the first step) come from each run's `metrics.json`.

![samples]({samples})

Rows, top to bottom: the instance prompt `"{a['instance_prompt']}"` for the base model, PSOFT, OFTv2, LoRA; then the
class prompt `"{a['class_prompt']}"` in the same order. Columns: seeds {1000}-{1000 + margs.num_samples - 1},
{margs.num_inference_steps} DDIM steps, guidance {margs.guidance_scale}. The training views:

![subject]({Path(samples).name.replace('_samples', '_subject')})

## What the samples show

(See below.)
"""


if __name__ == "__main__":
    main()
