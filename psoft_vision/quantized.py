"""quantize_base: a model's linear layers quantized in place (bitsandbytes NF4/FP4/int8, torchao int8), for models
that were not loaded quantized. Which quantized layers adapters take, and how their weights are read, is
:mod:`psoft_vision.quantized_layers`; its names are importable from here too, as they were before it was split off.
"""

from torch import nn

from .errors import ConfigError
from .model import adapted_layers
from .quantized_layers import SUPPORTED, dequantized_weight, keep_training_layout, quantization_of  # noqa: F401

#: quantize_base's schemes: library, kind, options.
SCHEMES = {
    "nf4": ("bitsandbytes", "4bit", dict(quant_type="nf4", compress_statistics=False)),
    "nf4-double": ("bitsandbytes", "4bit", dict(quant_type="nf4", compress_statistics=True)),
    "fp4": ("bitsandbytes", "4bit", dict(quant_type="fp4", compress_statistics=False)),
    "int8": ("bitsandbytes", "8bit", {}),
    "int8-torchao": ("torchao", "int8", {}),
}


def _linears(model: nn.Module, skip: set[str]) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip
            and not any(n.startswith(s + ".") for s in skip)]


def default_skip(model: nn.Module) -> set[str]:
    """Layers kept in floating point: a timm model's classifier, a diffusers model's fp32 modules."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or ()
    keep = set((classifier,) if isinstance(classifier, str) else classifier)
    keep.update(getattr(model, "_keep_in_fp32_modules", None) or ())
    return keep


def _bnb_linear(linear: nn.Linear, kind: str, options: dict) -> nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                  compute_dtype=linear.weight.dtype, **options)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, module=layer,
                                         quant_type=options["quant_type"],
                                         compress_statistics=options["compress_statistics"])
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # bitsandbytes quantizes on the move to a device


def quantize_base(model: nn.Module, scheme: str = "nf4", skip=None) -> nn.Module:
    """Quantize the model's ``nn.Linear`` layers in place (before ``inject``), for models not loaded quantized.

    ``scheme``: one of :data:`SCHEMES` (``"nf4"`` is QLoRA's). ``skip``: module names kept in floating point
    (default: a timm classifier, a diffusers model's ``_keep_in_fp32_modules``). Convolutions stay as they are.
    Every replacement is built before the model changes, so a failure leaves it as it was.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r} is not one of {', '.join(SCHEMES)}.")
    if any(True for _ in adapted_layers(model)):
        raise ConfigError("the model already has adapters: quantize the base first, then inject (the adapters "
                          "must be built on the weights the quantized layers compute with).")
    library, kind, options = SCHEMES[scheme]
    names = _linears(model, set(default_skip(model) if skip is None else skip))
    if library == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        chosen = set(names)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in chosen)
        return model
    replacements = {n: _bnb_linear(model.get_submodule(n), kind, options) for n in names}
    for n, layer in replacements.items():
        keep_training_layout(layer)
        model.set_submodule(n, layer)
    return model
