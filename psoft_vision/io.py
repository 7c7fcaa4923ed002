"""Adapter files: one ``.safetensors`` with the adapter's tensors and JSON metadata, written atomically.

Keys: ``<layer>.<param>`` for the adapter parameters (``q``, ``alpha``, ``beta``), ``<layer>.anchor.<name>`` for
the adapter's anchors (PSOFT: a sketch of its subspace, so that it rebuilds the same subspace on a copy of the base
in another precision), ``<layer>.A`` / ``<layer>.B`` with ``include_bases=True``, and
``train_modules.<module>.<param>`` for the weights of ``train_modules``. The metadata entry ``psoft_vision`` holds
the format version, method, config, per-layer facts, strength, package version and a fingerprint of each base
weight (:mod:`psoft_vision.fingerprint`).
"""

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .bases import classify, weight_of
from .errors import AdapterFileError, BaseModelMismatchError, KeyMismatchError
from .files import atomic_write, kind_of
from .fingerprint import fingerprint, mismatch
from .header import FORMAT, FORMAT_VERSION, check_sizes, parse
from .hub import adapter_file
from .identify import describe_foreign
from .inject import inject
from .layer import AdaptedLayer
from .lifecycle import (
    _unmerged,
    adapted_layers,
    one_adapter_name,
    plainly_named_layers,
    remove,
    require_loaded,
    set_strength,
    unwrapped,
)
from .registry import get_method

#: Config fields renamed since they were first written to files: old name -> new name.
RENAMED_FIELDS = {"scale_a": "train_alpha", "scale_b": "train_beta"}


def _config_dict(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in ("targets", "exclude") and not (value is None or isinstance(value, str | list | tuple)):
            value = None  # a callable, compiled regex or preset object: the file's layer list says where it goes
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _file_tensors(model: nn.Module, name: str, train_modules, include_bases: bool,
                  anchors: bool) -> dict[str, torch.Tensor]:
    """Every tensor an adapter file holds, by key (see the module docstring): detached views of the model's own
    tensors, which loading copies into, and the anchors, which the adapters compute."""
    tensors = {}
    for layer_name, layer in plainly_named_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            tensors.update({f"{layer_name}.{key}": p.detach() for key, p in adapter.named_parameters()})
            if include_bases:
                tensors.update({f"{layer_name}.{key}": b.detach() for key, b in adapter.named_buffers()})
            elif anchors:
                tensors.update({f"{layer_name}.anchor.{key}": t.detach() for key, t in adapter.anchors().items()})
    for module_name in train_modules:
        tensors.update({f"train_modules.{module_name}.{key}": p.detach()
                        for key, p in model.get_submodule(module_name).named_parameters()})
    return tensors


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 include_bases: bool = False, anchors: bool = True, model_card: bool = False) -> Path:
    """Write adapter ``name`` (optional when there is one), its strength and its ``train_modules`` weights.

    ``anchors`` (default) stores each adapter's anchors: PSOFT's is a sketch of its subspace (``8 r^2`` bytes
    per layer) that lets :func:`load_adapter` rebuild the subspace the adapter was trained in on a copy of the
    base in another precision (bf16, fp16). ``include_bases=True`` stores the subspace itself instead (``A`` and
    ``B``, as large as the layer's input plus output width times r), for bit-exact reloads anywhere.
    ``model_card=True`` also writes README.md beside the file (:func:`psoft_vision.card.write_adapter_card`): the
    folder is then a hub repository, ready for :func:`psoft_vision.push_to_hub`.
    """
    from .version import __version__

    model = unwrapped(model)
    name = one_adapter_name(model, name)
    path = Path(path)
    layers, fingerprints = {}, {}
    require_loaded(dict(adapted_layers(model)), "save_adapter")
    for layer_name, layer in plainly_named_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            layers[layer_name] = adapter.describe()
            fingerprints[layer_name] = fingerprint(layer.pretrained_weight)
    config, strength = adapter.config, adapter.strength
    tensors = _file_tensors(model, name, config.train_modules, include_bases, anchors)
    _warn_non_finite(tensors, "saving")
    header = {
        "format_version": FORMAT_VERSION, "method": config.method, "name": name, "config": _config_dict(config),
        "layers": layers, "strength": strength, "fingerprints": fingerprints, "include_bases": include_bases,
        "anchors": anchors and not include_bases, "package_version": __version__, "torch_version": torch.__version__,
    }
    tensors = {k: t.to("cpu").contiguous() for k, t in tensors.items()}
    atomic_write(path, lambda f: save_file(tensors, f, metadata={"format": FORMAT, "psoft_vision": json.dumps(header)}))
    if model_card:
        from .card import write_adapter_card

        write_adapter_card(model, path)
    return path


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _warn_non_finite(tensors: dict[str, torch.Tensor], doing: str) -> None:
    bad = _non_finite(tensors)
    if bad:
        warnings.warn(f"{doing} an adapter whose tensors hold NaN or infinity ({bad[:3]}): training diverged; "
                      "load_adapter will refuse this file.", stacklevel=3)


def _open(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        kind = kind_of(path)
        what = "it does not exist" if kind == "nothing" else \
            f"it is {describe_foreign(path) if kind == 'a directory' else kind}"
        raise AdapterFileError(f"{str(path)!r} is not a regular file ({what}); pass the path of a .safetensors "
                               "adapter written by psoft_vision.save_adapter.")
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFileError(f"{str(path)!r} is not a readable safetensors file ({error}); it may be truncated "
                               "or of another format: save it again with psoft_vision.save_adapter.") from error


def _header(path: Path, metadata: dict, tensors: dict) -> dict:
    if metadata.get("format") != FORMAT or "psoft_vision" not in metadata:
        raise AdapterFileError(f"{str(path)!r} is not a psoft_vision adapter: it is "
                               f"{describe_foreign(path, list(tensors), metadata)}.")
    return parse(path, metadata["psoft_vision"])


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and every tensor of an adapter file, checked for format, version, fields and finite values."""
    path = Path(path)
    metadata, tensors = _open(path)
    header = _header(path, metadata, tensors)
    bad = _non_finite(tensors)
    if bad:
        raise AdapterFileError(f"{str(path)!r} holds NaN or infinite values in {bad[:3]}"
                               f"{' ...' if len(bad) > 3 else ''}; the training that wrote it diverged, or the file "
                               "was damaged: retrain, or save the adapter again from a healthy model.")
    return header, tensors


def _check_base(model: nn.Module, header: dict, path: Path) -> None:
    differ = []
    for layer_name, saved in header["fingerprints"].items():
        if layer_name not in header["layers"]:
            continue  # not a layer the file adapts: nothing is loaded there
        module = model.get_submodule(layer_name)
        if isinstance(module, AdaptedLayer):
            weight = module.pretrained_weight
        else:
            kind = classify(module, layer_name)
            weight = getattr(module, "weight", None) if kind is None else weight_of(module, kind)
        if not isinstance(weight, torch.Tensor):
            continue  # no weight to compare: inject refuses the layer by name
        why = mismatch(saved, weight)
        if why:
            differ.append(f"{layer_name!r} ({why})")
    if differ:
        raise BaseModelMismatchError(
            f"{len(differ)} base weights differ from those {str(path)!r} was trained on (first: "
            f"{', '.join(differ[:3])}); load it onto that base model, or pass check_base=False to load anyway."
        )


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, check_base: bool = True, *,
                 weight_name: str | None = None, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, token: str | None = None) -> nn.Module:
    """Inject the adapter stored at ``path`` (under its saved name, or ``name``), load its tensors and strength.

    ``path``: an adapter file; or a folder or a hub repository id (``org/name``, fetched through huggingface_hub's
    cache at ``revision``) and the ``weight_name`` of the file in it (default ``adapter.safetensors``); see
    :func:`psoft_vision.hub.adapter_file`. Hub failures are :class:`HubError` s that say what was tried.

    Raises :class:`AdapterFileError` (missing, truncated, damaged, foreign files: the message says what the file
    is and what loads it), :class:`AdapterVersionError`, :class:`BaseModelMismatchError` (skip the check with
    ``check_base=False``), :class:`KeyMismatchError`; on any error the model is left as it was.
    """
    path = adapter_file(path, weight_name, revision, cache_dir, token)
    header, tensors = read_adapter(path)
    name = name or header["name"]
    layers = header["layers"]
    wrapped, model = model, unwrapped(model)
    module_names = {n for n, _ in model.named_modules()}
    missing = [n for n in layers if n not in module_names]
    if missing:
        raise KeyMismatchError(f"{str(path)!r} adapts layers that {type(model).__name__} does not have: "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; is it the right base model?")
    method = _method(header, path)
    check_sizes(model, header, method.size_field, path)
    if check_base:
        _check_base(model, header, path)
    config = _config_for_layers(method, header, path)
    trainable = {p: p.requires_grad for p in model.parameters()}
    with _unmerged(model):  # merged layers stay merged, on success and on failure
        inject(model, config, name=name)
        try:
            _load_tensors(model, name, header, config, tensors, path)
            set_strength(model, header.get("strength", 1.0), name)
        except Exception:
            remove(model, name)
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            raise
    return wrapped  # the model as passed: the wrapper (compiled, DDP, ...) when it was one


def _method(header: dict, path):
    try:
        return get_method(header["method"])
    except Exception as error:
        raise AdapterFileError(f"{str(path)!r} holds a {header.get('method')!r} adapter, a method this psoft_vision "
                               f"does not know ({error}); register it first, or upgrade psoft_vision.") from None


def _config_for_layers(method, header: dict, path) -> object:
    """The saved config, aimed at exactly the saved layers, each with its saved size (rank, block size)."""
    fields = {RENAMED_FIELDS.get(k, k): v for k, v in header["config"].items()}
    layers = header["layers"]
    layer_set = set(layers)
    fields["targets"] = lambda n, m: n in layer_set
    fields["exclude"] = None
    if method.size_pattern_field:
        fields[method.size_pattern_field] = {n: d[method.size_field] for n, d in layers.items()
                                             if method.size_field in d}
    try:
        return method.config(**fields)
    except (TypeError, ValueError) as error:
        raise AdapterFileError(f"{str(path)!r} holds a {method.name!r} config this psoft_vision cannot build "
                               f"({error}); save it again with this version.") from None


def _load_tensors(model, name, header, config, tensors, path) -> None:
    # every tensor the file must hold, with the tensor it loads into (for an anchor: the anchor the adapter
    # computes from the present base, which only gives the shape)
    expected = _file_tensors(model, name, config.train_modules, header["include_bases"], header.get("anchors"))
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise KeyMismatchError(f"{str(path)!r} does not fit the adapter it describes: missing keys {missing[:5]}, "
                               f"unknown keys {unknown[:5]}; the file was edited or written by other code.")
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(t.shape)}" for k, t in expected.items()
             if tensors[k].shape != t.shape]
    if wrong:
        raise KeyMismatchError(f"{str(path)!r} has tensors of the wrong shape: {wrong[:3]}; it was saved from a "
                               "model of another size.")
    wrong = [f"{k}: {str(tensors[k].dtype).removeprefix('torch.')}" for k, t in expected.items()
             if t.is_floating_point() and not tensors[k].is_floating_point()]
    if wrong:
        raise KeyMismatchError(f"{str(path)!r} holds non-floating tensors where the adapter has floating ones: "
                               f"{wrong[:3]}; the file was edited or written by other code.")
    anchor_keys = set()
    with torch.no_grad():
        for layer_name, layer in plainly_named_layers(model):
            if name in layer.adapters and header.get("anchors"):
                adapter = layer.adapters[name]
                keys = {k: f"{layer_name}.anchor.{k}" for k in adapter.anchors()}
                adapter.realign({k: tensors[key] for k, key in keys.items()}, header["layers"][layer_name],
                                layer.pretrained_weight)
                anchor_keys.update(keys.values())
        for key, target in expected.items():
            if key not in anchor_keys:
                target.copy_(tensors[key])
