"""Fine-tune a timm model on one VTAB-1k task: PSOFT, OFTv2 (or any method registered with psoft_vision), PEFT
LoRA/OFT/PSOFT, full fine-tuning or linear probing.

With no arguments: the project's offline backbone (assets/) fine-tuned with PSOFT on the VTAB-offline task
"photo-crops", on the CPU in well under a minute. The real protocol (SPEC section 8):

    accelerate launch -m train.vtab --model vit_base_patch16_224.augreg_in21k --data-dir vtab-1k/cifar \\
        --method psoft --rank 46 --lr 5e-4 --head-lr 5e-3 --weight-decay 1e-3 --epochs 50 --batch-size 64

Protocols: "select" trains on train800, keeps the epoch with the best val200 accuracy and tests it; "final"
trains on train800val200 and tests the last epoch. The output folder gets metrics.json, metrics.csv, curve.png,
the adapter (registered methods: adapter.safetensors; PEFT: adapter/; full and linear: trainable.safetensors),
README.md (the model card) and checkpoint/, from which --resume continues after an interruption exactly as if none
had happened; --push-to-hub uploads the folder to a hub repository.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

import psoft_vision as pv
from psoft_vision.hub import hub_errors, timm_hub_id

from ..common import hub as run_hub
from ..common.checkpoint import find_checkpoint, load_checkpoint, write_checkpoint
from ..common.hub import add_hub_args
from ..common.methods import add_config_flags, build_config, default_lr, default_lrs, method_choices, registered
from ..common.metrics_files import recorded_args, write_csv, write_json
from ..common.paths import run_folder_problem
from ..common.resume_args import check_resume_args
from ..common.schedule import cosine_with_warmup
from ..offline import backbone  # noqa: F401  registers the offline backbone with timm
from .data import Preprocess, folder_splits, offline_splits

PEFT = ("lora", "qlora", "peft-oft", "peft-psoft")
#: The trainer's own methods beside every registered one (see train/common/methods.py).
BASELINES = (*PEFT, "full", "linear")
DEFAULT_MODEL = "vit_pico_patch8_32.fmnist"
DEFAULT_TASK = "photo-crops"
#: What the committed learning-rate search on VTAB-offline chose for the offline backbone (docs/vtab_offline.md), for
#: the baselines; a registered method's is its ``learning_rates["vtab"]`` (psoft_vision's Method). Linear probing
#: trains the head only, so its --lr is never used.
BASELINE_LR = {"lora": 2e-2, "qlora": 2e-2, "peft-oft": 2e-2, "peft-psoft": 2e-2, "full": 3e-3, "linear": 5e-3}
#: The learning rate of a registered method that names none for VTAB (a new one, not searched yet): the middle of the
#: suite's grid for adapters.
FALLBACK_LR = 5e-3
DEFAULT_HEAD_LR = {"linear": 0.3}
#: Arguments a --resume may change (train/common/resume_args.py): they cannot change what is trained (gradient
#: checkpointing recomputes the same activations: bit-identical, tests/test_vtab.py). Every other argument must be
#: the run's own; a change of one of these is recorded in metrics.json's "resumes".
MAY_DIFFER = frozenset({"quiet", "num_workers", "output_dir", "baseline", "grad_checkpointing", *run_hub.MAY_DIFFER})
#: How the model card names a method that writes no psoft_vision adapter file.
BASELINE_NAMES = {"lora": "PEFT LoRA", "qlora": "PEFT QLoRA", "peft-oft": "PEFT OFT", "peft-psoft": "PEFT PSOFT",
                  "full": "full fine-tuning", "linear": "linear probing"}


def __getattr__(name: str):
    """``METHODS``: every registered method, then the baselines, read when asked for (a method registered later is
    in it)."""
    if name == "METHODS":
        return method_choices(BASELINES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.vtab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="timm model name with tag (its weights come from the "
                   "hub repository its pretrained_cfg names), or hf-hub:org/name for a timm model on the hub "
                   f"(default {DEFAULT_MODEL}, the project's offline backbone)")
    g.add_argument("--revision", help="the hub revision (branch, tag or commit) of the model's weights")
    g.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", help="the hub cache to download into and read "
                   "from (default: huggingface_hub's, HF_HUB_CACHE or HF_HOME)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="load pretrained weights: the hub's, or the local file of the model's pretrained_cfg")
    g.add_argument("--weights", type=Path, help="load weights from this local file instead of the hub "
                   "(timm's pretrained_cfg_overlay=dict(file=...))")
    g = p.add_argument_group("data")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--data-dir", type=Path, help="a VTAB-1k task folder (list files + images/)")
    source.add_argument("--task", help=f"a VTAB-offline task (default {DEFAULT_TASK}); see train/offline/data.py")
    g.add_argument("--protocol", choices=("select", "final"), default="select",
                   help="select: train800, best val200 epoch tested; final: train800val200, last epoch tested")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for task folders")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=method_choices(BASELINES), default="psoft",
                   help="lora, peft-oft and peft-psoft run PEFT; qlora is PEFT LoRA on a quantized base (--quantize, "
                   "nf4 by default)")
    g.add_argument("--quantize", choices=tuple(pv.quantized.SCHEMES), help="quantize the base model's linear layers "
                   "(not the head) before the method: QPSOFT / QOFT with ours, QLoRA with lora (psoft_vision."
                   "quantize_base; bitsandbytes or torchao)")
    g.add_argument("--rank", type=int, default=24, help="PSOFT rank r, ours and PEFT's (SPEC for ViT-B/16: 46)")
    g.add_argument("--block-size", type=int, default=32, help="OFT block size, ours and PEFT's")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, a scale of 1)")
    g.add_argument("--train-modules", type=lambda text: [n for n in text.split(",") if n], default=[],
                   metavar="NAMES", help="comma-separated modules trained in full beside the adapter and the head, "
                   "e.g. patch_embed,norm (ours: train_modules; PEFT: modules_to_save)")
    g.add_argument("--adapter-dropout", type=float, default=0.1, help="dropout on the adapter path (SPEC: 0.1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="(SPEC for ViT-B/16: 50)")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size, split across processes")
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--lr", type=float, help="learning rate of adapters (or of the whole network); default: the "
                   f"method's own, searched for the offline backbone ({default_lrs('vtab', BASELINE_LR)}), else "
                   f"{FALLBACK_LR:g} (SPEC for ViT-B/16: 5e-4)")
    g.add_argument("--head-lr", type=float, help="learning rate of the new classifier head (default 5e-3; linear "
                   "probing 0.3, as searched)")
    g.add_argument("--weight-decay", type=float, default=1e-3)
    g.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with linear warm-up")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", type=Path, help="default runs/vtab/<task>/<method>-seed<seed>")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    g.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each block's activations in the "
                   "backward pass instead of keeping them (timm's set_grad_checkpointing): less memory, more time")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (the first steps compile)")
    g.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint if it exists; the "
                   "arguments must be the run's own, except --quiet, --num-workers, --stop-after-epochs, --baseline, "
                   "--grad-checkpointing")
    g.add_argument("--stop-after-epochs", type=int, help="end this run after N epochs (a time slice on a shared "
                   "machine); --resume continues it")
    g.add_argument("--baseline", choices=("linear",), help="also train this baseline with the same budget and "
                   "print both test accuracies")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_hub_args(p.add_argument_group("hub (the output folder, with its README.md model card, is the repository)"),
                 dashed=True)
    add_config_flags(p, dashed=True)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.data_dir is None and args.task is None:
        args.task = DEFAULT_TASK
    if args.method == "qlora" and args.quantize is None:
        args.quantize = "nf4"  # QLoRA's quantization
    if args.quantize and args.method == "full":
        raise TrainerFlagError(f"--quantize {args.quantize} with --method full: a quantized base cannot be trained "
                               "in full; use an adapter method, or leave --quantize out.")
    if args.lr is None:
        args.lr = default_lr(args.method, "vtab", BASELINE_LR, FALLBACK_LR)
    if args.head_lr is None:
        args.head_lr = DEFAULT_HEAD_LR.get(args.method, 5e-3)
    if args.output_dir is None:
        task = args.task or args.data_dir.name
        args.output_dir = Path("runs/vtab") / task / f"{args.method}-seed{args.seed}"
    problem = run_folder_problem(Path(args.output_dir))
    if problem:
        raise TrainerFlagError(f"--output-dir {str(args.output_dir)!r}: {problem}; pass a folder path (it is "
                               "created if missing).")
    return args


class TrainerFlagError(ValueError):
    """A flag the chosen model cannot honour."""


# ----------------------------------------------------------------------------------------------- building
def create_model(args, num_classes: int):
    """The timm model with --model's weights: from --weights, else through timm's own hub resolution (at --revision,
    in --cache-dir; failures are psoft_vision HubErrors)."""
    name, overlay, repo = args.model, None, timm_hub_id(args.model)
    if args.weights is not None:
        if not args.weights.is_file():
            raise FileNotFoundError(f"--weights {args.weights} does not exist; give a .safetensors/.pth file")
        overlay = dict(file=str(args.weights))
    elif args.revision and repo is None:
        raise TrainerFlagError(f"--revision {args.revision}: {args.model} has no weights on the hub; leave "
                               "--revision out.")
    elif args.revision and name.startswith("hf-hub:"):
        name = f"{name.split('@')[0]}@{args.revision}"
    elif args.revision:
        overlay = dict(hf_hub_id=f"{repo}@{args.revision}")
    with hub_errors(repo or name, args.revision, cache_dir=args.cache_dir):
        return timm.create_model(name, pretrained=args.pretrained or args.weights is not None,
                                 pretrained_cfg_overlay=overlay, num_classes=num_classes, cache_dir=args.cache_dir)


def enable_grad_checkpointing(model, name: str) -> None:
    """timm's gradient checkpointing of the model's blocks; a model without it (timm asserts) is refused rather than
    trained without it, as is timm's re-entrant variant, which would give the adapters in frozen blocks no gradient
    (their input requires none)."""
    from timm.layers import use_reentrant_ckpt

    setter = getattr(model, "set_grad_checkpointing", None)
    try:
        if setter is None:
            raise NotImplementedError
        setter(True)
    except (AssertionError, NotImplementedError) as error:
        raise TrainerFlagError(f"--grad-checkpointing: {name} ({type(model).__name__}) has no gradient "
                               "checkpointing in timm; leave the flag out, or choose a model that has it (ViT, "
                               "ConvNeXt, ...)") from error
    if use_reentrant_ckpt():
        raise TrainerFlagError("--grad-checkpointing with TIMM_REENTRANT_CKPT on: re-entrant checkpointing gives the "
                               "adapters inside frozen blocks no gradient (the blocks' input requires none); unset "
                               "TIMM_REENTRANT_CKPT")


def compile_model(model) -> None:
    """torch.compile in place (the state dict keeps its names, so checkpoints and adapter files do too), with
    inductor drawing random numbers as eager PyTorch does (``fallback_random``): its own generator would give the
    adapter dropout other masks, a run no longer comparable with an eager one (three epochs on a 9-image task
    moved the adapter by 0.12). So a compiled run is the eager run up to the reassociation of float sums."""
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    model.compile()


def apply_method(model, args):
    """The model with the method's trainable parts; only those require gradients."""
    trained = [model.pretrained_cfg.get("classifier", "head"), *args.train_modules]
    method = registered(args.method)
    if method is not None:
        return pv.inject(model, build_config(method, args, dropout=args.adapter_dropout, train_modules=tuple(trained)))
    if args.method == "linear":
        model.requires_grad_(False)
        for name in trained:
            model.get_submodule(name).requires_grad_(True)
        return model
    if args.method == "full":
        return model
    return apply_peft(model, args, trained)


def apply_peft(model, args, trained: list[str]):
    """PEFT's LoRA, OFT or PSOFT on the layers ours adapts, the head and --train-modules in modules_to_save."""
    import peft

    from psoft_vision.targets import PRESETS, auto_preset, select

    targets = select(model, PRESETS[auto_preset(model)])  # the layers ours adapts
    common = dict(target_modules=targets, modules_to_save=trained)
    config = {
        "lora": lambda: peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                                        lora_dropout=args.adapter_dropout, **common),
        "peft-oft": lambda: peft.OFTConfig(r=0, oft_block_size=args.block_size, module_dropout=args.adapter_dropout,
                                           **common),
        "peft-psoft": lambda: peft.PsoftConfig(r=args.rank, psoft_dropout=args.adapter_dropout, **common),
    }["lora" if args.method == "qlora" else args.method]()  # QLoRA: LoRA, on the base --quantize made
    return peft.get_peft_model(model, config)


def is_head(name: str, head: str) -> bool:
    return f".{head}." in f".{name}."


def count_trainable(model, head: str) -> tuple[int, int]:
    """Trainable numbers outside and inside the classifier head."""
    counts = [0, 0]
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[is_head(name, head)] += p.numel()
    return counts[0], counts[1]


class EpochSampler(Sampler):
    """A permutation fixed by (seed, epoch): an interrupted run sees the same batches after --resume."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())


def load_data(args, preprocess):
    train_split, eval_split = ("train800", "val200") if args.protocol == "select" else ("train800val200", None)
    if args.data_dir is not None:
        return folder_splits(args.data_dir, train_split, eval_split, preprocess)
    return offline_splits(args.task, train_split, eval_split, preprocess)


def make_optimizer(model, head: str, args) -> torch.optim.Optimizer:
    """AdamW with the head at --head-lr and everything else trainable at --lr."""
    groups = [{"params": [], "lr": args.lr}, {"params": [], "lr": args.head_lr}]
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[is_head(name, head)]["params"].append(p)
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=args.weight_decay)


def make_loaders(args, train_set, eval_set, test_set) -> tuple[DataLoader, DataLoader | None, DataLoader]:
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=EpochSampler(len(train_set), args.seed),
                              num_workers=args.num_workers)
    eval_loader = (DataLoader(eval_set, batch_size=args.eval_batch_size, num_workers=args.num_workers)
                   if eval_set is not None else None)
    test_loader = DataLoader(test_set, batch_size=args.eval_batch_size, num_workers=args.num_workers)
    return train_loader, eval_loader, test_loader


@dataclass
class Training:
    """What the epoch loop works with, made once by :func:`build`."""

    accelerator: object
    model: torch.nn.Module  # prepared by accelerate
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    eval_loader: DataLoader | None  # None under the final protocol
    test_loader: DataLoader
    trainable_params: dict[str, torch.nn.Parameter]  # of the unwrapped model
    classes: int
    trainable: int  # numbers trained outside the head
    head_params: int
    setup_s: float  # the time the method took to apply
    repo_id: str | None = None  # --push_to_hub: the hub repository, made before training


def build(args, accelerator) -> Training:
    """The data, the model with its method, the optimiser, the schedule and the loaders, prepared by accelerate."""
    from accelerate.utils import set_seed

    set_seed(args.seed)
    repo_id = run_hub.start_repo(args, accelerator.is_main_process)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    probe = create_model(args, num_classes=2)  # only for its data config: num_classes comes from the data
    train_set, eval_set, test_set, classes = load_data(args, Preprocess.for_model(probe))
    del probe
    set_seed(args.seed)
    model = create_model(args, num_classes=classes)
    if args.quantize:
        pv.quantize_base(model, args.quantize)
    if args.grad_checkpointing:
        enable_grad_checkpointing(model, args.model)
    head = model.pretrained_cfg.get("classifier", "head")
    start = time.perf_counter()
    model = apply_method(model, args)
    setup_s = time.perf_counter() - start
    if args.compile:
        compile_model(model)
    trainable, head_params = count_trainable(model, head)

    optimizer = make_optimizer(model, head, args)
    train_loader, eval_loader, test_loader = make_loaders(args, train_set, eval_set, test_set)
    total_steps = args.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, int(args.warmup * total_steps)))
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loader, test_loader = (accelerator.prepare(loader) if loader is not None else None
                                for loader in (eval_loader, test_loader))
    trainable_params = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    return Training(accelerator, model, optimizer, scheduler, train_loader, eval_loader, test_loader,
                    trainable_params, classes, trainable, head_params, setup_s, repo_id)


# ------------------------------------------------------------------------------------------------ running
@torch.no_grad()
def evaluate(model, loader, accelerator) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        predictions = model(x).argmax(-1)
        predictions, y = accelerator.gather_for_metrics((predictions, y))
        correct += (predictions == y).sum().item()
        total += y.numel()
    return correct / total


def resume_point(args, accelerator) -> tuple[Path | None, dict]:
    """With --resume, the checkpoint to continue and the allowed argument changes (train/common/resume_args.py),
    checked before anything is built; a damaged checkpoint or a contradicting argument is a named error. ``(None,
    {})``: a new run (no --resume, or no checkpoint at all)."""
    if not args.resume:
        return None, {}
    found = find_checkpoint(Path(args.output_dir))
    if found is None:
        accelerator.print(f"--resume: no checkpoint in {args.output_dir}; starting a new run")
        return None, {}
    return found, check_resume_args(found, args, build_parser(), MAY_DIFFER, accelerator.num_processes)


def resume(t: Training, found: Path | None, changes: dict) -> tuple[dict, dict | None]:
    """The trainer state and the best epoch's tensors: a new run's (with the accuracy before training), or those of
    the checkpoint ``found`` (with accelerate's state loaded, and the allowed argument ``changes`` recorded)."""
    state = dict(epoch=0, history=[], best_val=-1.0, best_epoch=None, train_s=0.0, start_val=None, resumes=[])
    best = None
    if found is not None:
        state, best = load_checkpoint(t.accelerator, found, settle=True)
        state.setdefault("resumes", []).append(dict(epoch=state["epoch"], changed=changes))
        t.accelerator.print(f"resumed from {found} after epoch {state['epoch']}")
    if state["epoch"] == 0 and t.eval_loader is not None:
        state["start_val"] = evaluate(t.model, t.eval_loader, t.accelerator)
    return state, best


def train_epoch(t: Training, args, epoch: int) -> tuple[float, float]:
    """One pass over the training set; returns the mean loss and the seconds it took."""
    from tqdm.auto import tqdm

    t.model.train()
    t.train_loader.set_epoch(epoch)
    epoch_start, losses = time.perf_counter(), []
    bar = tqdm(t.train_loader, desc=f"{args.method} epoch {epoch + 1}/{args.epochs}", leave=False,
               disable=args.quiet or not t.accelerator.is_local_main_process)
    for x, y in bar:
        loss = F.cross_entropy(t.model(x), y)
        t.accelerator.backward(loss)
        t.optimizer.step()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return sum(losses) / len(losses), time.perf_counter() - epoch_start


def train(t: Training, args, state: dict, best: dict | None) -> dict | None:
    """Epochs from ``state["epoch"]`` to the end or to --stop-after-epochs more, each checkpointed; ``state`` is
    updated in place and the best epoch's trainable tensors (by val200 accuracy) are returned."""
    from psoft_vision.memory import reset_peak_memory

    reset_peak_memory(t.accelerator.device)
    stop_at = args.epochs if args.stop_after_epochs is None else min(args.epochs,
                                                                     state["epoch"] + args.stop_after_epochs)
    for epoch in range(state["epoch"], stop_at):
        train_loss, seconds = train_epoch(t, args, epoch)
        state["train_s"] += seconds
        row = dict(epoch=epoch + 1, train_loss=train_loss, lr=t.scheduler.get_last_lr()[0], val_acc=None,
                   seconds=round(seconds, 3))
        if t.eval_loader is not None:
            row["val_acc"] = evaluate(t.model, t.eval_loader, t.accelerator)
            if row["val_acc"] > state["best_val"]:
                state["best_val"], state["best_epoch"] = row["val_acc"], epoch + 1
                best = {n: p.detach().clone().contiguous() for n, p in t.trainable_params.items()}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        write_checkpoint(t.accelerator, Path(args.output_dir) / "checkpoint", state, run_args=recorded_args(args),
                         best=best)
        if not args.quiet:
            val = f", val200 {row['val_acc']:.3f}" if row["val_acc"] is not None else ""
            t.accelerator.print(f"epoch {epoch + 1}: train loss {row['train_loss']:.3f}{val}")
    return best


# ---------------------------------------------------------------------------------------------- finishing
def save_result(model, method: str, output_dir: Path) -> Path:
    """A registered method's adapter file, PEFT's adapter folder, or the trainable tensors of full and linear."""
    from psoft_vision.files import atomic_write

    if registered(method) is not None:
        return pv.save_adapter(model, output_dir / "adapter.safetensors")
    if method in PEFT:
        model.save_pretrained(output_dir / "adapter")
        return output_dir / "adapter"
    from safetensors.torch import save_file

    path = output_dir / "trainable.safetensors"
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return path


def _plot(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, loss_axis = plt.subplots(figsize=(6, 3.5))
    loss_axis.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss", color="tab:blue")
    if history and history[0].get("val_acc") is not None:
        acc_axis = loss_axis.twinx()
        acc_axis.plot(epochs, [h["val_acc"] for h in history], color="tab:orange", marker="o", label="val200 acc")
        acc_axis.set_ylabel("val200 accuracy", color="tab:orange")
    loss_axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(t: Training, args, state: dict, best: dict | None) -> dict:
    """Test the selected epoch (the best by val200, else the last); the main process saves the result, metrics.json,
    metrics.csv and curve.png."""
    from psoft_vision.memory import peak_memory_mib

    accelerator, output_dir = t.accelerator, Path(args.output_dir)
    if best is not None:
        with torch.no_grad():
            for name, value in best.items():
                t.trainable_params[name].copy_(value)
    test_acc = evaluate(t.model, t.test_loader, accelerator)
    checksum = torch.stack([p.detach().double().sum() for p in t.trainable_params.values()]).sum()
    rank_checksums = accelerator.gather(checksum.to(accelerator.device).reshape(1)).tolist()
    metrics = dict(
        task=args.task or str(args.data_dir), model=args.model, method=args.method, seed=args.seed,
        protocol=args.protocol, classes=t.classes, trainable=t.trainable, head_params=t.head_params,
        test_acc=test_acc, start_val=state["start_val"],
        best_val=state["best_val"] if t.eval_loader is not None else None, best_epoch=state["best_epoch"],
        epochs=args.epochs, setup_s=round(t.setup_s, 3), train_s=round(state["train_s"], 2),
        peak_mib=round(peak_memory_mib(accelerator.device), 1), processes=accelerator.num_processes,
        rank_checksums=rank_checksums, history=state["history"], resumes=state["resumes"], finished=True,
        args=recorded_args(args),
    )
    if accelerator.is_main_process:
        metrics["saved"] = str(save_result(accelerator.unwrap_model(t.model), args.method, output_dir))
        write_json(output_dir / "metrics.json", metrics)
        write_csv(output_dir / "metrics.csv", state["history"])
        _plot(state["history"], output_dir / "curve.png", f"{metrics['task']}: {args.method}")
        write_card(output_dir, args, metrics, t.repo_id)
        metrics["pushed"] = run_hub.publish(output_dir, t.repo_id, args)
    accelerator.wait_for_everyone()
    return metrics


def write_card(output_dir: Path, args, metrics: dict, repo_id: str | None) -> Path:
    """README.md, the run's model card: the adapter (or PEFT folder, or trained tensors) and the run's accuracy."""
    from psoft_vision.card import write_model_card

    saved = Path(metrics["saved"])
    kind = "adapter" if registered(args.method) else "peft" if args.method in PEFT else "trainable"
    numbers = {"task": metrics["task"], "protocol": args.protocol, "classes": metrics["classes"],
               "test accuracy": metrics["test_acc"], "best val200 accuracy": metrics["best_val"],
               "best epoch": metrics["best_epoch"], "epochs": args.epochs, "learning rate": args.lr,
               "head learning rate": args.head_lr, "batch size": args.batch_size,
               "training time (s)": metrics["train_s"]}
    return write_model_card(output_dir, {saved.relative_to(output_dir).as_posix(): kind}, library="timm",
                            task="image-classification", base_model=timm_hub_id(args.model), base_name=args.model,
                            repo_id=repo_id, trained=BASELINE_NAMES.get(args.method), num_classes=metrics["classes"],
                            trainable=metrics["trainable"] + metrics["head_params"],
                            metrics={k: v for k, v in numbers.items() if v is not None})


def run(args: argparse.Namespace) -> dict:
    """Train, select, test and save one configuration; returns the metrics that metrics.json holds."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    # split_batches: --batch-size is the global batch, so N processes train exactly what one process trains.
    # (accelerate 1.15 ignores Accelerator(split_batches=True); only the DataLoaderConfiguration is honoured.)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    found, changes = resume_point(args, accelerator)
    training = build(args, accelerator)
    state, best = resume(training, found, changes)
    best = train(training, args, state, best)
    if state["epoch"] < args.epochs:
        accelerator.print(f"stopped after epoch {state['epoch']} of {args.epochs}; continue with --resume")
        return dict(state, finished=False)
    return finish(training, args, state, best)


def summary_line(m: dict) -> str:
    val = f"val200 {m['best_val']:.3f} (epoch {m['best_epoch']}), " if m["best_val"] is not None else ""
    return (f"{m['task']} | {m['method']:<10} | {m['trainable']:>9,} trainable + {m['head_params']:,} head | "
            f"{val}test {m['test_acc']:.3f} | {m['train_s']:.0f} s")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    metrics = run(args)
    if "saved" not in metrics:  # interrupted, or not the main process
        return metrics
    print(summary_line(metrics))
    if metrics.get("pushed"):
        print(f"uploaded {args.output_dir} to {metrics['pushed']}")
    if args.baseline:
        # Parsed anew, so that the baseline gets its own default learning rates; the last --method wins.
        baseline = parse_args([*argv, "--method", args.baseline,
                               "--output-dir", str(Path(args.output_dir) / f"baseline-{args.baseline}")])
        baseline.baseline = None
        baseline.push_to_hub = False  # its folder is inside this run's, which was uploaded already
        other = run(baseline)
        print(summary_line(other))
        print(f"test accuracy: {args.method} {metrics['test_acc']:.3f} against {args.baseline} probing "
              f"{other['test_acc']:.3f}; adapter saved to {metrics['saved']}")
    return metrics

