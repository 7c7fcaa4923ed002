"""Tiny diffusers denoisers for the coverage tests (tests/test_denoisers.py) and the table in docs/models.md.

One :class:`Denoiser` per covered configuration: its class and a tiny config (after diffusers' own tests), its
inputs, where its blocks are and which linears inside them condition rather than transform (both read off the
model's source by hand, so the tests check the structural ``"auto"`` rule against an expectation that does not
call it), and the pipeline a user runs it in, which decides the LoRA loader (:func:`lora_loader`).

    python -m tests.denoisers --doc docs/models.md   # run tests/test_denoisers.py, rewrite the diffusers table
    python -m tests.denoisers --list flux            # every Linear / Conv2d of a model: + adapted by auto, - left
"""

import argparse
import re
import subprocess
import sys
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers.loaders.peft import PeftAdapterMixin
from torch import nn

import psoft_vision as pv
from psoft_vision.targets import select

#: The adapters every test and the table use: small enough for widths of 16-64.
PSOFT = dict(rank=4)
OFT = dict(block_size=4)


@dataclass(frozen=True)
class Denoiser:
    key: str
    cls: type
    config: dict
    inputs: Callable[[torch.Generator], dict]
    #: full-match regex of the modules that hold the blocks: every dense pointwise layer under them is adapted ...
    blocks: str
    #: ... except these (full-match regex): adaLN modulation and embedders inside the blocks
    conditioning: str = r"(?!)"
    #: the pipeline a user runs the model in, and the attribute the model has there
    pipeline: str = ""
    attribute: str = "transformer"
    #: what the model needs after construction to be like a trained one (a fresh ControlNet outputs zeros)
    prepare: Callable[[nn.Module], None] | None = None
    title: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: ``(error, why)`` where running the adapted model fails today: those tests must fail with that error ...
    known_failure: tuple[type[Exception], str] | None = None
    #: ... and pass with these config arguments (target regexes) added
    workaround: dict[str, str] = field(default_factory=dict)

    def make(self) -> nn.Module:
        """The model, the same weights on every call."""
        torch.manual_seed(0)
        model = self.cls(**self.config)
        if self.prepare is not None:
            self.prepare(model)
        return model.eval()

    def example(self) -> dict:
        return self.inputs(torch.Generator().manual_seed(1))


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _tensors(value) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else [t for item in value for t in _tensors(item)]


def output(result) -> torch.Tensor:
    """One tensor of everything a forward returns: ``sample`` (Z-Image's is a list), or a ControlNet's residuals."""
    value = result.sample if hasattr(result, "sample") else result.to_tuple()
    return torch.cat([t.flatten() for t in _tensors(value)])


@torch.no_grad()
def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    return output(model(**inputs))


# ------------------------------------------------------------------------------------------------------- UNets
_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=8,
             norm_num_groups=8)
#: every Transformer2DModel nested in a UNet or ControlNet: its proj_in / proj_out and its blocks
_UNET_BLOCKS = r"((down|up)_blocks\.\d+\.|mid_block\.)attentions\.\d+"


def _unet_inputs(gen: torch.Generator) -> dict:
    return dict(sample=_randn(gen, 2, 4, 8, 8), timestep=torch.tensor([3, 500]),
                encoder_hidden_states=_randn(gen, 2, 5, 16))


def _sdxl_inputs(gen: torch.Generator) -> dict:
    text_time = {"text_embeds": _randn(gen, 2, 16), "time_ids": _randn(gen, 2, 6)}
    return {**_unet_inputs(gen), "added_cond_kwargs": text_time}


def _trained_controlnet(model: nn.Module) -> None:
    """A fresh ControlNet's output convs are zero, so its output is too; a trained one's are not."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)


def _controlnet_inputs(gen: torch.Generator) -> dict:
    return {**_unet_inputs(gen), "controlnet_cond": _randn(gen, 2, 3, 16, 16)}


def _animatediff_inputs(gen: torch.Generator) -> dict:
    return dict(sample=_randn(gen, 2, 4, 2, 8, 8), timestep=torch.tensor([10]),
                encoder_hidden_states=_randn(gen, 2 * 2, 5, 16))


def _svd_inputs(gen: torch.Generator) -> dict:
    return dict(sample=_randn(gen, 2, 2, 4, 8, 8), timestep=torch.tensor([10]),
                encoder_hidden_states=_randn(gen, 2, 1, 16), added_time_ids=torch.tensor([[6, 127, 0.02]] * 2))


# ------------------------------------------------------------------------------------------------ transformers
def _positions(height: int, width: int) -> torch.Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(-1, 3)


def _sd3_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 8, 8), encoder_hidden_states=_randn(gen, 2, 5, 24),
                pooled_projections=_randn(gen, 2, 12), timestep=torch.tensor([3, 700]))


def _flux_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 16, 8), encoder_hidden_states=_randn(gen, 2, 5, 24),
                pooled_projections=_randn(gen, 2, 12), timestep=torch.tensor([0.3, 0.9]), img_ids=_positions(4, 4),
                txt_ids=torch.zeros(5, 3))


def _flux2_positions(frames: int, height: int, width: int, tokens: int) -> torch.Tensor:
    ids = torch.cartesian_prod(*(torch.arange(n) for n in (frames, height, width, tokens)))
    return ids[None].expand(2, -1, -1)


def _flux2_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 16, 4), encoder_hidden_states=_randn(gen, 2, 5, 24),
                img_ids=_flux2_positions(1, 4, 4, 1), txt_ids=_flux2_positions(1, 1, 1, 5),
                timestep=torch.tensor([0.3, 0.9]), guidance=torch.tensor([1.0, 4.0]))


def _chroma_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 16, 4), encoder_hidden_states=_randn(gen, 2, 5, 24),
                timestep=torch.tensor([0.3, 0.9]), img_ids=_positions(4, 4), txt_ids=torch.zeros(5, 3))


def _pixart_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 8, 8), encoder_hidden_states=_randn(gen, 2, 5, 24),
                timestep=torch.tensor([3, 700]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _dit_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 8, 8), timestep=torch.tensor([3, 700]),
                class_labels=torch.tensor([1, 7]))


def _sana_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 8, 8), encoder_hidden_states=_randn(gen, 2, 5, 8),
                timestep=torch.tensor([3, 700]))


def _hunyuandit_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 8, 8), timestep=torch.tensor([3.0, 700.0]),
                encoder_hidden_states=_randn(gen, 2, 4, 8), text_embedding_mask=torch.ones(2, 4),
                encoder_hidden_states_t5=_randn(gen, 2, 4, 8), text_embedding_mask_t5=torch.ones(2, 4),
                image_meta_size=torch.tensor([[1024.0, 1024, 16, 16, 0, 0]] * 2),
                style=torch.zeros(2, dtype=torch.long), image_rotary_emb=[torch.ones(16, 8), torch.zeros(16, 8)])


def _auraflow_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 8, 8), encoder_hidden_states=_randn(gen, 2, 5, 16),
                timestep=torch.tensor([3, 700]))


def _lumina2_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 8, 8), timestep=torch.tensor([0.3, 0.9]),
                encoder_hidden_states=_randn(gen, 2, 5, 16), encoder_attention_mask=torch.ones(2, 5, dtype=torch.bool))


def _cogview4_inputs(gen: torch.Generator) -> dict:
    sizes = torch.tensor([[64, 64]] * 2)
    return dict(hidden_states=_randn(gen, 2, 4, 8, 8), encoder_hidden_states=_randn(gen, 2, 5, 8),
                timestep=torch.tensor([3, 700]), original_size=sizes, target_size=sizes,
                crop_coords=torch.zeros(2, 2, dtype=torch.long))


def _qwenimage_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 16, 16), encoder_hidden_states=_randn(gen, 2, 5, 16),
                encoder_hidden_states_mask=torch.ones(2, 5, dtype=torch.long), timestep=torch.tensor([0.3, 0.9]),
                img_shapes=[(1, 4, 4)] * 2)


def _hidream_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 8, 8), timesteps=torch.tensor([3, 700]),
                encoder_hidden_states_t5=_randn(gen, 2, 5, 8), encoder_hidden_states_llama3=_randn(gen, 2, 2, 5, 4),
                pooled_embeds=_randn(gen, 2, 8))


def _wan_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 1, 4, 2, 8, 8), timestep=torch.tensor([3]),
                encoder_hidden_states=_randn(gen, 1, 5, 16))


def _ltx_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 2 * 4 * 4, 4), encoder_hidden_states=_randn(gen, 2, 5, 16),
                timestep=torch.tensor([3, 700]), encoder_attention_mask=torch.ones(2, 5, dtype=torch.bool),
                num_frames=2, height=4, width=4)


def _zimage_inputs(gen: torch.Generator) -> dict:
    return dict(x=[_randn(gen, 4, 1, 8, 8) for _ in range(2)], cap_feats=[_randn(gen, 5, 16) for _ in range(2)],
                t=torch.tensor([0.3, 0.9]))


def _hunyuanvideo_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 1, 8, 8), timestep=torch.tensor([3, 700]),
                encoder_hidden_states=_randn(gen, 2, 5, 16), pooled_projections=_randn(gen, 2, 8),
                encoder_attention_mask=torch.ones(2, 5), guidance=torch.tensor([3.0, 5.0]))


def _sanavideo_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 4, 2, 8, 8), encoder_hidden_states=_randn(gen, 2, 5, 16),
                timestep=torch.tensor([3, 700]))


def _cogvideox_inputs(gen: torch.Generator) -> dict:
    return dict(hidden_states=_randn(gen, 2, 1, 4, 8, 8), encoder_hidden_states=_randn(gen, 2, 8, 8),
                timestep=torch.tensor([3, 700]))


_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
            pos_embed_max_size=16)
_SD3_MODULATION = r".*\.norm1(_context)?\.linear"

DENOISERS: dict[str, Denoiser] = {d.key: d for d in (
    Denoiser("sd15", diffusers.UNet2DConditionModel, _UNET, _unet_inputs, _UNET_BLOCKS,
             pipeline="StableDiffusionPipeline", attribute="unet", title="SD 1.5 UNet (conv proj_in/out)"),
    Denoiser("sd2", diffusers.UNet2DConditionModel, {**_UNET, "use_linear_projection": True,
                                                      "attention_head_dim": (4, 8)},
             _unet_inputs, _UNET_BLOCKS, pipeline="StableDiffusionPipeline", attribute="unet",
             title="SD 2.x UNet (linear proj_in/out, head dims per block)"),
    Denoiser("sdxl", diffusers.UNet2DConditionModel, {
        **_UNET, "use_linear_projection": True, "attention_head_dim": (4, 8), "addition_embed_type": "text_time",
        "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 6 * 4 + 16,
        "transformer_layers_per_block": (1, 2), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")},
        _sdxl_inputs, _UNET_BLOCKS, pipeline="StableDiffusionXLPipeline", attribute="unet",
        title="SDXL UNet (text_time embedding, 2 transformer layers per block)"),
    Denoiser("controlnet", diffusers.ControlNetModel, {
        key: _UNET[key] for key in ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                                    "attention_head_dim", "norm_num_groups")}
        | {"down_block_types": _UNET["down_block_types"], "conditioning_embedding_out_channels": (8, 16)},
        _controlnet_inputs, _UNET_BLOCKS, pipeline="StableDiffusionControlNetPipeline", attribute="controlnet",
        prepare=_trained_controlnet, title="ControlNet (SD 1.5)",
        notes=("controlnet_down_blocks / controlnet_mid_block (the zero convs into the UNet) are output "
               "projections and are left out",)),
    Denoiser("svd", diffusers.UNetSpatioTemporalConditionModel, dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=16,
        num_attention_heads=2, out_channels=4, in_channels=4, layers_per_block=1, sample_size=8,
        projection_class_embeddings_input_dim=3 * 4, addition_time_embed_dim=4),
        _svd_inputs, _UNET_BLOCKS, r".*\.time_pos_embed\..*", pipeline="StableVideoDiffusionPipeline",
        attribute="unet", title="Stable Video Diffusion UNet (spatial and temporal transformer blocks)"),
    Denoiser("sd3", diffusers.SD3Transformer2DModel, _SD3, _sd3_inputs, r"transformer_blocks\.\d+",
             _SD3_MODULATION, pipeline="StableDiffusion3Pipeline", title="SD3 (joint attention, context stream)"),
    Denoiser("sd3.5", diffusers.SD3Transformer2DModel, {**_SD3, "dual_attention_layers": (0,),
                                                        "qk_norm": "rms_norm"},
             _sd3_inputs, r"transformer_blocks\.\d+", _SD3_MODULATION, pipeline="StableDiffusion3Pipeline",
             title="SD3.5 (dual attention attn2, RMS q/k norm)"),
    Denoiser("flux", diffusers.FluxTransformer2DModel, dict(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(2, 2, 4)),
        _flux_inputs, r"(single_)?transformer_blocks\.\d+", r".*\.norm1?(_context)?\.linear",
        pipeline="FluxPipeline", title="Flux (double- and single-stream blocks)"),
    Denoiser("chroma", diffusers.ChromaTransformer2DModel, dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1),
        _chroma_inputs, r"(single_)?transformer_blocks\.\d+", pipeline="ChromaPipeline",
        title="Chroma (pruned modulation: a distilled guidance approximator outside the blocks)"),
    Denoiser("pixart", diffusers.PixArtTransformer2DModel, dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, norm_num_groups=8,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=24),
        _pixart_inputs, r"transformer_blocks\.\d+", pipeline="PixArtSigmaPipeline", title="PixArt-α / Σ"),
    Denoiser("dit", diffusers.DiTTransformer2DModel, dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, norm_num_groups=8,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10),
        _dit_inputs, r"transformer_blocks\.\d+", r".*\.norm1\..*", pipeline="DiTPipeline",
        title="DiT (adaLN-Zero with a timestep embedder per block)"),
    Denoiser("sana", diffusers.SanaTransformer2DModel, dict(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=8),
        _sana_inputs, r"transformer_blocks\.\d+", pipeline="SanaPipeline",
        title="Sana (linear attention, conv feed-forward)",
        notes=("the depthwise ff.conv_depth is left to explicit targets (PSOFT: a subspace per channel; OFT "
               "refuses it)",)),
    Denoiser("hunyuandit", diffusers.HunyuanDiT2DModel, dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
        text_len_t5=4, activation_fn="gelu-approximate"),
        _hunyuandit_inputs, r"blocks\.\d+", r".*\.norm1\.linear", pipeline="HunyuanDiTPipeline",
        title="HunyuanDiT (blocks.N, skip connections)"),
    Denoiser("auraflow", diffusers.AuraFlowTransformer2DModel, dict(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16, out_channels=4,
        pos_embed_max_size=16),
        _auraflow_inputs, r"(joint|single)_transformer_blocks\.\d+", r".*\.norm1(_context)?\.linear",
        pipeline="AuraFlowPipeline", title="AuraFlow (joint_transformer_blocks, SwiGLU feed-forward)"),
    Denoiser("lumina2", diffusers.Lumina2Transformer2DModel, dict(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=1, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(32, 32, 32), cap_feat_dim=16),
        _lumina2_inputs, r"(noise_refiner|context_refiner|layers)\.\d+", r".*\.norm1\.linear",
        pipeline="Lumina2Pipeline", title="Lumina 2 (layers.N and the noise / context refiners)"),
    Denoiser("cogview4", diffusers.CogView4Transformer2DModel, dict(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=4),
        _cogview4_inputs, r"transformer_blocks\.\d+", r".*\.norm1\.linear", pipeline="CogView4Pipeline",
        title="CogView4"),
    Denoiser("qwenimage", diffusers.QwenImageTransformer2DModel, dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 2, 2)),
        _qwenimage_inputs, r"transformer_blocks\.\d+", r".*\.(img|txt)_mod\.1", pipeline="QwenImagePipeline",
        title="Qwen-Image (img_mod / txt_mod = Sequential(SiLU, Linear))"),
    Denoiser("hidream", diffusers.HiDreamImageTransformer2DModel, dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(8, 8), llama_layers=(0, 1), force_inference_output=True),
        _hidream_inputs, r"(double|single)_stream_blocks\.\d+", r".*\.adaLN_modulation\.1",
        pipeline="HiDreamImagePipeline", title="HiDream-I1 (mixture-of-experts feed-forward)"),
    Denoiser("wan", diffusers.WanTransformer3DModel, dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32),
        _wan_inputs, r"blocks\.\d+", pipeline="WanPipeline", title="Wan 2.1 (video)"),
    Denoiser("ltx", diffusers.LTXVideoTransformer3DModel, dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=16),
        _ltx_inputs, r"transformer_blocks\.\d+", pipeline="LTXPipeline", title="LTX-Video"),
    Denoiser("cogvideox", diffusers.CogVideoXTransformer3DModel, dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8),
        _cogvideox_inputs, r"transformer_blocks\.\d+", r".*\.norm[12]\.linear", pipeline="CogVideoXPipeline",
        title="CogVideoX"),
    # classes beyond the brief's list, each with a structure the ones above do not have
    Denoiser("zimage", diffusers.ZImageTransformer2DModel, dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[4, 2, 2], axes_lens=[64, 16, 16]),
        _zimage_inputs, r"(noise_refiner|context_refiner|layers)\.\d+", r".*\.adaLN_modulation\.0",
        pipeline="ZImagePipeline", title="Z-Image (adaLN_modulation = Sequential(Linear), list inputs)"),
    Denoiser("flux2", diffusers.Flux2Transformer2DModel, dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=[2, 2, 2, 2]),
        _flux2_inputs, r"(single_)?transformer_blocks\.\d+", pipeline="Flux2Pipeline",
        title="Flux.2 (modulation shared outside the blocks, fused to_qkv_mlp_proj)"),
    Denoiser("hunyuanvideo", diffusers.HunyuanVideoTransformer3DModel, dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), image_condition_type=None),
        _hunyuanvideo_inputs, r"(single_)?transformer_blocks\.\d+", r".*\.norm1?(_context)?\.linear",
        pipeline="HunyuanVideoPipeline", title="HunyuanVideo",
        notes=("the token refiner's transformer blocks belong to `context_embedder`, the text embedder, and are left "
               "out",)),
    Denoiser("sanavideo", diffusers.SanaVideoTransformer3DModel, dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), norm_elementwise_affine=False, norm_eps=1e-6,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        _sanavideo_inputs, r"transformer_blocks\.\d+", pipeline="SanaVideoPipeline", title="Sana-Video",
        notes=("the depthwise ff.conv_depth and the 3x1 temporal ff.conv_temp are not pointwise: explicit targets "
               "only",)),
    Denoiser("animatediff", diffusers.UNetMotionModel, dict(
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16, num_attention_heads=2,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), out_channels=4, in_channels=4,
        layers_per_block=1, sample_size=8),
        _animatediff_inputs, r"((down|up)_blocks\.\d+\.|mid_block\.)(attentions|motion_modules)\.\d+",
        pipeline="AnimateDiffPipeline", attribute="unet", title="AnimateDiff UNet (motion modules)",
        known_failure=(TypeError, "the motion modules call proj_in(input=...) and proj_out(input=...) by keyword; "
                                  "psoft_vision's adapted layers take it (their argument is named input, as "
                                  "nn.Linear's is), but PEFT's LoRA Linear names it x, so the LoRA diffusers "
                                  "reloads fails on those layers"),
        workaround=dict(exclude=r".*motion_modules\.\d+\.proj_(in|out)")),
)}


# ----------------------------------------------------------------------------------------------- expectations
def dense_pointwise(module: nn.Module) -> bool:
    """A linear, or a 1x1 convolution that is not grouped: what auto adapts inside a block."""
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.groups == 1


def expected_targets(spec: Denoiser, model: nn.Module) -> set[str]:
    """The layers auto should adapt, from the spec's hand-written regexes (never from psoft_vision)."""
    inside = re.compile(f"({spec.blocks})\\..+")
    conditioning = re.compile(spec.conditioning)
    return {name for name, module in model.named_modules()
            if dense_pointwise(module) and inside.fullmatch(name) and not conditioning.fullmatch(name)}


# -------------------------------------------------------------------------------------------------- LoRA loaders
def lora_loader(spec: Denoiser) -> str:
    """How a user reloads an exported LoRA: ``"pipeline"`` (``pipe.load_lora_weights``), ``"model"`` (the model's
    ``load_lora_adapter``) or ``"peft"`` (:func:`psoft_vision.formats.peft_adapter.load_peft_lora`), the first diffusers
    offers for this model."""
    if spec.attribute in getattr(getattr(diffusers, spec.pipeline), "_lora_loadable_modules", ()):
        return "pipeline"
    if issubclass(spec.cls, PeftAdapterMixin):
        return "model"
    return "peft"


def loader_label(spec: Denoiser) -> str:
    return {"pipeline": f"`{spec.pipeline}.load_lora_weights`", "model": f"`{spec.cls.__name__}.load_lora_adapter`",
            "peft": "`psoft_vision.formats.peft_adapter.load_peft_lora` (PEFT format)"}[lora_loader(spec)]


def tiny_pipeline(spec: Denoiser, model: nn.Module):
    """The spec's pipeline holding ``model`` and nothing else: all a LoRA load needs."""
    import inspect

    pipeline = getattr(diffusers, spec.pipeline)
    parameters = inspect.signature(pipeline.__init__).parameters
    components = {name: None for name, p in parameters.items() if name != "self" and p.default is p.empty}
    if "requires_safety_checker" in parameters:
        components["requires_safety_checker"] = False
    components[spec.attribute] = model
    return pipeline(**components)


def export_and_reload(spec: Denoiser, adapted: nn.Module, fresh: nn.Module, directory: Path,
                      full_deltas: bool) -> None:
    """Export ``adapted``'s adapter as a LoRA and load it onto ``fresh`` the way :func:`lora_loader` says."""
    from psoft_vision.formats.peft_adapter import load_peft_lora

    loader = lora_loader(spec)
    if loader == "peft":
        load_peft_lora(fresh, pv.export_lora(adapted, directory, format="peft", full_deltas=full_deltas))
        return
    file = pv.export_lora(adapted, directory, full_deltas=full_deltas)
    if loader == "pipeline":
        tiny_pipeline(spec, fresh).load_lora_weights(directory, weight_name=file.name)
    else:
        fresh.load_lora_adapter(directory, weight_name=file.name)


# --------------------------------------------------------------------------------------------------- the table
def trainable(spec: Denoiser, config) -> tuple[int, int]:
    """``(adapted layers, trainable parameters)`` of ``config`` with ``targets="auto"`` on the spec's model."""
    model = spec.make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pv.inject(model, config)
    return len(list(pv.adapted_layers(model))), sum(p.numel() for p in model.parameters() if p.requires_grad)


def outcomes_of_tests() -> dict[str, str]:
    """``{spec key: "passes" | "known failure" | "FAILS: test names"}`` from a run of tests/test_denoisers.py."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        str(Path(__file__).with_name("test_denoisers.py"))], check=False)
        cases = list(ET.parse(report).getroot().iter("testcase"))
    results: dict[str, list[tuple[str, str]]] = {key: [] for key in DENOISERS}
    for case in cases:
        match = re.search(r"\[(.+)\]$", case.get("name"))
        outcome = next((child.tag if child.tag != "skipped" else child.get("type", "skipped") for child in case
                        if child.tag in ("failure", "error", "skipped")), "passed")
        for key in (k for k in (match.group(1).split("-") if match else []) if k in results):
            results[key].append((case.get("name"), outcome))

    def status(runs: list[tuple[str, str]]) -> str:
        broken = [name for name, outcome in runs if outcome not in ("passed", "pytest.xfail")]
        if broken or not runs:
            return "FAILS: " + (", ".join(broken) or "not run")
        return "known failure" if any(outcome == "pytest.xfail" for _, outcome in runs) else "passes"

    return {key: status(runs) for key, runs in results.items()}


def _notes(spec: Denoiser) -> list[str]:
    notes = list(spec.notes)
    if spec.known_failure:
        fix = ", ".join(f'`{key}=r"{regex}"`' for key, regex in spec.workaround.items())
        notes.append(f"known failure: {spec.known_failure[1]}; passes with {fix}")
    return [f"- {spec.title}: {note}." for note in notes]


def table(outcomes: dict[str, str]) -> str:
    rows = ["| model | class | adapted layers | trainable PSOFT r=4 | trainable OFT b=4 | tests | LoRA reload |",
            "|---|---|---:|---:|---:|---|---|"]
    for key, spec in DENOISERS.items():
        layers, psoft = trainable(spec, pv.PSOFTConfig(**PSOFT))
        _, oft = trainable(spec, pv.OFTConfig(**OFT))
        rows.append(f"| {spec.title} | `{spec.cls.__name__}` | {layers} | {psoft:,} | {oft:,} | {outcomes[key]} | "
                    f"{loader_label(spec)} |")
    notes = [line for spec in DENOISERS.values() for line in _notes(spec)]
    return "\n".join([
        f"`targets=\"auto\"` on tiny configs of every covered diffusers denoiser (diffusers {diffusers.__version__}; "
        "generated by `python -m tests.denoisers --doc docs/models.md` from a run of tests/test_denoisers.py). "
        "Each passing row means: auto adapts exactly the attention, feed-forward and block-level projections of "
        "every block and no embedder or modulation linear; PSOFT and OFT are the identity at init, merge exactly, "
        "save and load exactly, and their exported LoRA (OFT with `full_deltas=True`) reloads through the loader "
        "shown and reproduces the adapted model. Layer and parameter counts are those of the tiny configs.",
        "", *rows, "", *notes])


def write_doc(path: Path, text: str) -> None:
    """Replace the text between the diffusers markers of ``path`` (made, with both marker pairs, if missing)."""
    start, end = "<!-- diffusers:start -->", "<!-- diffusers:end -->"
    if not path.exists():
        path.write_text("# Supported models\n\nWhere `targets=\"auto\"` puts adapters, model by model.\n\n"
                        "## timm\n\n<!-- timm-zoo:start -->\n<!-- timm-zoo:end -->\n\n"
                        f"## diffusers\n\n{start}\n{end}\n")
    doc = path.read_text()
    if doc.count(start) != 1 or doc.count(end) != 1:
        raise SystemExit(f"{path} must hold {start} and {end} once each.")
    head, rest = doc.split(start)
    path.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def classified(spec: Denoiser) -> list[str]:
    """Every Linear and Conv2d of the spec's model, ``+`` where ``targets="auto"`` adapts it and ``-`` where not."""
    model = spec.make()
    chosen = set(select(model, "auto"))
    return [f"{'+' if name in chosen else '-'} {name}  {module}" for name, module in model.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, help="the markdown file whose diffusers table to rewrite")
    parser.add_argument("--list", choices=list(DENOISERS), help="classify every Linear / Conv2d of this model")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(classified(DENOISERS[args.list])))
    if args.doc:
        write_doc(args.doc, table(outcomes_of_tests()))
    if not (args.list or args.doc):
        parser.error("give --doc, --list or both")


if __name__ == "__main__":
    main()
