"""Where adapters go: presets per model family, and matching of user target specs to module names."""

import difflib
import re
from collections.abc import Callable, Iterator

from torch import nn

from .errors import TargetNotFoundError
from .layer import AdaptedLayer

_TIMM_VIT = r"(.+\.)?blocks\.\d+\.(attn\.(qkv|q_proj|k_proj|v_proj|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))"
# Any depth below attentions.N: Transformer2DModel blocks, dual cross-attention, and the bare Attention modules
# of the SimpleCrossAttn blocks.
_UNET_ATTENTION = (
    r".*attentions\.\d+\.(.+\.)?"
    r"(proj_in|proj_out|to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj|ff\.net\.(0\.proj|2))"
)
_UNET_RESNET = r".*resnets\.\d+\.(conv1|conv2)"
_DIFFUSION_TRANSFORMER = (
    r"(single_)?transformer_blocks\.\d+\."
    r"(attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)"
)

#: Named presets, each a full-match regex over module names. ``targets="auto"`` picks one from the model class.
PRESETS = {
    # ViT, DeiT, EVA, BEiT, Swin: the four linears of every block; never patch_embed.proj, never the head.
    "timm-vit": _TIMM_VIT,
    # UNet2DConditionModel: attention, feed-forward and the transformers' proj_in / proj_out.
    "unet": _UNET_ATTENTION,
    # The same, plus the 3x3 convs of every ResNet block.
    "unet+conv": f"({_UNET_ATTENTION})|({_UNET_RESNET})",
    # DiT, PixArt, SD3, Flux: attention (with the context stream's projections) and feed-forward in every block.
    "diffusion-transformer": _DIFFUSION_TRANSFORMER,
}

_PRESET_BY_CLASS = {
    "UNet2DConditionModel": "unet",
    "DiTTransformer2DModel": "diffusion-transformer",
    "PixArtTransformer2DModel": "diffusion-transformer",
    "SD3Transformer2DModel": "diffusion-transformer",
    "FluxTransformer2DModel": "diffusion-transformer",
}


def chosen_by_preset(spec) -> bool:
    """Whether a target spec lets the library choose the layers (``"auto"`` or a preset name)."""
    return isinstance(spec, str) and (spec == "auto" or spec in PRESETS)


def auto_preset(model: nn.Module) -> str:
    """The preset ``targets="auto"`` uses for this model."""
    for cls in type(model).__mro__:
        if cls.__name__ in _PRESET_BY_CLASS:
            return _PRESET_BY_CLASS[cls.__name__]
        if cls.__module__.startswith("timm."):
            return "timm-vit"
    raise TargetNotFoundError(
        f"targets='auto' has no preset for {type(model).__name__}; pass targets= a preset "
        f"({', '.join(PRESETS)}), a list of module names, a regex or a callable."
    )


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, where an adapted layer stands for itself and its base layer is hidden."""
    inside = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, AdaptedLayer) else None
        if name:
            yield name, module


def _name_matches(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith("." + wanted)


def _closest(wanted: str, names: list[str]) -> str:
    by_suffix = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), name)
    close = difflib.get_close_matches(wanted, list(by_suffix), n=5, cutoff=0.5)
    shown = list(dict.fromkeys(by_suffix[c] for c in close)) or names[:5]
    return ", ".join(repr(n) for n in shown)


def _pattern_or_callable(model: nn.Module, spec) -> tuple[str, Callable[[str, nn.Module], bool]]:
    if isinstance(spec, str | re.Pattern):
        if spec == "auto":
            spec = auto_preset(model)
        if isinstance(spec, str) and spec in PRESETS:
            label, pattern = f"preset {spec!r}", re.compile(PRESETS[spec])
        else:
            pattern = re.compile(spec)
            label = f"regex {pattern.pattern!r}"
        return label, lambda name, module: pattern.fullmatch(name) is not None
    if callable(spec):
        return f"callable {getattr(spec, '__name__', spec)!r}", spec
    raise TypeError(
        f"a target spec must be 'auto', a preset name, a regex, a list of module names or a callable; got {spec!r}."
    )


def select(model: nn.Module, spec, role: str = "targets") -> list[str]:
    """Names of the modules ``spec`` picks, in model order; every part of ``spec`` must pick something."""
    modules = dict(candidate_modules(model))
    names = list(modules)

    def none_found(what: str, wanted: str) -> TargetNotFoundError:
        return TargetNotFoundError(
            f"{role} {what} matched no module of {type(model).__name__}; closest names: {_closest(wanted, names)}."
            + (f" Presets: {', '.join(PRESETS)}." if role == "targets" else "")
        )

    if isinstance(spec, list | tuple):
        chosen = set()
        for wanted in spec:
            hits = [n for n in names if _name_matches(n, wanted)]
            if not hits:
                raise none_found(repr(wanted), wanted)
            chosen.update(hits)
        return [n for n in names if n in chosen]
    label, predicate = _pattern_or_callable(model, spec)
    chosen = [n for n in names if predicate(n, modules[n])]
    if not chosen:
        raise none_found(label, label.split(" ", 1)[1].strip("'"))
    return chosen


def excluder(model: nn.Module, spec) -> Callable[[str, nn.Module], bool]:
    """A predicate for an ``exclude`` spec, which unlike targets may match nothing."""
    if spec is None:
        return lambda name, module: False
    if isinstance(spec, list | tuple):
        return lambda name, module: any(_name_matches(name, wanted) for wanted in spec)
    return _pattern_or_callable(model, spec)[1]
