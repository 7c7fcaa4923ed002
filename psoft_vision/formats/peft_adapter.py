"""PEFT's adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``), the one format of
``peft.PeftModel.from_pretrained``: a LoRA (its keys and LoraConfig, which diffusers' LoRA files share, see
:mod:`~psoft_vision.formats.diffusers_lora`), an OFTv2 adapter as PEFT's own OFT, as small as the adapter itself (no
full-rank deltas), and loading an exported LoRA folder onto the denoisers diffusers has no LoRA loader for.

The OFT mapping, checked against peft 0.21.2 (``peft/tuners/oft/layer.py``) and proved by tests/test_export_formats.py:

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

What cannot be matched is refused with an :class:`~psoft_vision.errors.OFTExportError` that points to the exact
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

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterFileError, LoRAExportError, OFTExportError
from ..files import atomic_folder, ordinary_permissions
from ..model import denoiser, holding, train_modules_of
from ..orthogonal import NEUMANN_MAX_NORM
from ..targets import candidate_modules
from .lora_factors import Factors, lora_weights
from .names import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHT_NAME, export_metadata, lora_keys, oft_key

#: The peft version whose OFT conventions this module maps to (a config needs one to load with the Neumann form).
PEFT_VERSION = "0.21.2"
PEFT_DEFAULT_TERMS = 5
FALLBACK = "export_lora(model, path, full_deltas=True) writes the exact update as a full-rank LoRA instead"


# ---------------------------------------------------------------------------------------------------------- LoRA
def target_modules(targets: list[str], names: list[str]) -> list[str] | str:
    """PEFT's ``target_modules`` for exactly ``targets``: the list of names, or an anchored regex when one of them is
    a dotted suffix of another module's name (PEFT matches list entries as suffixes)."""
    targets = sorted(targets)
    if any(n not in targets and n.endswith(tuple("." + t for t in targets)) for n in names):
        return "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    return targets


def lora_config(ranks: dict[str, int], names: list[str]) -> dict:
    """LoraConfig arguments that give every layer its own rank and scaling ``alpha / r == 1``.

    Pattern keys are anchored (``^``) and escaped: PEFT matches them as ``(.*\\.)?(key)$``, so a bare name would
    also catch the same name nested deeper.
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(n)}": k for n, k in ranks.items() if k != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": target_modules(list(ranks), names), "use_dora": False, "lora_bias": False}


def lora_state_dict(factors: Factors, prefix: str, dtype: torch.dtype) -> tuple[dict, dict[str, int]]:
    """``(tensors, {layer: rank})``: each layer's factors under ``<prefix><layer>.lora_A`` / ``lora_B``."""
    tensors, ranks = {}, {}
    for layer_name, (up, down) in factors.items():
        if down.dim() == 4:  # Conv2d: lora_B is a 1x1 conv
            up = up[..., None, None]
        down_key, up_key = lora_keys(prefix + layer_name)
        tensors[down_key] = down.to("cpu", dtype).contiguous()
        tensors[up_key] = up.to("cpu", dtype).contiguous()
        ranks[layer_name] = up.shape[1]
    return tensors, ranks


def modules_to_save(model: nn.Module, train_modules: list[str]) -> dict[str, torch.Tensor]:
    """The weights of ``train_modules`` under the keys PEFT's ``modules_to_save`` reads back; refuses a name that
    is also the end of another module's, which PEFT's suffix match would wrap too."""
    names = [n for n, _ in candidate_modules(model)]
    tensors = {}
    for module_name in train_modules:
        clashes = [n for n in names if n != module_name and n.endswith(module_name)]
        if clashes:
            raise LoRAExportError(
                f"train_modules entry {module_name!r} is also the end of {clashes[:3]}: PEFT's modules_to_save "
                "matches plain suffixes and would wrap those too. Rename or export without train_modules."
            )
        for key, p in model.get_submodule(module_name).named_parameters():
            tensors[f"{PEFT_PREFIX}{module_name}.{key}"] = p.detach().to("cpu").contiguous()
    return tensors


def peft_config(peft_type: str, train_modules: list[str]) -> dict:
    """The PeftConfig entries every exported adapter shares: inference mode, no bias, no base model id."""
    return {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "bias": "none", "fan_in_fan_out": False, "modules_to_save": train_modules or None}


def write_peft_directory(path: Path, tensors: dict, config: dict, info: dict) -> None:
    """``adapter_model.safetensors`` and ``adapter_config.json`` in the folder ``path``, swapped in as a whole
    (:func:`psoft_vision.files.atomic_folder`): a kill never leaves new weights beside an old config."""
    metadata = export_metadata(info)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        save_file(tensors, folder / PEFT_WEIGHT_NAME, metadata=metadata)
        (folder / PEFT_CONFIG_NAME).write_text(text)
        for name in (PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME):
            ordinary_permissions(folder / name)

    atomic_folder(path, write)


def write_lora(model: nn.Module, name: str, full_deltas: bool, dtype: torch.dtype, path: Path) -> Path:
    """Adapter ``name`` of ``model`` as a PEFT LoRA folder at ``path``, its ``train_modules`` as
    ``modules_to_save``."""
    factors = lora_weights(model, name, full_deltas)
    train_modules = train_modules_of(model, name)
    tensors, ranks = lora_state_dict(factors, PEFT_PREFIX, dtype)
    tensors.update(modules_to_save(model, train_modules))
    config = {**peft_config("LORA", train_modules), "lora_dropout": 0.0, "init_lora_weights": True,
              "use_rslora": False, **lora_config(ranks, [n for n, _ in candidate_modules(model)])}
    info = {"adapter": name, "full_deltas": full_deltas, "layers": len(factors)}
    write_peft_directory(path, tensors, config, info)
    return path


# ----------------------------------------------------------------------------------------------------------- OFT
def _check_layer(layer_name: str, base: nn.Module) -> None:
    """Refuse the layers whose PEFT OFT layer does not compute ``W R``."""
    if isinstance(base, nn.Linear):
        return
    if not isinstance(base, nn.Conv2d):
        raise OFTExportError(f"{layer_name!r} is a {type(base).__name__}; PEFT's OFT takes nn.Linear and nn.Conv2d. "
                              f"{FALLBACK}.")
    if tuple(base.kernel_size) != (1, 1):
        raise OFTExportError(
            f"{layer_name!r} is a Conv2d with kernel {tuple(base.kernel_size)}: PEFT 0.21's conv OFT rotates "
            "overlapping patches and sums them back, so its forward does not reproduce a rotated kernel (it is not "
            f"even the identity at initialisation); only 1x1 convs map exactly. {FALLBACK}, or leave the layer out."
        )
    if base.groups != 1 or tuple(base.dilation) != (1, 1):
        raise OFTExportError(f"{layer_name!r} is a Conv2d with groups={base.groups}, dilation="
                              f"{tuple(base.dilation)}; PEFT's conv OFT has neither. {FALLBACK}.")


def _terms(adapter, q: torch.Tensor) -> int | None:
    """The Neumann term count K this layer's rotation uses, None where it is the exact Cayley transform: the
    decision :func:`psoft_vision.orthogonal.orthogonal_from_packed` makes on the same q."""
    if adapter.neumann_terms is None or bool((q.norm(dim=-1) * 2**0.5 >= NEUMANN_MAX_NORM).any()):
        return None
    return adapter.neumann_terms


def _one(values: dict[str, object], what: str, hint: str):
    """The one value every layer shares, or an OFTExportError naming a layer of each."""
    distinct = {}
    for layer_name, value in values.items():
        distinct.setdefault(value, layer_name)
    if len(distinct) > 1:
        examples = ", ".join(f"{layer!r}: {value}" for value, layer in distinct.items())
        raise OFTExportError(f"PEFT's OFTConfig holds one {what} for every layer, and the layers differ ({examples})"
                              f"; {hint}. {FALLBACK}.")
    return next(iter(distinct))


def _packed(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], int, int | None]:
    """``({layer: PEFT's oft_R.weight}, block size, K or None)`` of OFT adapter ``name``."""
    weights, sizes, terms = {}, {}, {}
    for layer_name, layer, adapter in holding(model, name):
        if adapter.method != "oft":
            raise OFTExportError(f"adapter {name!r} is {adapter.method!r} on {layer_name!r}; export_oft writes OFTv2 "
                                  "adapters. Use export_lora (a PSOFT update is exactly a LoRA).")
        _check_layer(layer_name, layer.base)
        q = adapter.at_strength(adapter.q, 0.0).detach().float()
        sizes[layer_name], terms[layer_name] = adapter.block_size, _terms(adapter, q)
        weights[layer_name] = q if terms[layer_name] is None else -q
    size = _one(sizes, "block size", "inject with one block_size (no block_size_pattern, no adjusted sizes)")
    k = _one(terms, "Cayley transform", "None is the exact transform, used by psoft_vision's Neumann branch where "
             f"some ||Q||_F >= {NEUMANN_MAX_NORM}; inject with neumann_terms=None to train with the exact one")
    if k == 1:
        raise OFTExportError(f"adapter {name!r} uses neumann_terms=1, which PEFT's series cannot express (its "
                              f"num_cayley_neumann_terms=3 and 4 both give our K=2). {FALLBACK}.")
    return weights, size, k


def write_oft(model: nn.Module, name: str, dtype: torch.dtype, path: Path) -> Path:
    """OFTv2 adapter ``name`` of ``model`` as a PEFT OFT folder at ``path`` (see the module docstring), its
    ``train_modules`` as ``modules_to_save``."""
    with torch.no_grad():
        weights, size, terms = _packed(model, name)
    train_modules = train_modules_of(model, name)
    tensors = {oft_key(layer): q.to("cpu", dtype).contiguous() for layer, q in weights.items()}
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


# ---------------------------------------------------------------------------------------------------------- load
def load_peft_lora(model, path: str | os.PathLike, adapter_name: str = "default"):
    """Load the LoRA that ``export_lora(..., format="peft")`` wrote to the directory ``path`` onto ``model`` (a
    denoiser, or a pipeline: then onto its denoiser), in place; returns what it was given.

    For the denoisers diffusers has no LoRA loader for: neither their pipeline's ``load_lora_weights`` nor a
    ``load_lora_adapter`` on the model (PixArt, DiT, HunyuanDiT, Stable Video Diffusion). It does what
    ``load_lora_adapter`` does for the others: PEFT puts its LoRA layers into the model's own modules, so the
    module keeps its class and a pipeline holding it runs the LoRA with no other change. PEFT's ``PeftModel``
    wrapper is not kept; ``peft.PeftModel.from_pretrained(model, path)`` is the same load with it, for its
    ``unload()`` or ``merge_and_unload()``. Needs peft, as every diffusers LoRA load does.
    """
    path = Path(path)
    if not (path / PEFT_CONFIG_NAME).is_file():
        raise AdapterFileError(
            f"{str(path)!r} is not a PEFT LoRA directory (no {PEFT_CONFIG_NAME}); write one with "
            "psoft_vision.export_lora(model, path, format='peft')."
        )
    try:
        from peft import PeftModel
    except ImportError as error:
        raise ImportError("load_peft_lora needs peft (pip install peft), as diffusers' own LoRA loading does.") \
            from error
    module = model if isinstance(model, nn.Module) else denoiser(model)[0]
    PeftModel.from_pretrained(module, path, adapter_name=adapter_name)  # injects into ``module`` itself
    return model
