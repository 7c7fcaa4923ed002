"""The DreamBooth trainer's optimiser (AdamW, or bitsandbytes' 8-bit AdamW) and learning-rate schedules.

Schedules have diffusers' names and shapes (``--lr_scheduler``); the warm-up counts the step being taken, so that
the first step already learns: step ``i`` of a warm-up of ``W`` steps has ``(i + 1) / W`` of the rate, where
diffusers' ``get_scheduler`` gives ``i / W`` (a first step at rate 0). ``cosine`` is the schedule this project's
trainers have always used (train/common/schedule.py).
"""

import math

import torch

from ..common.schedule import cosine_with_warmup
from .errors import DreamBoothError

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def schedule_factor(name: str, total_steps: int, warmup_steps: int):
    """A ``LambdaLR`` factor for schedule ``name``: ``constant`` (no warm-up), ``constant_with_warmup``, ``linear``
    (warm-up, then down to 0 at ``total_steps``) or ``cosine`` (warm-up, then a half cosine to 0)."""
    if name == "cosine":
        return cosine_with_warmup(total_steps, warmup_steps)
    if name == "constant":
        return lambda step: 1.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant_with_warmup":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    if name not in SCHEDULES:
        raise DreamBoothError(f"--lr_scheduler {name!r} is not one of {', '.join(SCHEDULES)}.")
    return factor


def adamw_8bit(device: torch.device):
    """bitsandbytes' ``AdamW8bit``, after one probe step on ``device`` (a tensor large enough for 8-bit state):
    a named error with the fix where bitsandbytes is missing or has no kernels for the device."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise DreamBoothError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (psoft-vision[quant]), "
                              "or leave the flag out.") from error
    probe = torch.nn.Parameter(torch.zeros(4096, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as error:  # bitsandbytes raises several kinds for a device it has no kernels for
        raise DreamBoothError(f"bitsandbytes {bnb.__version__} cannot run 8-bit AdamW on {device.type} "
                              f"({type(error).__name__}: {error}); leave out --use_8bit_adam, or install a "
                              "bitsandbytes build with kernels for this device.") from error
    return bnb.optim.AdamW8bit


def make_optimizer(groups: list[dict], args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW) over the parameter groups, with diffusers' ``--adam_*`` settings."""
    kind = adamw_8bit(device) if args.use_8bit_adam else torch.optim.AdamW
    return kind(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def make_scheduler(optimizer, args) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule_factor(args.lr_scheduler, args.max_train_steps, args.lr_warmup_steps))


def steps_per_epoch(instances: int, classes: int, batch: int, processes: int, accumulation: int) -> int:
    """Optimiser steps in one pass over the data as diffusers' DreamBooth dataset counts it: the larger of the
    instance and class image sets, in batches of ``batch`` per process, ``accumulation`` batches a step."""
    batches = math.ceil(max(instances, classes) / (batch * processes))
    return max(1, math.ceil(batches / accumulation))
