"""The trainers' ``--method``: every method registered with psoft_vision, then the trainer's own baselines.

A registered method is built, saved and exported the same way whatever its name: its config takes each field that
has a same-named parsed argument (``rank`` from ``--rank``, ``block_size`` from ``--block-size``), the fields every
method shares come from the trainer, and its LoRA export holds full deltas unless the method is low rank.
"""

import dataclasses

import psoft_vision as pv


def method_choices(baselines: tuple[str, ...]) -> tuple[str, ...]:
    """Read when a parser is built, so that a method registered before then is offered."""
    return (*pv.registered_methods(), *baselines)


def registered(name: str) -> pv.Method | None:
    """The registered method ``name``, or None for a trainer's baseline."""
    return pv.get_method(name) if name in pv.registered_methods() else None


def build_config(method: pv.Method, args, **shared):
    """The method's config from parsed arguments: each field with a same-named argument takes it; ``shared`` sets the
    fields every method has (dropout, train_modules, targets) and wins over a same-named argument."""
    fields = {f.name for f in dataclasses.fields(method.config)} - set(shared)
    return method.config(**{name: getattr(args, name) for name in fields if hasattr(args, name)}, **shared)
