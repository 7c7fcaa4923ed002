"""The pipeline families the DreamBooth trainer knows, as a few small functions each around the one training loop.

What differs between Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, Flux and Sana is small, and lives here:

- ``encode``: a prompt -> the denoiser's text conditioning as a flat dict of batch-1 tensors, computed by the
  pipeline's own ``encode_prompt`` (so training conditions the denoiser exactly as generation does);
- ``image_condition``: what the family conditions on per training image besides the prompt (SDXL's ``time_ids``:
  original size, crop top-left, target size);
- ``predict``: the denoiser's call on noisy latents (B, C, H, W) -> a prediction of the same shape (Flux packs 2x2
  latents into tokens with their image ids and a guidance value, and its transformer takes ``t / 1000``);
- ``objective``: ``"ddpm"`` (epsilon or v-prediction, from the scheduler's config) or ``"flow"`` (rectified flow:
  ``x_s = (1 - s) x_0 + s noise``, target ``noise - x_0``; train/dreambooth/diffusion.py samples ``s``);
- ``tokens``: the number of image tokens of a latent, for Flux's resolution-dependent shift of ``s``;
- ``text_encoders``: what ``--train_text_encoder`` adapts: the text encoders the pipeline's own
  ``load_lora_weights`` reads back (diffusers' rule: SD3's two CLIPs but not its T5, Flux's CLIP but not its T5);
- ``kohya``: whether ``export_lora(format="kohya")`` writes the family (SD 1.x/2.x, SDXL, Flux; see
  psoft_vision/formats/kohya_lora.py for why not SD3 or Sana).
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import DreamBoothError

Condition = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    pipelines: tuple[str, ...]  # diffusers pipeline class names
    encode: Callable  # (pipe, prompt, args, device) -> Condition
    predict: Callable  # (model, config, args, noisy, timesteps, condition) -> prediction like noisy
    objective: str  # "ddpm" or "flow"
    text_encoders: tuple[str, ...]
    kohya: bool
    image_condition: Callable | None = None  # (sizes, resolution) -> {name: (N, ...)}: per-image conditioning
    tokens: Callable = lambda shape: shape[-2] * shape[-1]  # image tokens of a latent shape, for a dynamic shift
    sequence_length: bool = False  # the pipeline takes max_sequence_length (a T5 or Gemma text encoder)
    generate: tuple[tuple[str, object], ...] = ()  # fixed arguments of the pipeline's __call__ for our images

    def call_kwargs(self, args) -> dict:
        """Extra keyword arguments of the pipeline's ``__call__`` for class and validation images: the prompt length
        training encodes with, and the family's fixed ones."""
        kwargs = dict(self.generate)
        if self.sequence_length and args.max_sequence_length:
            kwargs["max_sequence_length"] = args.max_sequence_length
        return kwargs


def _length(args) -> dict:
    return {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}


# ------------------------------------------------------------------------------------------------- encoding
def encode_sd(pipe, prompt: str, args, device) -> Condition:
    return {"encoder_hidden_states": pipe.encode_prompt(prompt, device, 1, False)[0]}


def encode_sdxl(pipe, prompt: str, args, device) -> Condition:
    """Both CLIPs' penultimate hidden states side by side, and the second one's pooled projection."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled}


def encode_sd3(pipe, prompt: str, args, device) -> Condition:
    """CLIP-L and CLIP-G (and T5 where the pipeline has it) joined, and the two CLIPs' pooled projections."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False, **_length(args))
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def encode_flux(pipe, prompt: str, args, device) -> Condition:
    """T5's hidden states and CLIP's pooled output (Flux's text ids are all zero: :func:`predict_flux` makes them)."""
    embeds, pooled, _ = pipe.encode_prompt(prompt, None, device=device, num_images_per_prompt=1, **_length(args))
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def sana_instruction(pipe) -> list[str] | None:
    """The instruction SanaPipeline puts before every prompt by default (its ``complex_human_instruction``): training
    encodes prompts the way generation does."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
    return None if parameter is None else parameter.default


def encode_sana(pipe, prompt: str, args, device) -> Condition:
    embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                            complex_human_instruction=sana_instruction(pipe), **_length(args))
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


# ------------------------------------------------------------------------------------------------- predicting
def predict_unet(model, config, args, noisy, timesteps, c: Condition) -> torch.Tensor:
    """SD's UNet; SDXL's also takes the pooled text embedding and the time ids as added conditioning."""
    added = {k: c[k] for k in ("text_embeds", "time_ids") if k in c}
    return model(sample=noisy, timestep=timesteps, encoder_hidden_states=c["encoder_hidden_states"],
                 **({"added_cond_kwargs": added} if added else {})).sample


def predict_sd3(model, config, args, noisy, timesteps, c: Condition) -> torch.Tensor:
    return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=c["encoder_hidden_states"],
                 pooled_projections=c["pooled_projections"]).sample


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): Flux's 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``shape``."""
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h * w, 3): each packed token's (0, row, column), as FluxPipeline._prepare_latent_image_ids makes them."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def predict_flux(model, config, args, noisy, timesteps, c: Condition) -> torch.Tensor:
    """Packed latents with their image ids, zero text ids, ``t / 1000`` and the guidance embedding's value
    (``--guidance_scale``, as diffusers' Flux trainer) where the transformer has one."""
    b, _, h, w = noisy.shape
    text = c["encoder_hidden_states"]
    guidance = torch.full((b,), float(args.guidance_scale), device=noisy.device) if config.guidance_embeds else None
    out = model(hidden_states=pack(noisy), timestep=timesteps / 1000, guidance=guidance,
                pooled_projections=c["pooled_projections"], encoder_hidden_states=text,
                txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=text.dtype),
                img_ids=latent_image_ids(h // 2, w // 2, noisy.device, noisy.dtype)).sample
    return unpack(out, noisy.shape)


def predict_sana(model, config, args, noisy, timesteps, c: Condition) -> torch.Tensor:
    """Sana's transformer with the text mask, ``t`` times its ``timestep_scale``; a learned-sigma half is dropped."""
    out = model(hidden_states=noisy, encoder_hidden_states=c["encoder_hidden_states"],
                encoder_attention_mask=c["encoder_attention_mask"],
                timestep=timesteps * getattr(config, "timestep_scale", 1.0)).sample
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * noisy.shape[1] else out


# ------------------------------------------------------------------------------------------------- SDXL
def sdxl_time_ids(sizes: list[tuple[int, int, int, int]], resolution: int) -> dict[str, torch.Tensor]:
    """``time_ids`` per image: its original (height, width), the top-left of its crop in the resized image, and the
    target size, as SDXL was trained (and as diffusers' SDXL trainer computes them)."""
    rows = [(h, w, top, left, resolution, resolution) for h, w, top, left in sizes]
    return {"time_ids": torch.tensor(rows, dtype=torch.float32)}


FAMILIES = {f.name: f for f in (
    Family("sd", "Stable Diffusion 1.x / 2.x: one CLIP, a UNet, epsilon or v-prediction",
           ("StableDiffusionPipeline",), encode_sd, predict_unet, "ddpm", ("text_encoder",), kohya=True),
    Family("sdxl", "SDXL: two CLIPs (penultimate states joined, pooled projection), time ids, a UNet",
           ("StableDiffusionXLPipeline",), encode_sdxl, predict_unet, "ddpm", ("text_encoder", "text_encoder_2"),
           kohya=True, image_condition=sdxl_time_ids),
    Family("sd3", "SD3 / SD3.5: two CLIPs and T5, an MMDiT, flow matching with a static shift",
           ("StableDiffusion3Pipeline",), encode_sd3, predict_sd3, "flow", ("text_encoder", "text_encoder_2"),
           kohya=False, sequence_length=True),
    Family("flux", "Flux.1: T5 and CLIP pooled, packed 2x2 latents, guidance embedding, flow matching with a "
           "resolution-dependent shift", ("FluxPipeline",), encode_flux, predict_flux, "flow", ("text_encoder",),
           kohya=True, tokens=lambda shape: (shape[-2] // 2) * (shape[-1] // 2), sequence_length=True),
    Family("sana", "Sana: Gemma 2 with Sana's instruction, a linear-attention DiT on DC-AE latents, flow matching",
           ("SanaPipeline",), encode_sana, predict_sana, "flow", (), kohya=False, sequence_length=True,
           generate=(("use_resolution_binning", False),)),  # images at --resolution, as training sees them
)}


def family_of(pipe) -> Family:
    """The family of a loaded pipeline, by its class; a named error listing the supported ones otherwise."""
    name = type(pipe).__name__
    for family in FAMILIES.values():
        if name in family.pipelines:
            return family
    supported = ", ".join(p for f in FAMILIES.values() for p in f.pipelines)
    raise DreamBoothError(f"{name} is not a pipeline this trainer knows; it trains {supported}. Pass a folder saved "
                          "by one of them.")
