"""Where adapters go in a model, read from its structure rather than from names.

timm models: the linear and dense convolution layers inside the repeated blocks or stages, as the model's own
``group_matcher`` defines them (a generic rule for the few models without one): attention projections, MLP and
pointwise layers, the 3x3 convolutions of residual blocks. Never the stem or a patch embedding (no layer that reads
the image's channels), the classifier (``pretrained_cfg["classifier"]``), the final norm or convolution after the
blocks, normalisation layers, grouped convolutions or layers with a single input channel.

diffusers denoisers: every linear layer of every attention module (the context stream's projections included), the
linear and 1x1 convolution layers of the transformer blocks (feed-forward, single-stream MLPs and projections; a
transformer block is a module with an attention module among its children), and the ``proj_in`` / ``proj_out`` of
transformers nested in a UNet or ControlNet. Never timestep or conditioning embedders, adaLN modulation (a linear
inside a normalisation or modulation module, one named for modulation or adaLN, or the linear of a
``Sequential(SiLU(), Linear)``), the patch embedding or the final projection of the model.
"""

import math
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..bases import CONV2D, LINEAR, classify
from ..errors import TargetNotFoundError
from ..layer import AdaptedLayer

#: A group_matcher pattern with a suffix this large sorts after its group's blocks: timm's MATCH_PREV_GROUP (99999)
#: joins it to the group before it, Xception's 99 puts its exit convs after the last block.
_LATE_SUFFIX = 99


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, where an adapted layer stands for itself and its base layer is hidden."""
    inside = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = name + "." if isinstance(module, AdaptedLayer) else None
        if name:
            yield name, module


def _layer(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, AdaptedLayer) else module


def dense_layer(module: nn.Module) -> bool:
    """A layer ``"auto"`` may adapt: a supported linear or convolution layer that is not grouped."""
    kind = classify(_layer(module))
    return kind is not None and kind.name in (LINEAR, CONV2D) and kind.groups == 1


def is_timm_model(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("timm.") for cls in type(model).__mro__)


def is_diffusers_model(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("diffusers.") for cls in type(model).__mro__)


# ------------------------------------------------------------------------------------------------------- timm
def _specs(spec) -> list[tuple[str, tuple | None]]:
    """A group's patterns as ``(regex, suffix)`` pairs, from a string, a list of strings or a list of pairs."""
    if isinstance(spec, str):
        return [(spec, None)]
    return [(s, None) if isinstance(s, str) else (s[0], s[1]) for s in spec or ()]


def _timm_groups(model: nn.Module):
    """``name -> "stem" | "block" | "late" | None`` by the model's ``group_matcher``; None if it has none.

    A dict matcher lists patterns per group: ``stem`` first, the blocks under any other key (``blocks``, HRNet's
    ``block_types``, XCiT's ``cls_attn_blocks``, CoaT's ``stem2`` between stages, ...). A pattern with a large suffix
    (``_LATE_SUFFIX``) sorts after the blocks it follows: a transition between stages, or a final norm or conv after
    the last block ("late"). A function matcher gives each parameter an ordinal, 0 for the stem and infinity for the
    head. What no pattern matches is the head (None).
    """
    matcher = getattr(model, "group_matcher", None)
    try:
        groups = matcher(coarse=False) if callable(matcher) else None
    except Exception:  # a model whose matcher needs what it was not built with
        return None
    if callable(groups):
        def group(name: str) -> str | None:
            ordinal = groups(name + ".weight")
            first = ordinal[0] if isinstance(ordinal, tuple | list) else ordinal
            return "block" if 0 < first < math.inf else "stem" if first == 0 else None
        return group
    if not isinstance(groups, dict) or not any(key != "stem" and spec for key, spec in groups.items()):
        return None
    patterns = [(key == "stem", re.compile(p), bool(suffix) and suffix[-1] >= _LATE_SUFFIX)
                for key, spec in groups.items() for p, suffix in _specs(spec)]

    def group(name: str) -> str | None:
        hits = [(stem, late) for stem, pattern, late in patterns if pattern.match(name + ".weight")]
        if any(stem for stem, _ in hits):
            return "stem"
        if any(not late for _, late in hits):
            return "block"
        return "late" if hits else None
    return group


def _timm_in_block(model: nn.Module, names: list[str]) -> set[str] | None:
    """Which of ``names`` (in model order) are inside the blocks by the model's ``group_matcher``; None if it has
    none. A "late" layer is inside when a block follows it (DenseNet's transitions, HRNet's), and after the blocks
    otherwise (a final conv_head)."""
    group = _timm_groups(model)
    if group is None:
        return None
    groups = [group(name) for name in names]
    last_block = max((i for i, g in enumerate(groups) if g == "block"), default=-1)
    return {name for i, (name, g) in enumerate(zip(names, groups, strict=True))
            if g == "block" or (g == "late" and i < last_block)}


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the children of every ``Sequential`` / ``ModuleList`` holding two or more modules of one class."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential | nn.ModuleList):
            kinds = [type(child) for child in module.children()]
            if any(kinds.count(k) >= 2 and not issubclass(k, nn.Linear | nn.Conv2d) for k in kinds):
                found += [f"{name}.{child}" if name else child for child, _ in module.named_children()]
    return found


def _image_channels(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return (cfg.get("input_size") or (3,))[0]


def _reads_image(module: nn.Module, channels: int) -> bool:
    layer = _layer(module)
    return isinstance(layer, nn.Conv2d) and layer.in_channels == channels


def _reads_one_channel(module: nn.Module) -> bool:
    """A layer with one input feature or channel (CSATv2's 1-wide spatial attention): a per-channel filter like a
    depthwise one, with nothing for a rotation of its input to mix."""
    layer = _layer(module)  # by its geometry: a quantized layer's packed weight has no meaningful shape
    return (layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels // layer.groups) == 1


def timm_targets(model: nn.Module) -> list[str]:
    """The layers of a timm model that ``"auto"`` adapts (see the module docstring); on a ``features_only``
    wrapper, exactly those the full model would adapt among the layers the wrapper keeps."""
    wrapper = _feature_wrapper(model)
    if wrapper is not None:
        return _wrapper_targets(model, *wrapper)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    channels = _image_channels(model)
    layers = [(name, module) for name, module in candidate_modules(model) if dense_layer(module)]
    in_block = _timm_in_block(model, [name for name, _ in layers])
    if in_block is None:
        prefixes = tuple(b + "." for b in repeated_blocks(model))
        in_block = {name for name, _ in layers if name.startswith(prefixes)}
    return [name for name, module in layers
            if name in in_block and not _reads_image(module, channels) and not _reads_one_channel(module)
            and not any(name == c or name.startswith(c + ".") for c in classifier)]


# ---------------------------------------------------------------------------------------- timm feature wrappers
def _feature_wrapper(model: nn.Module) -> tuple[str, bool] | None:
    """``(where the wrapper keeps the model's modules, whether that is the whole model)`` for a timm
    ``features_only`` wrapper, None for any other module.

    FeatureGetterNet keeps the model itself (``model``), as FeatureHookNet does without rewriting (``body``).
    FeatureListNet, FeatureDictNet and FeatureHookNet keep the model's top-level modules up to its last feature, the
    first level of each ``Sequential`` flattened (``stages.0`` becomes ``stages_0``); FeatureGraphNet's fx graph
    (``graph_module``) keeps the modules it calls under their own paths. Neither kind keeps ``group_matcher``.
    """
    if not is_timm_model(model):
        return None
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet
    from timm.models._features_fx import FeatureGraphNet

    if isinstance(model, FeatureGetterNet):
        return "model", True
    if isinstance(model, FeatureHookNet) and list(model.keys()) == ["body"]:
        return "body", True
    if isinstance(model, FeatureDictNet | FeatureHookNet):
        return "", False
    if isinstance(model, FeatureGraphNet):
        return "graph_module", False
    return None


def _wrapper_targets(model: nn.Module, where: str, whole: bool) -> list[str]:
    """The full model's targets among the layers a feature wrapper keeps, under the wrapper's names."""
    prefix = where + "." if where else ""
    if whole:
        return [prefix + name for name in timm_targets(model.get_submodule(where))]
    holder = model.get_submodule(where) if where else model
    full, originals = _with_kept_modules(model, holder)
    kept = {name for name, _ in holder.named_modules()}
    found = []
    for name in timm_targets(full):
        for original, child in originals.items():
            if (name == original or name.startswith(original + ".")) and child + name[len(original):] in kept:
                found.append(prefix + child + name[len(original):])
    return found


def _with_kept_modules(model: nn.Module, holder: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """The wrapped architecture built on the meta device with the wrapper's own modules put in their places, and
    ``{path in that model: name of the holder's child}``: the full model's structure (its ``group_matcher``, the
    stages the wrapper dropped) around the wrapper's real layers."""
    import timm
    from timm.models._features_fx import FeatureGraphNet

    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    try:
        with torch.device("meta"):
            full = timm.create_model(arch, pretrained=False)
    except Exception as error:
        raise TargetNotFoundError(
            f"targets='auto' on a timm {type(model).__name__} reads the layout of the model it wraps, "
            f"pretrained_cfg['architecture']={arch!r}, which could not be built ({type(error).__name__}: {error}). "
            f"{_WRAPPER_ADVICE}") from error
    kept = dict(holder.named_children())
    originals = {}
    for name, child in full.named_children():
        if name in kept:
            originals[name] = name
        elif isinstance(child, nn.Sequential):
            originals.update({f"{name}.{sub}": f"{name}_{sub}" for sub, _ in child.named_children()
                              if f"{name}_{sub}" in kept})
    _check_in_default_build(model, arch, sorted(set(kept) - set(originals.values())))
    if isinstance(model, FeatureGraphNet):
        # fx keeps each module the graph calls under its own path, but in plain containers: the full model's own
        # containers (its Sequential stages, ModuleList blocks and what its group_matcher reads) stay around them
        leaves = [(name, module) for name, module in candidate_modules(holder)
                  if isinstance(module, AdaptedLayer) or not any(module.children())]
        _check_in_default_build(model, arch, [name for name, _ in leaves if not _has_submodule(full, name)])
        for name, module in leaves:
            full.set_submodule(name, module)
    else:
        for original, child in originals.items():
            full.set_submodule(original, kept[child])
    return full, originals


_WRAPPER_ADVICE = "Inject into the full model before wrapping it, or pass targets= the module names."


def _check_in_default_build(model: nn.Module, arch: str, unknown: list[str]) -> None:
    """Raise TargetNotFoundError naming the wrapper's modules (``unknown``) that the default build lacks."""
    if unknown:
        more = f" ({len(unknown)} in all)" if len(unknown) > 3 else ""
        raise TargetNotFoundError(
            f"targets='auto' on a timm {type(model).__name__}: {unknown[:3]}{more} are not modules of {arch!r} as "
            f"timm builds it by default. {_WRAPPER_ADVICE}")


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


# -------------------------------------------------------------------------------------------------- diffusers
def _is_attention(module: nn.Module) -> bool:
    return any(cls.__name__ in ("Attention", "AttentionModuleMixin") or cls.__name__.endswith("Attention")
               for cls in type(module).__mro__ if cls.__module__.startswith("diffusers."))


#: Class-name and attribute-name parts of modules whose linears modulate or embed rather than transform.
_CONDITIONING_CLASSES = ("Norm", "Embed", "Modulat")  # not "AdaLN": ErnieImageSharedAdaLNBlock is a block
_CONDITIONING_NAMES = ("embed", "modulation", "adaln")


def _is_conditioning(name: str, module: nn.Module) -> bool:
    """A normalisation wrapper (adaLN), an embedder or a modulation module, by its class or attribute name.

    Names as well as classes, because several models hold their modulation in a bare ``Sequential`` named for what
    it does (Z-Image's ``adaLN_modulation = Sequential(Linear)``, with no activation to recognise it by).
    """
    cls, attribute = type(module).__name__, name.rsplit(".", 1)[-1].lower()
    return any(k in cls for k in _CONDITIONING_CLASSES) or any(k in attribute for k in _CONDITIONING_NAMES)


def _modulation_after_activation(parent: nn.Module, child: str) -> bool:
    """``Sequential(SiLU(), Linear(...))``: the adaLN modulation of QwenImage, HiDream and others.

    Only a linear right after an activation that opens the ``Sequential``: the second linear of a feed-forward
    ``Sequential(Linear, GELU, Linear)`` (Wan-Animate 2, ConsisID's perceiver) also follows an activation.
    """
    if not isinstance(parent, nn.Sequential):
        return False
    names = [n for n, _ in parent.named_children()]
    return names.index(child) == 1 and isinstance(parent[0], nn.SiLU | nn.GELU | nn.ReLU)


def _pointwise(module: nn.Module) -> bool:
    layer = _layer(module)
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1))


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the modules that hold an attention module among their children (attention modules themselves
    excluded), outermost only."""
    found = []
    for name, module in model.named_modules():
        if name and not _is_attention(module) and any(_is_attention(c) for c in module.children()) \
                and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def diffusers_targets(model: nn.Module, resnet_convs: bool = False) -> list[str]:
    """The layers of a diffusers denoiser that ``"auto"`` adapts (see the module docstring); with
    ``resnet_convs`` also the dense convolutions of its ResNet blocks (``conv1``, ``conv2``)."""
    modules = dict(model.named_modules())
    block_names = transformer_blocks(model)
    blocks = tuple(b + "." for b in block_names)
    # The module that holds a list of transformer blocks, unless it is the model itself: a transformer nested in a
    # UNet or ControlNet, whose proj_in / proj_out are its block-level projections.
    holders = {parts[0] for parts in (b.rsplit(".", 2) for b in block_names) if len(parts) == 3}

    def wanted(name: str, module: nn.Module) -> bool:
        parent_name, _, child = name.rpartition(".")
        parts = name.split(".")
        ancestors = [modules[".".join(parts[:i])] for i in range(1, len(parts))]
        if any(_is_conditioning(".".join(parts[:i + 1]), a) for i, a in enumerate([*ancestors, module])):
            return False
        if _modulation_after_activation(modules.get(parent_name, model), child):
            return False
        if any(_is_attention(a) for a in ancestors):
            return True
        if name.startswith(blocks):
            return _pointwise(module)
        if parent_name in holders and _pointwise(module):
            return True
        return resnet_convs and ".resnets." in f".{name}" and child in ("conv1", "conv2")

    return [name for name, module in candidate_modules(model) if dense_layer(module) and wanted(name, module)]


# ----------------------------------------------------------------------------------------------- transformers
def is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def layer_stacks(model: nn.Module) -> list[str]:
    """Names of the layers of a transformers model's encoder or decoder stacks, outermost only: the children of a
    ``ModuleList`` whose members are all of one class that the model declares a layer (``_no_split_modules``:
    ``CLIPEncoderLayer``, ``T5Block``, ``Gemma2DecoderLayer``; a one-layer stack counts too), or of any list of two or
    more modules of one class (:func:`repeated_blocks`) when it declares none."""
    declared = set(getattr(model, "_no_split_modules", None) or ())
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(f + ".") for f in found):
            continue
        kinds = {type(child).__name__ for child in module.children()}
        if len(kinds) == 1 and kinds <= declared:
            found += [f"{name}.{child}" if name else child for child, _ in module.named_children()]
    return found or repeated_blocks(model)


def transformers_targets(model: nn.Module) -> list[str]:
    """The layers of a transformers model (a text encoder: CLIP, T5, Gemma) that ``"auto"`` adapts: the dense linear
    layers inside its layer stacks (attention q/k/v/out and the MLP, CLIP's ``encoder.layers.N.self_attn.q_proj`` or
    T5's ``encoder.block.N.layer.0.SelfAttention.q`` and ``DenseReluDense.wi``). Never the embeddings, a final norm or
    a projection head (``text_projection``), which sit outside the stacks."""
    prefixes = tuple(b + "." for b in layer_stacks(model))
    return [name for name, module in candidate_modules(model) if dense_layer(module) and name.startswith(prefixes)]
