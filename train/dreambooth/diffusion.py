"""The denoising objective of DreamBooth and the pipeline it trains: loading and precision, latents, noise, targets,
loss weighting and the prior-preservation batch. What differs per pipeline family is in families.py."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from psoft_vision import hub

from .errors import DreamBoothError
from .families import family_of

#: diffusers' flow-matching sampling of ``s`` (``compute_density_for_timestep_sampling``) and loss weighting
#: (``compute_loss_weighting_for_sd3``): "none" samples uniformly and weighs every step alike.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def _repeat(condition: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Batch-1 tensors expanded to ``count``; tensors already ``count`` long (per-image conditioning) kept."""
    return {k: v if len(v) == count else v.expand(count, *v.shape[1:]) for k, v in condition.items()}


def prior_batch(instance: torch.Tensor, instance_condition: dict[str, torch.Tensor], class_: torch.Tensor | None,
                class_condition: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch: the instance latents first, then (with prior preservation) as many class latents, each with its
    prompt's conditioning (batch 1, repeated) and its images' own (already one per image). :func:`dreambooth_loss`
    splits the prediction at the same place."""
    condition = _repeat(instance_condition, len(instance))
    if class_ is None:
        return instance, condition
    classes = _repeat(class_condition, len(class_))
    return torch.cat([instance, class_]), {k: torch.cat([v, classes[k]]) for k, v in condition.items()}


def _mse(prediction: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None) -> torch.Tensor:
    """Plain mean squared error, or diffusers' weighted form: per-sample means of ``w (pred - target)^2``, averaged."""
    if weighting is None:
        return F.mse_loss(prediction, target)
    return (weighting.float() * (prediction - target) ** 2).reshape(len(target), -1).mean(1).mean()


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, with_prior: bool, prior_loss_weight: float,
                    weighting: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float | None]:
    """``(loss, instance loss, prior loss)``: the mean squared error of the instance half, plus
    ``prior_loss_weight`` times that of the class half when the batch carries one (see :func:`prior_batch`);
    ``weighting`` (one per sample, flow matching) weighs each sample's error as diffusers' SD3 and Flux trainers do."""
    prediction, target = prediction.float(), target.float()
    if not with_prior:
        loss = _mse(prediction, target, weighting)
        return loss, loss.item(), None
    instance_pred, class_pred = prediction.chunk(2)
    instance_target, class_target = target.chunk(2)
    instance_w, class_w = weighting.chunk(2) if weighting is not None else (None, None)
    instance_loss = _mse(instance_pred, instance_target, instance_w)
    prior_loss = _mse(class_pred, class_target, class_w)
    return instance_loss + prior_loss_weight * prior_loss, instance_loss.item(), prior_loss.item()


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the denoiser learns to predict: the noise (``epsilon``), ``sqrt(a_t) noise - sqrt(1 - a_t) x_0``
    (``v_prediction``) or the flow ``noise - x_0`` (``flow``, flow-matching schedulers)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "flow":
        return noise - latents
    raise DreamBoothError(f"prediction_type {prediction_type!r} is not supported; use epsilon or v_prediction.")


def is_flow_matching(scheduler) -> bool:
    config = scheduler.config
    return "FlowMatch" in type(scheduler).__name__ or config.get("prediction_type") == "flow_prediction"


# ------------------------------------------------------------------------------------------------ noise
def noise_objective(pipe, family, prediction_type: str | None) -> tuple[object, str]:
    """The training noise scheduler, a fresh copy (generating images moves a scheduler's sigmas), and what the
    denoiser learns to predict: ``epsilon`` or ``v_prediction`` (the config's, or ``prediction_type``) or ``flow``.

    A flow family trains with a FlowMatchEulerDiscreteScheduler built from the pipeline's scheduler config; Sana's
    DPM-Solver config names its shift ``flow_shift``, which becomes the shift."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = pipe.scheduler.config
    if family.objective == "flow":
        if prediction_type:
            raise DreamBoothError(f"--prediction_type {prediction_type} does not apply to {family.name}, which trains "
                                  "with flow matching; leave it out.")
        shift = {"shift": config["flow_shift"]} if "flow_shift" in config and "shift" not in config else {}
        return FlowMatchEulerDiscreteScheduler.from_config(config, **shift), "flow"
    if is_flow_matching(pipe.scheduler):
        raise DreamBoothError(f"{type(pipe).__name__} comes with the flow-matching {type(pipe.scheduler).__name__}, "
                              f"but {family.name} trains epsilon or v-prediction; save the pipeline with its "
                              "DDPM-style scheduler.")
    scheduler = DDPMScheduler.from_config(config)
    return scheduler, prediction_type or scheduler.config.prediction_type


def flow_sigmas(scheduler, u: torch.Tensor, tokens: int) -> torch.Tensor:
    """``s`` for draws ``u`` in [0, 1): the training scheduler's sigma at index ``u * N`` (its static shift included,
    as diffusers' SD3 and Flux trainers pick them), shifted further by the image's token count where the scheduler
    shifts dynamically (Flux: ``mu`` from the resolution, as FluxPipeline does at inference)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    n = scheduler.config.num_train_timesteps
    sigmas = scheduler.sigmas[(u * n).long().clamp(0, n - 1)]
    if scheduler.config.get("use_dynamic_shifting"):
        c = scheduler.config
        mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sigmas = scheduler.time_shift(mu, 1.0, sigmas)
    return sigmas.float()


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, gen: torch.Generator, flow=None):
    """``(noisy latents, timesteps, sigmas or None)``.

    DDPM: ``add_noise`` at uniform integer timesteps. Flow matching (``flow``: the settings of
    :func:`flow_settings`): ``(1 - s) x_0 + s noise`` with ``s`` from :func:`flow_sigmas`, timestep ``1000 s``.
    """
    n = len(latents)
    if flow is None:
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (n,), generator=gen).to(latents.device)
        return scheduler.add_noise(latents, noise, timesteps), timesteps, None
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(flow["weighting_scheme"], n, flow["logit_mean"], flow["logit_std"],
                                              flow["mode_scale"], generator=gen)
    sigmas = flow_sigmas(scheduler, u, flow["tokens"]).to(latents.device)
    sigma = sigmas.view(-1, *([1] * (latents.dim() - 1)))
    return (1 - sigma) * latents + sigma * noise, sigmas * scheduler.config.num_train_timesteps, sigma


def flow_settings(args, tokens: int) -> dict:
    return dict(weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
                mode_scale=args.mode_scale, tokens=tokens)


def loss_weighting(scheme: str, sigma: torch.Tensor | None) -> torch.Tensor | None:
    """diffusers' SD3 loss weighting for flow matching (ones unless ``sigma_sqrt`` or ``cosmap``); None for DDPM."""
    if sigma is None:
        return None
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigma)


# ------------------------------------------------------------------------------------------------ loading
def _model_index(name: str | Path, revision: str | None, cache_dir: str | None) -> dict:
    """The pipeline's model_index.json, from the folder or the hub repository (a named error where there is none)."""
    flag = "--pretrained_model_name_or_path"
    if hub.is_hub_id(name):
        return json.loads(hub.hub_file(str(name), "model_index.json", revision, cache_dir).read_text())
    index_file = Path(name) / "model_index.json"
    if not Path(name).exists():
        raise DreamBoothError(f"{flag} {str(name)!r} is neither a folder nor a hub id (org/name); pass a folder "
                              "written by a diffusers pipeline's save_pretrained, or a hub repository id.")
    if not index_file.is_file():
        raise DreamBoothError(f"{flag} {str(name)!r} has no model_index.json; pass a folder written by a diffusers "
                              "pipeline's save_pretrained.")
    return json.loads(index_file.read_text())


def load_pipeline(name: str | Path, device, revision: str | None = None, variant: str | None = None,
                  cache_dir: str | None = None):
    """A pipeline of a known family (families.py), fp32, frozen, on ``device``: from a local folder or a hub id
    (through diffusers' from_pretrained and huggingface_hub's cache; failures are named psoft_vision HubErrors)."""
    import diffusers

    # components saved as None (an SD3 pipeline without T5, say) must be passed as None again
    absent = {k: None for k, v in _model_index(name, revision, cache_dir).items() if v == [None, None]}
    with hub.hub_errors(str(name), revision, cache_dir=cache_dir):
        pipe = diffusers.DiffusionPipeline.from_pretrained(name, dtype=torch.float32, revision=revision,
                                                           variant=variant, cache_dir=cache_dir, **absent)
    family_of(pipe)  # a named error for a pipeline of no known family
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return pipe


def vae_dtype(vae, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype under mixed precision: fp32 where its config says it overflows in fp16 (``force_upcast``,
    SDXL's VAE), as diffusers' SDXL trainer and pipeline keep it; else the frozen weights' dtype."""
    if weight_dtype == torch.float16 and vae.config.get("force_upcast", False):
        return torch.float32
    return weight_dtype


def cast_frozen(pipe, weight_dtype: torch.dtype) -> dict[str, str]:
    """Under mixed precision, the frozen weights in half precision (diffusers' trainers do the same): the VAE by
    :func:`vae_dtype`, the text encoders and the denoiser in ``weight_dtype``, trained or not. Adapters are injected
    afterwards and keep fp32 parameters (their subspace comes from the half-precision weights the model then runs
    with). Returns each component's dtype, for metrics.json."""
    dtypes = {}
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        dtype = vae_dtype(module, weight_dtype) if name == "vae" else weight_dtype
        module.to(dtype=dtype)
        dtypes[name] = str(dtype).removeprefix("torch.")
    return dtypes


# ------------------------------------------------------------------------------------------------ latents
@dataclass
class ImageSet:
    """Training images of one prompt: the VAE posterior of each (cached), or the pixels to encode at every step
    (``--no-cache_latents``), and what each image conditions on besides the prompt (SDXL's time ids)."""

    mean: torch.Tensor | None
    std: torch.Tensor | None
    pixels: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.mean if self.pixels is None else self.pixels)


def encode_images(vae, images: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior, shifted and scaled, in fp32; flipped copies appended when ``flip``. A
    deterministic autoencoder (Sana's DC-AE) has std 0."""
    if flip:
        images = torch.cat([images, images.flip(-1)])
    with torch.no_grad():
        out = vae.encode(images.to(vae.device, vae.dtype))
    dist = getattr(out, "latent_dist", None)
    mean = (dist.mean if dist is not None else out.latent).float()
    std = dist.std.float() if dist is not None else torch.zeros_like(mean)
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
    return (mean - shift) * scale, std * scale


def image_set(vae, images: torch.Tensor, flip: bool, cache: bool, extra: dict[str, torch.Tensor]) -> ImageSet:
    if flip:
        extra = {k: torch.cat([v, v]) for k, v in extra.items()}
    if cache:
        return ImageSet(*encode_images(vae, images, flip), extra=extra)
    return ImageSet(None, None, torch.cat([images, images.flip(-1)]) if flip else images, extra)


def draw(images: ImageSet, count: int, gen: torch.Generator, vae=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents, index)``: ``count`` posterior samples of randomly chosen images (encoded now when the set keeps
    pixels: the same draws give the same latents either way, up to rounding)."""
    index = torch.randint(len(images), (count,), generator=gen)
    mean, std = images.mean, images.std
    if images.pixels is not None:
        mean, std = encode_images(vae, images.pixels[index], flip=False)
        index_on = torch.arange(count)
    else:
        index_on = index
    eps = torch.randn((count, *mean.shape[1:]), generator=gen)
    return mean[index_on.to(mean.device)] + std[index_on.to(mean.device)] * eps.to(mean.device), index


def per_image(images: ImageSet, index: torch.Tensor, device) -> dict[str, torch.Tensor]:
    return {k: v[index].to(device) for k, v in images.extra.items()}


def latent_size_check(family, resolution: int, scale: int) -> None:
    """Flux packs 2x2 latents: the latent side must be even."""
    side = resolution / scale
    if side != int(side) or (family.name == "flux" and int(side) % 2):
        need = scale * (2 if family.name == "flux" else 1)
        raise DreamBoothError(f"--resolution {resolution} gives {side:g} latents a side; {family.name} needs a "
                              f"multiple of {need} (e.g. {need * max(1, math.ceil(resolution / need))}).")
