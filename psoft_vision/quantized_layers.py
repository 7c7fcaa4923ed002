"""Quantized layers of a frozen base (QOFT, QPSOFT): which quantized linear layers adapters take and how their
weight is read (:func:`psoft_vision.quantize_base`, in :mod:`psoft_vision.quantized`, quantizes a model that was not
loaded quantized).

Supported (extra ``quant``):

- bitsandbytes ``Linear4bit`` (NF4 and FP4, with or without double quantization) and ``Linear8bitLt`` (int8 with
  fp16 outliers off, ``has_fp16_weights=False``);
- torchao int8 weight-only (``Int8WeightOnlyConfig``: an ``Int8Tensor`` weight on an ``nn.Linear``). torchao's
  int4 weight-only needs CUDA (or its ``mslk`` kernels) and is not supported.

The quantized layer always runs as it is: OFT rotates its input, PSOFT adds its r-wide path to its output. Only
PSOFT reads the weight, once, at inject, dequantized to fp32 one layer at a time; the principal subspace is that
of the dequantized weight, so the quantization error stays in the frozen residual. Any other layer whose weight is
quantized (a tensor subclass, or a weight of a non-floating dtype) is refused by name.
"""

import torch
from torch import nn

from .errors import UnsupportedLayerError

SUPPORTED = ("bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt (int8), torchao int8 weight-only")


def _refuse(name: str, module: nn.Module, what: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"{name!r} ({type(module).__name__}) {what}; adapters take these quantized layers: "
                                 f"{SUPPORTED}. Leave it out of `targets`, or quantize with "
                                 "psoft_vision.quantize_base.")


def quantization_of(module: nn.Module, name: str = "") -> str | None:
    """The quantization of a linear layer's weight (``"bnb-nf4"``, ``"bnb-nf4-double"``, ``"bnb-fp4"``,
    ``"bnb-int8"``, ``"torchao-int8"``), None for a floating weight, or an ``UnsupportedLayerError`` for any other
    quantization."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return None  # no weight yet: base_of says so
    kind = type(weight).__name__
    if type(weight).__module__.startswith("bitsandbytes"):
        if kind == "Params4bit":
            if not getattr(weight, "bnb_quantized", False) or weight.quant_state is None:
                raise _refuse(name, module, "holds a Params4bit weight that is not quantized yet (bitsandbytes "
                                            "quantizes on the first .to(device))")
            nested = "-double" if getattr(weight.quant_state, "nested", False) else ""  # quantized scales
            return f"bnb-{weight.quant_state.quant_type}{nested}"
        if kind == "Int8Params" and weight.dtype == torch.int8 and _int8_scales(module) is not None:
            return "bnb-int8"
        raise _refuse(name, module, f"holds a bitsandbytes {kind} weight of dtype {weight.dtype}")
    if type(weight).__module__.startswith("torchao"):
        if kind == "Int8Tensor":
            return "torchao-int8"
        raise _refuse(name, module, f"holds a torchao {kind} weight")
    if type(weight) not in (torch.Tensor, nn.Parameter):
        raise _refuse(name, module, f"holds a weight of tensor subclass {type(weight).__name__}")
    if not weight.is_floating_point():
        raise _refuse(name, module, f"holds a weight of dtype {weight.dtype}")
    return None


def _int8_scales(module: nn.Module) -> torch.Tensor | None:
    """A Linear8bitLt's per-row scales: on its weight until the first forward, on its matmul state after."""
    scales = getattr(module.weight, "SCB", None)
    state = getattr(module, "state", None)
    return scales if scales is not None else getattr(state, "SCB", None)


@torch.no_grad()
def dequantized_weight(module: nn.Module, quantization: str) -> torch.Tensor:
    """The weight a quantized layer computes with, in fp32, (out, in)."""
    weight = module.weight
    if quantization.startswith("bnb-") and quantization != "bnb-int8":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(*_training_layout(weight)).float()
    if quantization == "bnb-int8":
        return weight.data.float() * (_int8_scales(module).float()[:, None] / 127)
    return weight.dequantize().float()


def _training_layout(weight) -> tuple[torch.Tensor, object]:
    """A 4-bit weight's data and quantization state in bitsandbytes' ordinary layout. On a CPU with AVX512-BF16,
    bitsandbytes repacks a Linear4bit's weight for a bf16 kernel at its first eval-mode forward: that layout
    dequantizes to garbage through dequantize_4bit, so it is converted back (on copies; the module is untouched)."""
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return weight.data, weight.quant_state


def keep_training_layout(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking an adapted Linear4bit for its CPU bf16 kernel (and undo a repack already
    made): a repacked layer computes eval-mode outputs about 0.3% away from training-mode ones, and a training forward
    after that repack fails inside bitsandbytes ("a view of a leaf Variable ... in-place")."""
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _training_layout(weight)


