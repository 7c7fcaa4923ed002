"""Named target presets. ``targets="auto"`` picks the structural one for the model's library.

Each preset turns a model into the names of the layers it adapts. The structural presets read the model's
structure (:mod:`psoft_vision.targets.structure`); the regex presets are kept for people who relied on their
exact names.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .structure import (
    candidate_modules,
    diffusers_targets,
    is_diffusers_model,
    is_timm_model,
    is_transformers_model,
    timm_targets,
    transformers_targets,
)


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    layers: Callable[[nn.Module], list[str]]  # model -> names of the layers to adapt, in model order
    pattern: str | None = None  # the full-match regex of a regex preset, to build on


def _regex(name: str, summary: str, pattern: str) -> Preset:
    compiled = re.compile(pattern)
    return Preset(name, summary, lambda model: [n for n, _ in candidate_modules(model) if compiled.fullmatch(n)],
                  pattern)


_TIMM_VIT = r"(.+\.)?blocks\.\d+\.(attn\.(qkv|q_proj|k_proj|v_proj|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))"

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("timm", "timm models: the linear and dense conv layers of the repeated blocks or stages (timm's "
           "group_matcher); no stem, patch embedding, head, final norm or grouped conv", timm_targets),
    Preset("diffusers", "diffusers denoisers: attention projections (context stream included), the linear and 1x1 "
           "conv layers of transformer blocks, nested proj_in/proj_out; no embedder or adaLN modulation",
           diffusers_targets),
    Preset("diffusers+conv", "diffusers plus the 3x3 convs (conv1, conv2) of every ResNet block of a UNet",
           lambda model: diffusers_targets(model, resnet_convs=True)),
    Preset("transformers", "transformers models (text encoders: CLIP, T5, Gemma): the linear layers of the encoder or "
           "decoder layers (attention q/k/v/out, MLP); no embedding, final norm or projection head",
           transformers_targets),
    _regex("timm-vit", "the four linears of every ViT-style block by name: blocks.N.attn.qkv, attn.proj, mlp.fc1, "
           "mlp.fc2", _TIMM_VIT),
)}
#: Earlier names of the structural presets, still accepted (and in PRESETS, as the same presets).
ALIASES = {"unet": "diffusers", "unet+conv": "diffusers+conv", "diffusion-transformer": "diffusers"}
PRESETS.update({alias: PRESETS[name] for alias, name in ALIASES.items()})


def preset_for(model: nn.Module) -> str:
    """The preset ``targets="auto"`` uses for this model, or None when it is no timm, diffusers or transformers
    model."""
    if is_timm_model(model):
        return "timm"
    if is_diffusers_model(model):
        return "diffusers"
    if is_transformers_model(model):
        return "transformers"
    return None


def resolve(spec) -> Preset | None:
    """The preset a target spec names (a preset name or a :class:`Preset`), else None."""
    if isinstance(spec, Preset):
        return spec
    return PRESETS.get(spec) if isinstance(spec, str) else None
