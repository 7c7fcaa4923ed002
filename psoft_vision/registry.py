"""The one place methods are registered; everything else (inject, files, export, the trainers, the app and the
benchmark) looks them up here.

A method is one module that ends with ``METHOD = Method(...)``: its config class (an
:class:`~psoft_vision.config.AdapterConfig` whose ``method`` is the name), its adapter class (an
:class:`~psoft_vision.adapter.Adapter`, built as ``adapter(base, config)``) and what it can do. To add one::

    import psoft_vision as pv

    pv.register_method(pv.Method("diag", DiagConfig, DiagAdapter, size_field=None, summary="output scaling"))
    pv.inject(model, DiagConfig())     # then save, load, merge, export and the trainers' --method all know it
"""

from dataclasses import dataclass

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
    if method.name in _METHODS and not replace and _METHODS[method.name] != method:
        raise ConfigError(f"a method named {method.name!r} is already registered; pass replace=True to replace it.")
    _METHODS[method.name] = method
    return method


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
