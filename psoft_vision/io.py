"""Adapter files: one ``.safetensors`` with the adapter's tensors and JSON metadata, written atomically.

Keys: ``<layer>.<param>`` for the adapter parameters (``q``, ``alpha``, ``beta``), ``<layer>.A`` / ``<layer>.B``
with ``include_bases=True``, and ``train_modules.<module>.<param>`` for the weights of ``train_modules``. The
metadata entry ``psoft_vision`` holds the format version, method, config, layers, package version, the SVD
settings and a fingerprint of each base weight.

A fingerprint is the weight's shape, its Frobenius norm and four seeded bilinear sketches ``u^T W v``: loading
onto a different base fails loudly, while the same base in another dtype (fp16, bf16) still matches.
"""

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import (
    AdapterFileError,
    AdapterVersionError,
    BaseModelMismatchError,
    KeyMismatchError,
)
from .files import atomic_write
from .inject import inject
from .lifecycle import _unmerged, adapted_layers, one_adapter_name, remove, set_strength
from .registry import get_method

FORMAT = "psoft_vision.adapter"
FORMAT_VERSION = 1
FINGERPRINT_TOLERANCE = 1e-2  # relative to ||W||_F; fp16 rounding moves a sketch by about 1e-3
#: Config fields renamed since they were first written to files: old name -> new name.
RENAMED_FIELDS = {"scale_a": "train_alpha", "scale_b": "train_beta"}


def fingerprint(weight: torch.Tensor) -> dict:
    w = weight.detach().to("cpu", torch.float64).flatten(1)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(4, w.shape[0], generator=gen, dtype=torch.float64)
    v = torch.randn(4, w.shape[1], generator=gen, dtype=torch.float64)
    sketch = ((u @ w) * v).sum(-1) / (w.shape[0] * w.shape[1]) ** 0.5
    return {"shape": list(weight.shape), "norm": w.norm().item(), "sketch": sketch.tolist()}


def _fingerprints_differ(saved: dict, current: dict) -> bool:
    if saved["shape"] != current["shape"]:
        return True
    scale = max(saved["norm"], 1e-12)
    values = [saved["norm"], *saved["sketch"]], [current["norm"], *current["sketch"]]
    return any(abs(a - b) > FINGERPRINT_TOLERANCE * scale for a, b in zip(*values, strict=True))


def _config_dict(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in ("targets", "exclude") and not (value is None or isinstance(value, str | list | tuple)):
            value = None  # a callable or compiled regex: the file's layer list says where the adapter goes
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 include_bases: bool = False) -> Path:
    """Write adapter ``name`` (optional when there is one) and its ``train_modules`` weights to ``path``."""
    from . import __version__

    name = one_adapter_name(model, name)
    path = Path(path)
    tensors, layers, fingerprints, config, strength = {}, {}, {}, None, 1.0
    for layer_name, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        config, strength = adapter.config, adapter.strength
        layers[layer_name] = adapter.describe()
        fingerprints[layer_name] = fingerprint(layer.pretrained_weight)
        for key, p in adapter.named_parameters():
            tensors[f"{layer_name}.{key}"] = p.detach()
        if include_bases:
            for key, b in adapter.named_buffers():
                tensors[f"{layer_name}.{key}"] = b.detach()
    for module_name in config.train_modules:
        for key, p in model.get_submodule(module_name).named_parameters():
            tensors[f"train_modules.{module_name}.{key}"] = p.detach()
    header = {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "name": name,
        "config": _config_dict(config),
        "layers": layers,
        "strength": strength,
        "fingerprints": fingerprints,
        "include_bases": include_bases,
        "package_version": __version__,
        "torch_version": torch.__version__,
    }
    tensors = {k: t.to("cpu").contiguous() for k, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: save_file(tensors, f, metadata={"format": FORMAT, "psoft_vision": json.dumps(header)}))
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and every tensor of an adapter file, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{str(path)!r} is not a file; pass the path of a .safetensors adapter.")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(f"{str(path)!r} is not a readable safetensors file ({error}); it may be truncated "
                               "or of another format: save it again with psoft_vision.save_adapter.") from error
    if metadata.get("format") != FORMAT or "psoft_vision" not in metadata:
        raise AdapterFileError(f"{str(path)!r} is a safetensors file but not a psoft_vision adapter (metadata keys "
                               f"{sorted(metadata)}); a LoRA file loads with diffusers or PEFT instead.")
    header = json.loads(metadata["psoft_vision"])
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterVersionError(f"{str(path)!r} has adapter format version {header['format_version']}, newer than "
                                  f"the {FORMAT_VERSION} this psoft_vision reads; upgrade psoft_vision.")
    return header, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 check_base: bool = True) -> nn.Module:
    """Inject the adapter stored at ``path`` (under its saved name, or ``name``) and load its tensors.

    Raises :class:`AdapterFileError`, :class:`AdapterVersionError`, :class:`BaseModelMismatchError` (skip the
    check with ``check_base=False``), :class:`KeyMismatchError`; on any error the model is left as it was.
    """
    header, tensors = read_adapter(path)
    name = name or header["name"]
    layers = header["layers"]
    module_names = {n for n, _ in model.named_modules()}
    missing = [n for n in layers if n not in module_names]
    if missing:
        raise KeyMismatchError(f"{str(path)!r} adapts layers that {type(model).__name__} does not have: "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; is it the right base model?")
    if check_base:
        differ = []
        for layer_name, saved in header["fingerprints"].items():
            module = model.get_submodule(layer_name)
            weight = module.pretrained_weight if hasattr(module, "pretrained_weight") else module.weight
            if _fingerprints_differ(saved, fingerprint(weight)):
                differ.append(layer_name)
        if differ:
            raise BaseModelMismatchError(
                f"{len(differ)} base weights differ from those {str(path)!r} was trained on (first: {differ[:3]}); "
                "load it onto that base model, or pass check_base=False to load anyway."
            )

    config = _config_for_layers(header, path)
    trainable = {p: p.requires_grad for p in model.parameters()}
    with _unmerged(model):  # merged layers stay merged, on success and on failure
        inject(model, config, name=name)
        try:
            _load_tensors(model, name, header, tensors, path)
            set_strength(model, header.get("strength", 1.0), name)
        except Exception:
            remove(model, name)
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            raise
    return model


def _config_for_layers(header: dict, path) -> object:
    """The saved config, aimed at exactly the saved layers, each with its saved size (rank, block size)."""
    try:
        method = get_method(header["method"])
    except Exception as error:
        raise AdapterFileError(f"{str(path)!r} holds a {header.get('method')!r} adapter, a method this psoft_vision "
                               f"does not know ({error}); register it first, or upgrade psoft_vision.") from None
    fields = {RENAMED_FIELDS.get(k, k): v for k, v in header["config"].items()}
    layers = header["layers"]
    layer_set = set(layers)
    fields["targets"] = lambda n, m: n in layer_set
    fields["exclude"] = None
    pattern = f"{method.size_field}_pattern"
    if method.size_field and pattern in {f.name for f in dataclasses.fields(method.config)}:
        fields[pattern] = {n: d[method.size_field] for n, d in layers.items() if method.size_field in d}
    return method.config(**fields)


def _load_tensors(model, name, header, tensors, path) -> None:
    expected = {}
    for layer_name, layer in adapted_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            expected.update({f"{layer_name}.{k}": p for k, p in adapter.named_parameters()})
            if header["include_bases"]:
                expected.update({f"{layer_name}.{k}": b for k, b in adapter.named_buffers()})
    for module_name in header["config"]["train_modules"]:
        expected.update({f"train_modules.{module_name}.{k}": p
                         for k, p in model.get_submodule(module_name).named_parameters()})
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise KeyMismatchError(f"{str(path)!r} does not fit the adapter it describes: missing keys {missing[:5]}, "
                               f"unknown keys {unknown[:5]}; the file was edited or written by other code.")
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(t.shape)}" for k, t in expected.items()
             if tensors[k].shape != t.shape]
    if wrong:
        raise KeyMismatchError(f"{str(path)!r} has tensors of the wrong shape: {wrong[:3]}; it was saved from a "
                               "model of another size.")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
