"""The ``psoft_vision`` metadata of an adapter file, parsed strictly and checked field by field before any of it is
used: a file is untrusted input (an app takes uploads), so every malformed or unbounded value is an
:class:`~psoft_vision.errors.AdapterFileError` that names it, never a raw Python error, a hang or a huge allocation.

What is checked here, from the file alone: JSON without duplicate keys or runaway nesting; the top-level fields'
types; the strength (a finite number within :data:`MAX_STRENGTH`); each layer's facts (an object); each fingerprint
(an object with the shape, norm and probes its version has). The config's values are checked by the method's config
class when the file is loaded (Neumann terms included: :data:`psoft_vision.config.MAX_NEUMANN_TERMS`), and each
layer's size (a positive integer) against the model's layer by :func:`check_sizes`.
"""

import json
import math
from pathlib import Path

from torch import nn

from ..errors import AdapterFileError, AdapterVersionError, KeyMismatchError
from ..layer import AdaptedLayer
from .fingerprint import PROBES, VERSION

FORMAT = "psoft_vision.adapter"
FORMAT_VERSION = 2  # 2: anchors, strength, fingerprint probes normalised by the norm
#: The largest strength a file may ask for: set_strength extrapolates beyond [0, 1], and far beyond it outputs
#: overflow (a strength of 1e308 gives infinities).
MAX_STRENGTH = 100.0
_FIELDS = {"method": str, "name": str, "config": dict, "layers": dict, "fingerprints": dict, "include_bases": bool}
_OPTIONAL = {"anchors": bool, "strength": int | float}
_V1_SKETCH = 4  # probes of a fingerprint written by psoft_vision 0.1


class _DuplicateKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _damaged(path: Path, what: str) -> AdapterFileError:
    return AdapterFileError(f"{str(path)!r} has damaged psoft_vision metadata ({what}); the file was edited or "
                            "written by other code: save the adapter again with psoft_vision.save_adapter.")


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse(path: Path, text: str) -> dict:
    """The metadata object, checked (see the module docstring); ``text`` is the file's ``psoft_vision`` entry."""
    try:
        header = json.loads(text, object_pairs_hook=_unique)
    except _DuplicateKey as key:
        raise _damaged(path, f"the key {str(key)!r} appears twice in one object") from None
    except RecursionError:
        raise _damaged(path, "JSON nested too deeply to be an adapter's") from None
    except ValueError as error:
        raise _damaged(path, str(error)) from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{str(path)!r} has psoft_vision metadata that is not a JSON object; save it again.")
    version = header.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise _damaged(path, f"format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise AdapterVersionError(f"{str(path)!r} has adapter format version {version!r}, newer than the "
                                  f"{FORMAT_VERSION} this psoft_vision reads; upgrade psoft_vision.")
    wrong = [f"{k} ({t.__name__})" for k, t in _FIELDS.items() if not isinstance(header.get(k), t)]
    wrong += [k for k, t in _OPTIONAL.items() if k in header and not isinstance(header[k], t)]
    wrong += ["strength"] if isinstance(header.get("strength"), bool) else []
    if wrong:
        raise AdapterFileError(f"{str(path)!r} has psoft_vision metadata without valid fields {wrong}; the file was "
                               "edited or written by other code: save the adapter again.")
    _check_strength(path, header.get("strength", 1.0))
    _check_layers(path, header["layers"])
    _check_fingerprints(path, header["fingerprints"])
    return header


def _check_strength(path: Path, strength) -> None:
    if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
        raise AdapterFileError(f"{str(path)!r} asks for strength {strength!r}; a strength must be finite and within "
                               f"±{MAX_STRENGTH:g} (1 is the trained adapter). Load it with a saved strength in "
                               "range, or save it again.")


def _check_layers(path: Path, layers: dict) -> None:
    for layer_name, facts in layers.items():
        if not isinstance(facts, dict):
            raise _damaged(path, f"layer {layer_name!r} is described by {type(facts).__name__} {facts!r}, not an "
                                 "object")


def _check_fingerprints(path: Path, fingerprints: dict) -> None:
    for layer_name, saved in fingerprints.items():
        if not isinstance(saved, dict):
            raise _damaged(path, f"the fingerprint of {layer_name!r} is {type(saved).__name__}, not an object")
        probes, count = ("probes", PROBES) if saved.get("version") == VERSION else ("sketch", _V1_SKETCH)
        shape, values = saved.get("shape"), saved.get(probes)
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise _damaged(path, f"the fingerprint of {layer_name!r} has shape {shape!r}, not a list of sizes")
        if not _number(saved.get("norm")) or not (isinstance(values, list) and len(values) == count and
                                                  all(_number(v) for v in values)):
            raise _damaged(path, f"the fingerprint of {layer_name!r} needs a number 'norm' and {count} numbers "
                                 f"{probes!r} (version {saved.get('version')!r})")


def _input_width(module: nn.Module) -> int | None:
    """A bound on every size field: a Linear's input features, a Conv2d's input channels times its kernel."""
    module = module.base if isinstance(module, AdaptedLayer) else module
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels * math.prod(module.kernel_size)
    return None


def check_sizes(model: nn.Module, header: dict, size_field: str | None, path: Path) -> None:
    """Each layer's saved size (the method's ``size_field``: PSOFT's rank, OFT's block size) a positive integer no
    larger than the model layer's input width, which bounds both: a larger one was written for another model, or
    edited."""
    if not size_field:
        return
    for layer_name, facts in header["layers"].items():
        size, width = facts.get(size_field), _input_width(model.get_submodule(layer_name))
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise _damaged(path, f"layer {layer_name!r} has {size_field} {size!r}, not a positive integer")
        if size is not None and width is not None and size > width:
            raise KeyMismatchError(f"{str(path)!r} asks for {size_field} {size} on {layer_name!r}, whose input width "
                                   f"is {width}; the file was written for another model, or edited.")
