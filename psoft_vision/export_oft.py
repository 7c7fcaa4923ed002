"""Write an OFTv2 adapter as PEFT's own OFT adapter, as small as the adapter itself (no full-rank deltas).

The mapping, checked against peft 0.21.2 (``peft/tuners/oft/layer.py``) and proved by tests/test_export_formats.py:

- Packing: PEFT fills ``oft_R.weight`` (blocks, b(b-1)/2) into the strict upper triangle in ``triu_indices`` order
  and takes ``Q' = U - U^T`` (``OFTRotationModule.__init__`` and ``_pytorch_skew_symmetric``, lines 101-111): our
  packing, element for element.
- Side: PEFT rotates the input, ``x_blk -> x_blk M`` (``forward``, lines 270-277), so its merged weight is
  ``W M^T`` (``Linear.merge``, lines 579-581); ours is ``W R``. The two agree when ``M = R^T``.
- Exact transform (``use_cayley_neumann=False``): ``M = solve(I + Q', I - Q', left=False) = (I - Q')(I + Q')^{-1}``
  (``_cayley_batch``, lines 148-154), the transpose of our ``(I + Q)(I - Q)^{-1}`` at ``Q' = Q``: **q' = q**.
- Neumann (``use_cayley_neumann=True``, ``num_cayley_neumann_terms=t``): ``M = I + 2Q' + ... + 2Q'^(t-2) + Q'^(t-1)``
  (lines 134-147), our series with ``K = t - 2`` terms; its transpose is the same series at ``-Q'``: **q' = -q**
  and **t = K + 2**. Our ``K = 1`` has no PEFT equivalent (its ``t = 3`` repeats ``t = 4``, our ``K = 2``).
- Blocks: ``oft_block_size = b`` with ``r = 0`` gives ``in / b`` contiguous blocks (``update_layer``, lines 421-428);
  ``block_share=False``, and ``coft=False`` (COFT would project q at every forward, lines 256-258).

What cannot be matched is refused with a :class:`~psoft_vision.errors.LoRAExportError` that points to the exact
full-delta LoRA, ``export_lora(..., full_deltas=True)``:

- a Conv2d with a kernel larger than 1x1: PEFT rotates patches of ``in * kh * kw`` values taken with stride 1 and
  no padding and folds them back by summing the overlaps (``_unfold`` / ``_fold``, lines 188-243), so its
  unmerged forward scales each pixel by the number of patches that cover it and is not even the identity at
  initialisation; only its merged weight is a rotation. 1x1 convs are exact (their patches are single pixels).
  PEFT also refuses dilation (line 723); grouped convs do not fit its ``view(out, in * kh * kw)``.
- settings PEFT holds once per model: every layer must share one block size and one transform. Our Neumann branch
  switches to the exact solve on a layer where some ``||Q||_F`` reaches 0.5
  (:data:`psoft_vision.orthogonal.NEUMANN_MAX_NORM`) and PEFT never does, so a model with layers on both branches
  has no single PEFT config.

Not offered: kohya-ss sd-scripts' OFT (``networks/oft.py``) rotates the output side (``R^T`` applied to blocks of
output rows of ``W``), which no input-side rotation equals; OneTrainer's OFTv2 is PEFT-like on Linear layers with a
fixed ``t = 5`` (our odd ``K = 3``), but which tools read its files and how could not be checked offline.
"""

import os
from pathlib import Path

import torch
from torch import nn

from .diffusers import denoiser
from .errors import ConfigError, LoRAExportError
from .export import (
    floating_dtype,
    holding,
    modules_to_save,
    peft_config,
    target_modules,
    train_modules_of,
    write_peft_directory,
)
from .lifecycle import one_adapter_name, unwrapped
from .orthogonal import NEUMANN_MAX_NORM
from .targets import candidate_modules

#: The peft version whose OFT conventions this module maps to (a config needs one to load with the Neumann form).
PEFT_VERSION = "0.21.2"
PEFT_DEFAULT_TERMS = 5
FALLBACK = "export_lora(model, path, full_deltas=True) writes the exact update as a full-rank LoRA instead"


def _check_layer(layer_name: str, base: nn.Module) -> None:
    """Refuse the layers whose PEFT OFT layer does not compute ``W R``."""
    if isinstance(base, nn.Linear):
        return
    if not isinstance(base, nn.Conv2d):
        raise LoRAExportError(f"{layer_name!r} is a {type(base).__name__}; PEFT's OFT takes nn.Linear and nn.Conv2d. "
                              f"{FALLBACK}.")
    if tuple(base.kernel_size) != (1, 1):
        raise LoRAExportError(
            f"{layer_name!r} is a Conv2d with kernel {tuple(base.kernel_size)}: PEFT 0.21's conv OFT rotates "
            "overlapping patches and sums them back, so its forward does not reproduce a rotated kernel (it is not "
            f"even the identity at initialisation); only 1x1 convs map exactly. {FALLBACK}, or leave the layer out."
        )
    if base.groups != 1 or tuple(base.dilation) != (1, 1):
        raise LoRAExportError(f"{layer_name!r} is a Conv2d with groups={base.groups}, dilation="
                              f"{tuple(base.dilation)}; PEFT's conv OFT has neither. {FALLBACK}.")


def _terms(adapter, q: torch.Tensor) -> int | None:
    """The Neumann term count K this layer's rotation uses, None where it is the exact Cayley transform: the
    decision :func:`psoft_vision.orthogonal.orthogonal_from_packed` makes on the same q."""
    if adapter.neumann_terms is None or bool((q.norm(dim=-1) * 2**0.5 >= NEUMANN_MAX_NORM).any()):
        return None
    return adapter.neumann_terms


def _one(values: dict[str, object], what: str, hint: str):
    """The one value every layer shares, or a LoRAExportError naming a layer of each."""
    distinct = {}
    for layer_name, value in values.items():
        distinct.setdefault(value, layer_name)
    if len(distinct) > 1:
        examples = ", ".join(f"{layer!r}: {value}" for value, layer in distinct.items())
        raise LoRAExportError(f"PEFT's OFTConfig holds one {what} for every layer, and the layers differ ({examples})"
                              f"; {hint}. {FALLBACK}.")
    return next(iter(distinct))


def _packed(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], int, int | None]:
    """``({layer: PEFT's oft_R.weight}, block size, K or None)`` of OFT adapter ``name``."""
    weights, sizes, terms = {}, {}, {}
    for layer_name, layer, adapter in holding(model, name):
        if adapter.method != "oft":
            raise LoRAExportError(f"adapter {name!r} is {adapter.method!r} on {layer_name!r}; export_oft writes OFTv2 "
                                  "adapters. Use export_lora (a PSOFT update is exactly a LoRA).")
        _check_layer(layer_name, layer.base)
        q = adapter.at_strength(adapter.q, 0.0).detach().float()
        sizes[layer_name], terms[layer_name] = adapter.block_size, _terms(adapter, q)
        weights[layer_name] = q if terms[layer_name] is None else -q
    size = _one(sizes, "block size", "inject with one block_size (no block_size_pattern, no adjusted sizes)")
    k = _one(terms, "Cayley transform", "None is the exact transform, used by psoft_vision's Neumann branch where "
             f"some ||Q||_F >= {NEUMANN_MAX_NORM}; inject with neumann_terms=None to train with the exact one")
    if k == 1:
        raise LoRAExportError(f"adapter {name!r} uses neumann_terms=1, which PEFT's series cannot express (its "
                              f"num_cayley_neumann_terms=3 and 4 both give our K=2). {FALLBACK}.")
    return weights, size, k


def export_oft(model, path: str | os.PathLike, format: str = "peft", name: str | None = None, *,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write OFTv2 adapter ``name`` (optional when the model has one) as a PEFT OFT adapter directory
    (``adapter_config.json`` and ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(base_model,
    path)``, which then computes what the adapted model computes; returns the directory.

    ``model`` is a module or a diffusers pipeline (its denoiser). The config's ``train_modules`` go in as
    ``modules_to_save``. ``dtype`` is the floating dtype of the stored parameters. The adapter's strength is baked
    in. See the module docstring for the mapping to PEFT's parameters and for what is refused (kernels larger than
    1x1, mixed block sizes or transforms), where ``export_lora(..., full_deltas=True)`` remains exact.
    """
    if format != "peft":
        raise ConfigError(f"format={format!r}: export_oft writes 'peft' only. kohya's OFT rotates the output side, "
                          f"which no psoft_vision OFT adapter equals; {FALLBACK} for kohya tools.")
    dtype = floating_dtype(dtype)
    path = Path(path)
    if path.suffix == ".safetensors":
        raise ConfigError(f"export_oft writes a directory; got the file name {str(path)!r}: pass a directory path.")
    model = unwrapped(model) if isinstance(model, nn.Module) else denoiser(model)[0]
    name = one_adapter_name(model, name)
    with torch.no_grad():
        weights, size, terms = _packed(model, name)
    train_modules = train_modules_of(model, name)
    tensors = {f"base_model.model.{layer}.oft_R.weight": q.to("cpu", dtype).contiguous()
               for layer, q in weights.items()}
    tensors.update(modules_to_save(model, train_modules))
    config = {
        **peft_config("OFT", train_modules),
        "peft_version": PEFT_VERSION,
        "r": 0,
        "oft_block_size": size,
        "use_cayley_neumann": terms is not None,
        "num_cayley_neumann_terms": PEFT_DEFAULT_TERMS if terms is None else terms + 2,
        "module_dropout": 0.0,
        "coft": False,
        "eps": 6e-5,
        "block_share": False,
        "init_weights": True,
        "target_modules": target_modules(list(weights), [n for n, _ in candidate_modules(model)]),
    }
    info = {"adapter": name, "method": "oft", "layers": len(weights)}
    write_peft_directory(path, tensors, config, info)
    return path
