"""One configuration measured in this process: set-up, training steps, peak memory, adapter file, inference; and
the SVD set-up report."""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from psoft_vision.memory import peak_memory_mib, reset_peak_memory

from .methods import methods
from .ops import count_step
from .workloads import WORKLOADS


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


def _adapter_bytes(model) -> int | None:
    import psoft_vision as pv

    with tempfile.TemporaryDirectory() as tmp:
        if hasattr(model, "peft_config"):
            model.save_pretrained(tmp)
            return sum(p.stat().st_size for p in Path(tmp).rglob("*.safetensors"))
        if not pv.adapter_names(model):
            return None
        return pv.save_adapter(model, Path(tmp, "adapter.safetensors")).stat().st_size


def _tensor_bytes(t: torch.Tensor) -> int:
    """Storage of a tensor, with a bitsandbytes weight's quantization state and a tensor subclass's parts."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        return sum(_tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    state = getattr(t, "quant_state", None)
    extra = sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                if isinstance(v, torch.Tensor)) if state is not None else 0
    scales = getattr(t, "SCB", None)
    return t.numel() * t.element_size() + extra + (scales.numel() * scales.element_size() if scales is not None else 0)


def base_kind(model) -> str:
    """The quantizations of the model's linear layers ("bnb-nf4", ...), or "float"."""
    from psoft_vision.bases import classify

    kinds = set()
    for module in model.modules():
        kind = classify(module) if isinstance(module, torch.nn.Linear) else None
        if kind is not None and kind.quantized:
            kinds.add(kind.quantized)
    return ",".join(sorted(kinds)) or "float"


def base_bytes(model) -> int:
    """Bytes of the frozen weights: what a quantized base saves."""
    return sum(_tensor_bytes(p) for p in model.parameters() if not p.requires_grad)


def run_config(workload: str, method: str, steps: int, warmup: int, device: str) -> dict:
    device = torch.device(device)
    torch.manual_seed(0)
    model, inputs, loss_fn, spec = WORKLOADS[workload](device)
    start = time.perf_counter()
    model, merge = methods()[method](model, spec)
    setup_s = time.perf_counter() - start
    trainable = [p for p in model.parameters() if p.requires_grad]
    # foreach, as AdamW defaults to on a GPU: one multi-tensor op per update, whatever the number of parameters
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=True) if trainable else None
    x = inputs[0].clone().requires_grad_(method == "floor")
    model.train()

    def step():
        loss = loss_fn(model, x)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None

    for _ in range(max(warmup, 1)):  # the optimizer's state exists before ops are counted
        step()
    dispatched = count_step(step, optimizer)
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
        workload=workload, method=method, device=str(device), base=base_kind(model),
        trainable=sum(p.numel() for p in trainable),
        setup_s=setup_s, step_ms=1000 * statistics.median(step_s), step_ms_all=[1000 * s for s in step_s],
        step_ops=dispatched["ops"], step_syncs=dispatched["syncs"],
        peak_mib=peak, base_mib=base_bytes(model) / 2**20, adapter_bytes=_adapter_bytes(model), infer_ms=1000 * infer_s,
        infer_merged_ms=None if merged_s is None else 1000 * merged_s,
    )


def svd_report(workloads: list[str]) -> str:
    """Set-up time of the principal subspaces of every targeted layer, "full" against "lowrank", and how far the
    lowrank rank-r approximation is from the exact one (relative Frobenius error, median and worst layer)."""
    from psoft_vision.methods import principal_subspace
    from psoft_vision.targets import select

    lines = []
    for workload in workloads:
        model, _, _, spec = WORKLOADS[workload](torch.device("cpu"))
        weights = [model.get_submodule(n).weight.detach().flatten(1) for n in select(model, spec["targets"])]
        rank = spec["sizes"]["rank"]
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
