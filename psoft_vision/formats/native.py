"""The native adapter file: one ``.safetensors`` with the adapter's tensors and JSON metadata, written atomically;
its contents from a model, writing, reading, loading onto a model (or a pipeline's denoiser), and what a file is
when it is another tool's.

Keys (:mod:`psoft_vision.formats.names`): ``<layer>.<param>`` for the adapter parameters (``q``, ``alpha``,
``beta``), ``<layer>.anchor.<name>`` for the adapter's anchors (PSOFT: a sketch of its subspace, so that it rebuilds
the same subspace on a copy of the base in another precision), ``<layer>.A`` / ``<layer>.B`` with
``include_bases=True``, and ``train_modules.<module>.<param>`` for the weights of ``train_modules``. The metadata
entry ``psoft_vision`` holds the format version, method, config, per-layer facts, strength, package version and a
fingerprint of each base weight (:mod:`psoft_vision.formats.fingerprint`), checked on reading by
:mod:`psoft_vision.formats.header`.
"""

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..bases import classify, weight_of
from ..errors import AdapterFileError, BaseModelMismatchError, KeyMismatchError
from ..files import kind_of, write_safetensors
from ..hub import adapter_file
from ..inject import inject
from ..layer import AdaptedLayer
from ..lifecycle import remove, require_loaded, set_strength, unmerged
from ..model import adapted_layers, denoiser, one_adapter_name, plainly_named_layers, train_modules_of, unwrapped
from ..registry import get_method
from ..version import __version__
from .fingerprint import fingerprint, mismatch
from .header import FORMAT, FORMAT_VERSION, check_sizes, parse
from .names import (
    DIFFUSERS_METADATA,
    DIFFUSERS_WEIGHT_NAME,
    PEFT_CONFIG_NAME,
    PEFT_PREFIX,
    adapter_key,
    anchor_key,
    train_module_key,
)

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


def adapter_tensors(model: nn.Module, name: str, include_bases: bool = False,
                    anchors: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor adapter ``name``'s file holds, by key (see the module docstring): detached views of the model's
    own tensors, which loading copies into, and the anchors, which the adapters compute."""
    tensors = {}
    for layer_name, layer in plainly_named_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            tensors.update({adapter_key(layer_name, key): p.detach() for key, p in adapter.named_parameters()})
            if include_bases:
                tensors.update({adapter_key(layer_name, key): b.detach() for key, b in adapter.named_buffers()})
            elif anchors:
                tensors.update({anchor_key(layer_name, key): t.detach() for key, t in adapter.anchors().items()})
    for module_name in train_modules_of(model, name):
        tensors.update({train_module_key(module_name, key): p.detach()
                        for key, p in model.get_submodule(module_name).named_parameters()})
    return tensors


def adapter_contents(model: nn.Module, name: str | None = None, include_bases: bool = False,
                     anchors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(header, tensors)`` of adapter ``name``'s file (optional when there is one): the ``psoft_vision``
    metadata and :func:`adapter_tensors`. What :func:`write_adapter_file` writes, and what
    :class:`psoft_vision.distributed.AdapterSaver` keeps of a model before it is sharded."""
    model = unwrapped(model)
    name = one_adapter_name(model, name)
    layers, fingerprints = {}, {}
    require_loaded(dict(adapted_layers(model)), "save_adapter")
    for layer_name, layer in plainly_named_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            layers[layer_name] = adapter.describe()
            fingerprints[layer_name] = fingerprint(layer.pretrained_weight)
    config, strength = adapter.config, adapter.strength
    tensors = adapter_tensors(model, name, include_bases, anchors)
    header = {
        "format_version": FORMAT_VERSION, "method": config.method, "name": name, "config": _config_dict(config),
        "layers": layers, "strength": strength, "fingerprints": fingerprints, "include_bases": include_bases,
        "anchors": anchors and not include_bases, "package_version": __version__, "torch_version": torch.__version__,
    }
    return header, tensors


def write_contents(path: Path, header: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter file of ``header`` and ``tensors`` at ``path``, written atomically."""
    tensors = {k: t.to("cpu").contiguous() for k, t in tensors.items()}
    write_safetensors(path, tensors, {"format": FORMAT, "psoft_vision": json.dumps(header)})
    return path


def write_adapter_file(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                       include_bases: bool = False, anchors: bool = True) -> Path:
    """Write adapter ``name``'s file (:func:`psoft_vision.save_adapter` without a model card)."""
    header, tensors = adapter_contents(model, name, include_bases, anchors)
    _warn_non_finite(tensors, "saving")
    return write_contents(Path(path), header, tensors)


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def _warn_non_finite(tensors: dict[str, torch.Tensor], doing: str) -> None:
    bad = _non_finite(tensors)
    if bad:
        warnings.warn(f"{doing} an adapter whose tensors hold NaN or infinity ({bad[:3]}): training diverged; "
                      "load_adapter will refuse this file.", stacklevel=4)


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


#: What loads each other tool's files, for the errors that name them.
_LOADERS = {
    "peft": "peft.PeftModel.from_pretrained(model, folder)",
    "diffusers": "pipe.load_lora_weights(folder, weight_name=file) (or the model's load_lora_adapter)",
    "kohya": "pipe.load_lora_weights(file) (diffusers converts kohya keys), ComfyUI or A1111/Forge",
}


def _peft_folder(folder: Path) -> str | None:
    try:
        config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return f"a folder with an unreadable {PEFT_CONFIG_NAME}"
    return f"a PEFT {config.get('peft_type', 'unknown')} adapter folder; load it with {_LOADERS['peft']}"


def describe_foreign(path: Path, keys: list[str] | None = None, metadata: dict | None = None) -> str:
    """What ``path``, not a psoft_vision adapter, appears to be and what loads it, in a phrase for an error."""
    if path.is_dir():
        if (path / PEFT_CONFIG_NAME).is_file():
            return _peft_folder(path)
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            return f"a folder with a diffusers LoRA; load it with {_LOADERS['diffusers']}"
        return "a folder, not an adapter file"
    keys = keys or []
    if (path.parent / PEFT_CONFIG_NAME).is_file() and any(k.startswith(PEFT_PREFIX) for k in keys):
        return "the weights of " + _peft_folder(path.parent)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        kind = "OFT" if any(".oft_" in k or "oft_blocks" in k for k in keys) else "LoRA"
        return f"a kohya-style {kind} file (ComfyUI, A1111/Forge, sd-scripts); load it with {_LOADERS['kohya']}"
    if any(".lora_A." in k or ".lora_down." in k for k in keys):
        if any(k.startswith(("unet.", "transformer.", "text_encoder", "prior.")) for k in keys):
            return f"a diffusers LoRA file; load it with {_LOADERS['diffusers']}"
        return f"a PEFT LoRA weights file; put it in its folder with its {PEFT_CONFIG_NAME} and use {_LOADERS['peft']}"
    for marker, kind in ((".oft_", "OFT"), (".psoft_", "PSOFT")):
        if any(marker in k for k in keys):
            return f"a PEFT {kind} weights file; load its folder with {_LOADERS['peft']}"
    if metadata and DIFFUSERS_METADATA in metadata:
        return f"a diffusers LoRA file; load it with {_LOADERS['diffusers']}"
    return f"a safetensors file of another kind (metadata keys {sorted(metadata or {})})"


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
    with unmerged(model):  # merged layers stay merged, on success and on failure
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


def load_adapter_into_pipeline(pipe, path: str | os.PathLike, name: str | None = None, check_base: bool = True,
                               **where):
    """Load the psoft_vision adapter at ``path`` (a file, or a folder or hub repository id with ``weight_name``,
    ``revision``, ``cache_dir``, ``token``: see :func:`load_adapter`) onto the pipeline's denoiser (see
    :func:`psoft_vision.model.denoiser`); returns the pipeline."""
    module, _ = denoiser(pipe)
    load_adapter(module, path, name=name, check_base=check_base, **where)
    return pipe


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
    expected = adapter_tensors(model, name, header["include_bases"], header.get("anchors"))
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
                keys = {k: anchor_key(layer_name, k) for k in adapter.anchors()}
                adapter.realign({k: tensors[key] for k, key in keys.items()}, header["layers"][layer_name],
                                layer.pretrained_weight)
                anchor_keys.update(keys.values())
        for key, target in expected.items():
            if key not in anchor_keys:
                target.copy_(tensors[key])
