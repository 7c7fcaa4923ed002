"""The kohya-ss LoRA file, the one sd-scripts writes and ComfyUI, A1111/Forge and diffusers read: its key names for
each model family, and writing it.

A layer's LoRA is three tensors under one module name, ``<prefix>_<module path, dots as underscores>``:
``.lora_down.weight`` (k, in) or, for a Conv2d, a conv with the layer's kernel (k, in, kh, kw); ``.lora_up.weight``
(out, k) or a 1x1 conv (out, k, 1, 1); and ``.alpha``, which readers turn into the scale ``alpha / k``: written as
k when every module of the file has one rank, and left out (which readers also take as scale 1) when the ranks
differ, for the reason :func:`kohya_state_dict` gives. The prefix says which model:
``lora_unet`` the denoiser, ``lora_te`` the text encoder of a one-encoder pipeline, ``lora_te1`` / ``lora_te2``
the two CLIP encoders of SDXL (and ``lora_te1`` the CLIP encoder of Flux).

The module path is the one sd-scripts' own model uses for that family, which is not always diffusers' name:

- SD 1.x / 2.x UNet: diffusers' names (``lora_unet_down_blocks_0_attentions_0_proj_in``). sd-scripts trains SD 1.x
  on its ``original_unet``, which keeps diffusers' module layout, and diffusers' ``StableDiffusionLoraLoaderMixin``
  reads only this spelling: it never passes the UNet config that the original-layout block renumbering needs.
- SDXL UNet: the original (sgm / LDM) names (``lora_unet_input_blocks_4_1_proj_in``, ``..._in_layers_2`` for a
  ResNet's ``conv1``), which sd-scripts' ``sdxl_original_unet`` uses. diffusers' SDXL loader passes the UNet config
  and renumbers these blocks back; it reads the diffusers spelling too, but sd-scripts never writes it for SDXL.
  (It misreads the upsampler of an up block without attention, which SDXL itself does not have: refused.)
- Flux.1 transformer: the original (BFL) names sd-scripts' ``lora_flux`` uses, with its fused layers: the
  ``double_blocks_N_img_attn_qkv`` of ``to_q``/``to_k``/``to_v``, and the ``single_blocks_N_linear1`` of
  ``to_q``/``to_k``/``to_v``/``proj_mlp``. A fused layer's LoRA stacks its members' downs and puts their ups on the
  block diagonal (a member that is not adapted gets zero rows), which is exactly the members' updates side by side.
  Only layers inside the double and single blocks are written: diffusers 0.42 drops the others (``img_in``,
  ``txt_in``, ``time_in``, ``final_layer``) on load, so they are refused.
- CLIP text encoders: the transformers names under ``text_model.`` (``lora_te_text_model_encoder_layers_0_mlp_fc1``),
  also for a ``CLIPTextModel`` whose recent transformers versions dropped the ``text_model`` level.

Other denoisers are refused (:class:`~psoft_vision.errors.LoRAExportError`): diffusers 0.42 converts kohya-style
keys only for the SD/SDXL UNets and Flux.1 (``_convert_non_diffusers_lora_to_diffusers`` and
``_convert_kohya_flux_lora_to_diffusers``); an SD3 file in sd-scripts' layout (``lora_unet_joint_blocks_...``) would
not load there, so it is not written.
"""

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, LoRAExportError
from ..files import write_safetensors
from .lora_factors import Factors
from .names import export_metadata, kohya_keys

UNET, TE, TE1, TE2 = "lora_unet", "lora_te", "lora_te1", "lora_te2"
PREFIXES = (UNET, TE, TE1, TE2)
SUPPORTED = ("a Stable Diffusion 1.x/2.x or SDXL UNet2DConditionModel, a Flux.1 FluxTransformer2DModel, or a CLIP "
             "text encoder")


def prefix_for(attribute: str, pipe) -> str:
    """The kohya prefix of the pipeline component ``attribute`` (``unet``, ``transformer``, ``text_encoder``,
    ``text_encoder_2``): a pipeline with a second text encoder (SDXL, Flux) numbers its first one ``lora_te1``."""
    if attribute in ("unet", "transformer"):
        return UNET
    if attribute == "text_encoder_2":
        return TE2
    return TE1 if isinstance(getattr(pipe, "text_encoder_2", None), nn.Module) else TE


def default_prefix(model: nn.Module) -> str:
    return TE if is_clip_text(model) else UNET


def module_factors(model: nn.Module, prefix: str, factors: Factors) -> Factors:
    """``{kohya module name with prefix: (up, down)}`` for the per-layer ``factors`` of ``model``."""
    if prefix not in PREFIXES:
        raise ConfigError(f"prefix={prefix!r} is not a kohya prefix; use one of {PREFIXES} (lora_unet for the "
                          "denoiser, lora_te / lora_te1 / lora_te2 for text encoders).")
    rename = _layout(model, prefix)
    if isinstance(rename, dict):  # a layout with fused layers: {kohya name: its member layers}
        named = _fused(model, rename, factors)
    else:
        named = {rename(name): pair for name, pair in factors.items()}
        _warn_outside_blocks(model, prefix, {name: f"{prefix}_{rename(name).replace('.', '_')}" for name in factors})
    return {f"{prefix}_{name.replace('.', '_')}": pair for name, pair in named.items()}


#: The modules inside which kohya-ss sd-scripts (networks/lora.py, ``LoRANetwork``) builds LoRA modules, by the
#: class names its own models share with diffusers' and transformers': the UNet's transformer blocks, and, when it
#: loads a file, its ResNet and up/down-sampling blocks; a text encoder's CLIP attention and MLP. It loads a file
#: into those modules with ``strict=False``, so a key outside them is dropped without a word.
SD_SCRIPTS_BLOCKS = {UNET: ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"),
                     TE: ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")}


def _inside_sd_scripts_blocks(model: nn.Module, name: str, blocks: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(type(model.get_submodule(".".join(parts[:i]))).__name__ in blocks for i in range(1, len(parts)))


def _warn_outside_blocks(model: nn.Module, prefix: str, kohya_names: dict[str, str]) -> None:
    """Warn, naming them, about the layers that sd-scripts would drop from this file (see
    :data:`SD_SCRIPTS_BLOCKS`): ``conv_in``, ``conv_out``, the time and added embeddings, a text projection."""
    blocks = SD_SCRIPTS_BLOCKS[UNET if prefix == UNET else TE]
    outside = [kohya_names[n] for n in kohya_names if not _inside_sd_scripts_blocks(model, n, blocks)]
    if outside:
        shown = ", ".join(outside[:8]) + (f", ... ({len(outside)} modules)" if len(outside) > 8 else "")
        warnings.warn(
            f"{len(outside)} modules of this kohya file lie outside the blocks kohya-ss sd-scripts adapts "
            "(transformer, ResNet and up/down-sampling blocks; CLIP attention and MLP in text encoders), and "
            "sd-scripts drops them "
            f"without a word when it loads the file: {shown}. ComfyUI loads every key. For the same model in "
            "sd-scripts, inject with those layers left out (exclude=...).", stacklevel=5)


def is_clip_text(model: nn.Module) -> bool:
    """A transformers CLIP text encoder, the one text-encoder family diffusers reads from this layout."""
    return type(model).__name__ in ("CLIPTextModel", "CLIPTextModelWithProjection")


def _unsupported(model: nn.Module, prefix: str, why: str) -> LoRAExportError:
    return LoRAExportError(
        f"format='kohya' with prefix {prefix!r} cannot hold a {type(model).__name__}: {why} It writes {SUPPORTED}. "
        "Use format='diffusers' (pipe.load_lora_weights) or format='peft' (PeftModel.from_pretrained) instead."
    )


def _layout(model: nn.Module, prefix: str):
    """A layer-name map (or, with fused layers, the table of kohya modules) for this model family."""
    cls = type(model).__name__
    if prefix != UNET:
        if not is_clip_text(model):
            raise _unsupported(model, prefix, "the text-encoder prefixes are for CLIP text encoders, the only ones "
                                              "diffusers converts from this layout.")
        return (lambda name: name) if hasattr(model, "text_model") else (lambda name: "text_model." + name)
    if cls == "UNet2DConditionModel":
        if getattr(model.config, "addition_embed_type", None) == "text_time":
            return _sgm_renamer(model)
        return lambda name: name
    if cls == "FluxTransformer2DModel":
        return _flux_table(model)
    raise _unsupported(model, prefix, "diffusers 0.42 converts kohya-style keys only for SD/SDXL UNets and Flux.1 "
                                      "(not SD3's lora_unet_joint_blocks_..., nor other transformers).")


def kohya_state_dict(factors: Factors, dtype: torch.dtype) -> dict:
    """kohya tensors for ``{kohya module name: (up, down)}``.

    ``alpha`` (the scale is ``alpha / rank``) is written, equal to the rank, only when every module has the same
    rank. With mixed ranks it is left out, which sd-scripts, ComfyUI, Forge and diffusers all read as scale 1:
    diffusers' SD/SDXL converter keys the alpha of an attention projection by its old processor name
    (``...attn1.processor.to_q_lora.down.weight``), which matches no module, so an attention layer whose alpha
    differs from the file's most common one would get the wrong scale there. ``alpha`` is fp32, where every rank
    is exact (bf16 would round a rank such as 257).
    """
    tensors, ranks = {}, set()
    for module, pair in factors.items():
        up, down = pair
        if down.dim() == 4:
            up = up[..., None, None]
        down_key, up_key, _ = kohya_keys(module)
        tensors[down_key] = down.to("cpu", dtype).contiguous()
        tensors[up_key] = up.to("cpu", dtype).contiguous()
        ranks.add(up.shape[1])
    if len(ranks) == 1:
        tensors.update({kohya_keys(module)[2]: torch.tensor(float(*ranks)) for module in factors})
    return tensors


def write_lora(path: Path, factors: Factors, dtype: torch.dtype, info: dict) -> Path:
    """The kohya file of ``{kohya module name: (up, down)}`` (:func:`module_factors` of every part) at ``path``."""
    write_safetensors(path, kohya_state_dict(factors, dtype), export_metadata(info))
    return path


# ---------------------------------------------------------------------------------------------------- SDXL (sgm)
_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_SAMPLER = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv")


def _sgm_renamer(unet: nn.Module):
    """diffusers name -> sgm name for an SDXL-style UNet: every down block holds ``L`` ResNets (attentions beside
    them) and a downsampler, every up block ``L + 1`` and an upsampler; input block 0 is ``conv_in``."""
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int) or any(len(b.resnets) != per_block for b in unet.down_blocks) \
            or any(len(b.resnets) != per_block + 1 for b in unet.up_blocks):
        raise _unsupported(unet, UNET, f"its blocks do not all hold layers_per_block={per_block} ResNets, so they "
                                       "have no numbering in the original SDXL layout.")
    span = per_block + 1

    def inner(kind: str, rest: str, name: str) -> str:
        if kind == "attentions":
            return rest
        if rest not in _RESNET:
            raise _unsupported(unet, UNET, f"{name!r} has no name in the original SDXL layout.")
        return _RESNET[rest]

    def rename(name: str) -> str:
        if name in _SGM_TOP:
            return _SGM_TOP[name]
        if m := _BLOCK.fullmatch(name):
            side, block, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            index = 1 + block * span + j if side == "down_blocks" else block * span + j
            group = "input_blocks" if side == "down_blocks" else "output_blocks"
            return f"{group}.{index}.{int(kind == 'attentions')}.{inner(kind, rest, name)}"
        if m := _MID.fullmatch(name):
            position = 1 if m[1] == "attentions" else 2 * int(m[2])
            return f"middle_block.{position}.{inner(m[1], m[3], name)}"
        if m := _SAMPLER.fullmatch(name):
            block = int(m[2])
            if m[1] == "down_blocks":
                return f"input_blocks.{(block + 1) * span}.0.op"
            if not getattr(unet.up_blocks[block], "attentions", None):
                raise LoRAExportError(
                    f"{name!r} upsamples an up block without attention: in the original SDXL layout it is "
                    f"output_blocks.{block * span + per_block}.1.conv, which diffusers' SDXL reader takes for an "
                    "attention (it reads index 1 as one), so the file would not reproduce the model there. Leave it "
                    "out of `targets`, or use format='diffusers'."
                )
            return f"output_blocks.{block * span + per_block}.2.conv"
        raise _unsupported(unet, UNET, f"{name!r} has no name in the original SDXL layout.")

    return rename


# ---------------------------------------------------------------------------------------------------- Flux (BFL)
_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
                "modulation_lin": ("norm.linear",)}
def _flux_table(model: nn.Module) -> dict[str, tuple[str, ...]]:
    table = {}
    for blocks, prefix, members in (("transformer_blocks", "double_blocks", _FLUX_DOUBLE),
                                    ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE)):
        for i in range(len(getattr(model, blocks))):
            table.update({f"{prefix}_{i}_{kohya}": tuple(f"{blocks}.{i}.{m}" for m in layers)
                          for kohya, layers in members.items()})
    return table


def _out_features(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    return getattr(module, "base", module).weight.shape[0]


def _fused(model: nn.Module, table: dict[str, tuple[str, ...]], factors: Factors) -> Factors:
    """The kohya modules that hold adapted layers, each member's update in its rows."""
    placed = {layer for layers in table.values() for layer in layers}
    stray = [name for name in factors if name not in placed]
    if stray:
        raise LoRAExportError(
            f"{stray[:3]} are outside Flux's double and single blocks. sd-scripts has names for some of them "
            "(img_in, txt_in, time_in, final_layer), but diffusers 0.42's kohya Flux converter leaves the transformer. "
            "prefix off those keys and load_lora_weights then drops them, so the file would not reproduce the model "
            "there. Leave them out of `targets`, or use format='diffusers'."
        )
    named = {}
    for kohya, layers in table.items():
        if not any(layer in factors for layer in layers):
            continue
        parts = [(factors.get(layer), _out_features(model, layer)) for layer in layers]
        named[kohya] = _stack(parts)
    return named


def _stack(parts: list[tuple[tuple[torch.Tensor, torch.Tensor] | None, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA whose update is the members' updates stacked by rows: downs stacked, ups on the block diagonal.
    When the stacked rank passes the full rank (full deltas of a qkv), the stacked update itself with an identity
    on the smaller side is no larger, and is what is returned."""
    down = torch.cat([pair[1] for pair, _ in parts if pair is not None])
    width, total = down.shape[1], sum(out for _, out in parts)
    if down.shape[0] > min(total, width):
        delta = torch.cat([pair[0] @ pair[1] if pair is not None else down.new_zeros(out, width)
                           for pair, out in parts])
        eye = torch.eye(min(total, width), device=down.device)
        return (delta, eye) if total > width else (eye, delta)
    up = down.new_zeros(total, down.shape[0])
    row = column = 0
    for pair, out in parts:
        if pair is not None:
            rank = pair[0].shape[1]
            up[row:row + out, column:column + rank] = pair[0]
            column += rank
        row += out
    return up, down
