"""What every method's config shares: where adapters go, what else is trained, and checked arguments."""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from .errors import ConfigError

#: ``"auto"`` or a preset name, a regex (string or compiled, full match), module names (exact or dotted suffix),
#: or a callable ``(name, module) -> bool``.
TargetSpec = str | re.Pattern | Sequence[str] | Callable[[str, nn.Module], bool]


def check_target_spec(spec, field_name: str, optional: bool = False) -> None:
    """A :data:`TargetSpec` of a valid type and, for a regex, valid syntax; else a ``ConfigError``."""
    if spec is None and optional:
        return
    if isinstance(spec, list | tuple):
        bad = [s for s in spec if not isinstance(s, str) or not s]
        if bad or not spec:
            raise ConfigError(f"{field_name}={spec!r}: a list must hold non-empty module names (strings), "
                              f"found {bad or 'an empty list'}.")
        return
    if isinstance(spec, str) and spec:
        try:
            re.compile(spec)
        except re.error as error:
            raise ConfigError(f"{field_name}={spec!r} is neither a preset nor a valid regex ({error}); give a "
                              "preset name, a regex, a list of module names or a callable.") from None
        return
    from .targets import Preset

    if isinstance(spec, re.Pattern | Preset) or callable(spec):
        return
    raise ConfigError(f"{field_name}={spec!r} ({type(spec).__name__}) is not 'auto', a preset name, a regex, a list "
                      "of module names or a callable (name, module) -> bool.")


def check_int(value, field_name: str, low: int, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{field_name}={value!r} must be an integer >= {low}{hint}.")


def check_pattern(pattern, field_name: str, low: int) -> dict[str, int]:
    """A per-layer setting ``{module name or dotted suffix: integer >= low}``, checked and copied."""
    if not isinstance(pattern, dict):
        raise ConfigError(f"{field_name}={pattern!r} must be a dict of module names to integers, e.g. "
                          "{'attn.qkv': 16}.")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{field_name} key {key!r} must be a module name or a dotted suffix of one.")
        check_int(value, f"{field_name}[{key!r}]", low, "")
    return dict(pattern)


def pattern_match(pattern: dict[str, int], layer_name: str) -> int | None:
    """The value of the longest key of ``pattern`` that is ``layer_name`` or a dotted suffix of it, else None."""
    keys = [k for k in pattern if layer_name == k or layer_name.endswith("." + k)]
    return pattern[max(keys, key=len)] if keys else None


#: The most Neumann terms a config may ask for: each costs a matrix product per forward, and past a few the series
#: gains nothing (docs/method.md) while an unbounded count (an adapter file asking for 10**9) never finishes.
MAX_NEUMANN_TERMS = 64


def check_neumann_terms(terms: int | None) -> None:
    if terms is not None:
        check_int(terms, "neumann_terms", 1, " or None (exact Cayley); even values are the most orthogonal for their "
                  "cost (see docs/method.md)")
        if terms > MAX_NEUMANN_TERMS:
            raise ConfigError(f"neumann_terms={terms!r} exceeds {MAX_NEUMANN_TERMS}: past a few terms the series "
                              "gains nothing and each costs a matrix product per forward; use 2 to 8, or None for "
                              "the exact Cayley transform.")


@dataclass(kw_only=True)
class AdapterConfig:
    """Settings every method shares. Subclasses set ``method`` to their registered name
    (see :mod:`psoft_vision.registry`)."""

    targets: TargetSpec = "auto"
    exclude: TargetSpec | None = None
    dropout: float = 0.0
    train_modules: Sequence[str] = field(default_factory=tuple)

    method = ""

    def __post_init__(self):
        check_target_spec(self.targets, "targets")
        check_target_spec(self.exclude, "exclude", optional=True)
        if isinstance(self.train_modules, str):
            self.train_modules = (self.train_modules,)
        if not isinstance(self.train_modules, Sequence) or not all(
                isinstance(n, str) and n for n in self.train_modules):
            raise ConfigError(f"train_modules={self.train_modules!r} must be module names (strings), e.g. ('head',).")
        self.train_modules = tuple(self.train_modules)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or \
                not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be a number in [0, 1); use 0.0 to switch it off.")
