"""Names that moved: their old modules hand them out still, from a module ``__getattr__``, with a DeprecationWarning
that says where they live now."""

import importlib
import warnings


def moved_name(module: str, name: str, home: str | None, elsewhere: dict[str, str] | None = None):
    """``name`` read from the old module ``module``: from ``psoft_vision.<elsewhere[name]>``, else from
    ``psoft_vision.<home>`` (with no home, only the names in ``elsewhere`` moved); an AttributeError for a name
    that did not move."""
    place = (elsewhere or {}).get(name, home)
    target = importlib.import_module(f"psoft_vision.{place}") if place else None
    if target is None or name.startswith("_") or not hasattr(target, name):
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} moved: import it from {target.__name__}.", DeprecationWarning, stacklevel=3)
    return getattr(target, name)
