"""Names that moved: their old modules hand them out still, from a module ``__getattr__``, with a DeprecationWarning
that says where they live now."""

import importlib
import warnings


def moved_name(module: str, name: str, home: str, elsewhere: dict[str, str] | None = None):
    """``name`` read from the old module ``module``: from ``psoft_vision.<elsewhere[name]>``, else from
    ``psoft_vision.<home>``; an AttributeError for a name neither has."""
    place = f"psoft_vision.{(elsewhere or {}).get(name, home)}"
    target = importlib.import_module(place)
    if name.startswith("_") or not hasattr(target, name):
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} moved: import it from {place}.", DeprecationWarning, stacklevel=3)
    return getattr(target, name)
