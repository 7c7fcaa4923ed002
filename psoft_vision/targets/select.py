"""Matching a target spec (``"auto"``, a preset, module names, a regex or a callable) to a model's module names."""

import difflib
import re
import warnings
from collections.abc import Callable

from torch import nn

from ..errors import TargetNotFoundError
from .presets import PRESETS, preset_for, resolve
from .structure import candidate_modules, repeated_blocks, transformer_blocks


def chosen_by_preset(spec) -> bool:
    """Whether a target spec lets the library choose the layers (``"auto"`` or a preset)."""
    return spec == "auto" or resolve(spec) is not None


def auto_preset(model: nn.Module) -> str:
    """The preset ``targets="auto"`` uses for this model."""
    name = preset_for(model)
    if name is None:
        raise TargetNotFoundError(
            f"targets='auto' has no preset for {type(model).__name__} (no timm, diffusers or transformers model); pass "
            f"targets= a preset ({', '.join(PRESETS)}), a list of module names, a regex or a callable."
        )
    return name


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


def _preset_predicate(model: nn.Module, preset) -> Callable[[str, nn.Module], bool]:
    layers = set(preset.layers(model))
    _warn_partial_blocks(model, preset.name, layers)
    return lambda module_name, module: module_name in layers


def _warn_partial_blocks(model: nn.Module, preset: str, layers: set[str]) -> None:
    """Warn when a preset adapts some of the model's blocks and leaves others without a single adapter."""
    family = preset_for(model)
    if family is None or preset == family:
        return
    blocks = transformer_blocks(model) if family == "diffusers" else repeated_blocks(model)
    adaptable = set(resolve(family).layers(model))
    missed = [b for b in blocks if any(n.startswith(b + ".") for n in adaptable)
              and not any(n.startswith(b + ".") for n in layers)]
    if missed and layers:
        shown = ", ".join(repr(b) for b in missed[:4]) + (" ..." if len(missed) > 4 else "")
        warnings.warn(f"preset {preset!r} adapts {len(blocks) - len(missed)} of the {len(blocks)} blocks of "
                      f"{type(model).__name__} and none of {len(missed)} ({shown}); targets='auto' finds them all.",
                      stacklevel=5)


def _pattern_or_callable(model: nn.Module, spec) -> tuple[str, Callable[[str, nn.Module], bool]]:
    if isinstance(spec, str) and spec == "auto":
        spec = auto_preset(model)
    preset = resolve(spec)
    if preset is not None:
        return f"preset {getattr(spec, 'name', spec)!r}", _preset_predicate(model, preset)
    if isinstance(spec, str | re.Pattern):
        pattern = re.compile(spec)
        return f"regex {pattern.pattern!r}", lambda name, module: pattern.fullmatch(name) is not None
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
