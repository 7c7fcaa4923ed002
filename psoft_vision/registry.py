"""The one place methods are registered; everything else (inject, files, export, the trainers, the app and the
benchmark) looks them up here.

A method is one module that ends with ``METHOD = Method(...)``: its config class (an
:class:`~psoft_vision.config.AdapterConfig` whose ``method`` is the name), its adapter class (an
:class:`~psoft_vision.adapter.Adapter`, built as ``adapter(base, config)``) and everything the rest of the repository
needs to know about it: the config field that sizes it and the one that sizes it per layer, the value at which each
parameter is the identity, and the learning rate each trainer starts from. The trainers' flags come from the config's
own fields (train/common/methods.py). To add one::

    import psoft_vision as pv

    pv.register_method(pv.Method("diag", DiagConfig, DiagAdapter, identity={"s": 1.0}, summary="input scaling"))
    pv.inject(model, DiagConfig())     # then save, load, merge, export and the trainers' --method all know it
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .bases import CONV2D, LINEAR
from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    adapter: type
    #: The layer kinds (:mod:`psoft_vision.bases`) its adapter can be built on.
    layer_kinds: tuple[str, ...] = (LINEAR, CONV2D)
    #: ``lora_factors()`` is never None: every update exports exactly as a small LoRA.
    low_rank: bool = False
    #: The config field that sets the adapter's size (``"rank"``, ``"block_size"``), for summaries and CLIs.
    size_field: str | None = None
    #: The config field that sets that size per layer (``"rank_pattern"``: ``{module name or suffix: size}``): a
    #: loaded file gives each layer its saved size through it, and DreamBooth's per-module-type sizes fill it.
    size_pattern_field: str | None = None
    #: ``{parameter name: value}``: each adapter parameter's value where the adapter is the identity (PSOFT's ``q``
    #: 0, its scalings ``alpha`` / ``beta`` 1), which ``at_strength`` moves toward and tests move away from. (This
    #: dict and the next are left out of the hash, so that a Method stays hashable.)
    identity: Mapping[str, float] = field(default_factory=dict, hash=False)
    #: ``{trainer: learning rate}``: where ``python -m train.vtab`` / ``train.dreambooth`` start without ``--lr``
    #: (each trainer has a fallback for a method that names none).
    learning_rates: Mapping[str, float] = field(default_factory=dict, hash=False)
    #: One line for ``--help`` and the app.
    summary: str = ""
    #: How people write its name ("PSOFT", "OFTv2"); the registered name when empty.
    display_name: str = ""

    def describe_config(self, settings: dict) -> str:
        """``"PSOFT, rank 16"``: the method and its size setting, from a config's fields (as a file records them)."""
        label = self.display_name or self.name
        if self.size_field is None or self.size_field not in settings:
            return label
        return f"{label}, {self.size_field.replace('_', ' ')} {settings[self.size_field]}"


_METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Make ``method`` known by its name; re-registering a name needs ``replace=True``."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a psoft_vision.Method, got {type(method).__name__}.")
    if getattr(method.config, "method", None) != method.name:
        raise ConfigError(f"{method.config.__name__}.method is {getattr(method.config, 'method', None)!r}; set it to "
                          f"{method.name!r}, the name the method is registered under.")
    _check_fields(method)
    if method.name in _METHODS and not replace and _METHODS[method.name] != method:
        raise ConfigError(f"a method named {method.name!r} is already registered; pass replace=True to replace it.")
    _METHODS[method.name] = method
    return method


def _check_fields(method: Method) -> None:
    """The config fields the method names exist, and a size pattern patterns the size field."""
    fields = {f.name for f in dataclasses.fields(method.config)}
    for role in ("size_field", "size_pattern_field"):
        name = getattr(method, role)
        if name is not None and name not in fields:
            raise ConfigError(f"{method.name}: {role}={name!r} is not a field of {method.config.__name__} (its fields: "
                              f"{', '.join(sorted(fields))}).")
    if method.size_pattern_field is not None and method.size_field is None:
        raise ConfigError(f"{method.name}: size_pattern_field={method.size_pattern_field!r} needs the size_field it "
                          "patterns.")


def unregister_method(name: str) -> None:
    """Forget the method ``name`` (adapters already built keep working)."""
    _METHODS.pop(name, None)


def registered_methods() -> list[str]:
    """The names of every registered method, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as ``name``, or a ``ConfigError`` that lists the known ones."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ConfigError(f"method {name!r} is not registered; known methods: {', '.join(_METHODS)} "
                          "(register others with psoft_vision.register_method).")
    return _METHODS[name]


def method_of(config) -> Method:
    """The registered method of an adapter config."""
    return get_method(getattr(config, "method", None))
