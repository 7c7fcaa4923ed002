"""The trainers' ``--method``: every method registered with psoft_vision, then the trainer's own baselines; the flags
of each method's settings, read off its config dataclass; and the learning rate each method starts from.

A registered method is built, saved and exported the same way whatever its name: its config takes each field that
has a same-named parsed argument (``rank`` from ``--rank``, ``block_size`` from ``--block-size``), the fields every
method shares come from the trainer, and its LoRA export holds full deltas unless the method is low rank. A config
field no trainer flag sets gets one from :func:`add_config_flags` (``--neumann-terms``, ``--split-qkv``), which
leaves the config's own default in place unless it is given.
"""

import argparse
import dataclasses
import types
import typing

import psoft_vision as pv

#: The fields every method's config has (targets, exclude, dropout, train_modules): each trainer sets them its way.
SHARED_FIELDS = frozenset(f.name for f in dataclasses.fields(pv.AdapterConfig))
#: What a flag of a field that may be None takes for None (``--neumann-terms none``: the exact Cayley transform).
NONE = "none"


def method_choices(baselines: tuple[str, ...]) -> tuple[str, ...]:
    """Read when a parser is built, so that a method registered before then is offered."""
    return (*pv.registered_methods(), *baselines)


def registered(name: str) -> pv.Method | None:
    """The registered method ``name``, or None for a trainer's baseline."""
    return pv.get_method(name) if name in pv.registered_methods() else None


def default_lr(name: str, trainer: str, baselines: dict[str, float], fallback: float) -> float:
    """The learning rate ``name`` starts from in ``trainer`` (``"vtab"``, ``"dreambooth"``): a registered method's own
    ``learning_rates``, a baseline's from the trainer's table, else ``fallback`` (a method that names none)."""
    method = registered(name)
    return method.learning_rates.get(trainer, fallback) if method else baselines.get(name, fallback)


def default_lrs(trainer: str, baselines: dict[str, float]) -> dict[str, float]:
    """``{method: learning rate}`` for every method that names one in ``trainer`` and every baseline (for --help)."""
    ours = {name: pv.get_method(name).learning_rates.get(trainer) for name in pv.registered_methods()}
    return {**{name: lr for name, lr in ours.items() if lr is not None}, **baselines}


def _optional(hint) -> tuple[object, bool]:
    """``(the type, whether None is allowed)`` of a field's annotation (``int | None`` -> ``(int, True)``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else hint), len(rest) < len(typing.get_args(hint))
    return hint, False


def module_sizes(text: str) -> dict[str, int]:
    """``fc1=8,blocks.0.attn.qkv=16``: a size per module name (exact or a dotted suffix) for a pattern field."""
    pattern = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not MODULE=SIZE (e.g. fc1=8,blocks.0.attn.qkv=16)")
        pattern[key.strip()] = int(value)
    return pattern


def size_pattern_fields() -> list[str]:
    """The size-pattern field of every registered method that has one (``rank_pattern``, ``block_size_pattern``)."""
    methods = [pv.get_method(name) for name in pv.registered_methods()]
    return list(dict.fromkeys(m.size_pattern_field for m in methods if m.size_pattern_field))


def _flag_type(name: str, hint, text_patterns: bool):
    """The argparse type of a field's annotation, or None where the command line cannot give it."""
    if hint in (int, float, str):
        return hint
    if typing.get_origin(hint) is dict and typing.get_args(hint) == (str, int):
        return str if text_patterns and name in size_pattern_fields() else module_sizes
    return None


def _owners() -> dict[str, list[tuple[pv.Method, dataclasses.Field]]]:
    """``{field name: [(method, field)]}`` for every field of a registered method's config beyond the shared ones."""
    owners = {}
    for name in pv.registered_methods():
        method = pv.get_method(name)
        for f in dataclasses.fields(method.config):
            if f.name not in SHARED_FIELDS:
                owners.setdefault(f.name, []).append((method, f))
    return owners


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_config_flags(parser: argparse.ArgumentParser, dashed: bool, text_patterns: bool = False) -> None:
    """A flag for each registered method's config field that no argument of ``parser`` sets already (``--split-qkv``
    with ``dashed``, else ``--split_qkv``); read when the parser is built, so a method registered before then gets its
    flags. A flag left out leaves the config's default. ``text_patterns``: size-pattern fields stay text, for the
    trainer to read per module type (DreamBooth); else they are ``MODULE=SIZE`` lists."""
    taken = {action.dest for action in parser._actions}  # argparse keeps its actions in _actions
    group = parser.add_argument_group("method settings (fields of each method's config; left out: the config's "
                                      "default)")
    for name, owned in _owners().items():
        if name in taken:
            continue
        hint, may_be_none = _optional(typing.get_type_hints(owned[0][0].config)[name])
        defaults = ", ".join(f"{method.display_name or method.name} {_default(f)!r}" for method, f in owned)
        flag = "--" + (name.replace("_", "-") if dashed else name)
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"the config's {name} (default: {defaults})")
            continue
        kind = _flag_type(name, hint, text_patterns)
        if kind is None:
            continue  # a field of a type no flag spells stays at its default
        parse = (lambda text, kind=kind: NONE if text == NONE else kind(text)) if may_be_none else kind
        spelled = " as MODULE=SIZE,..." if kind is module_sizes else ""
        group.add_argument(flag, type=parse, default=None, help=f"the config's {name}{spelled} (default: {defaults})"
                           + (f"; {NONE!r} for None" if may_be_none else ""))


def build_config(method: pv.Method, args, **shared):
    """The method's config from parsed arguments: each field with a same-named argument that is not None takes it
    (``"none"`` is None where the field allows it); ``shared`` sets the fields every method has (dropout,
    train_modules, targets) and wins over a same-named argument."""
    hints = typing.get_type_hints(method.config)
    values = {}
    for f in dataclasses.fields(method.config):
        value = getattr(args, f.name, None)
        if f.name in shared or value is None:
            continue
        values[f.name] = None if value == NONE and _optional(hints[f.name])[1] else value
    return method.config(**values, **shared)
