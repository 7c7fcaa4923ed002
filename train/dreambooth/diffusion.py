"""The denoising objective of DreamBooth and the pipeline it trains: loading, prompt conditioning, latents, noise,
targets and the prior-preservation batch."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import DreamBoothError


def _repeat(condition: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    return {k: v.expand(count, *v.shape[1:]) for k, v in condition.items()}


def prior_batch(instance: torch.Tensor, instance_condition: dict[str, torch.Tensor], class_: torch.Tensor | None,
                class_condition: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch: the instance latents first, then (with prior preservation) as many class latents, each with its
    prompt's conditioning (see :func:`encode_prompt`). :func:`dreambooth_loss` splits the prediction at the same
    place."""
    condition = _repeat(instance_condition, len(instance))
    if class_ is None:
        return instance, condition
    classes = _repeat(class_condition, len(class_))
    return torch.cat([instance, class_]), {k: torch.cat([v, classes[k]]) for k, v in condition.items()}


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, with_prior: bool, prior_loss_weight: float
                    ) -> tuple[torch.Tensor, float, float | None]:
    """``(loss, instance loss, prior loss)``: the mean squared error of the instance half, plus
    ``prior_loss_weight`` times that of the class half when the batch carries one (see :func:`prior_batch`)."""
    prediction, target = prediction.float(), target.float()
    if not with_prior:
        loss = F.mse_loss(prediction, target)
        return loss, loss.item(), None
    instance_pred, class_pred = prediction.chunk(2)
    instance_target, class_target = target.chunk(2)
    instance_loss = F.mse_loss(instance_pred, instance_target)
    prior_loss = F.mse_loss(class_pred, class_target)
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
    return "FlowMatch" in type(scheduler).__name__


def noisy_latents(scheduler, latents: torch.Tensor, noise: torch.Tensor, gen: torch.Generator):
    """``(noisy latents, timesteps)``: DDPM's ``add_noise`` at uniform integer timesteps, or for flow matching
    ``(1 - s) x_0 + s noise`` at a uniform ``u`` mapped through the scheduler's shift, timestep ``1000 s``."""
    n, steps = len(latents), scheduler.config.num_train_timesteps
    if not is_flow_matching(scheduler):
        timesteps = torch.randint(steps, (n,), generator=gen).to(latents.device)
        return scheduler.add_noise(latents, noise, timesteps), timesteps
    u, shift = torch.rand(n, generator=gen).to(latents.device), scheduler.config.shift
    sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1)
    return (1 - sigma) * latents + sigma * noise, sigma.flatten() * steps


def encode_prompt(pipe, prompt: str, device) -> dict[str, torch.Tensor]:
    """The denoiser's text conditioning for ``prompt`` as keyword arguments (batch of one)."""
    if getattr(pipe, "unet", None) is not None:
        return {"encoder_hidden_states": pipe.encode_prompt(prompt, device, 1, False)[0]}
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


# ------------------------------------------------------------------------------------------------- building
def load_pipeline(path: Path, device):
    import diffusers

    if path.exists() and not (path / "model_index.json").is_file():
        raise DreamBoothError(f"--pretrained_model_name_or_path {str(path)!r} has no model_index.json; pass a folder "
                              "written by a diffusers pipeline's save_pretrained.")
    if not path.exists():
        raise DreamBoothError(f"--pretrained_model_name_or_path {str(path)!r} does not exist; this trainer works "
                              "offline: download the pipeline to a folder first and pass that folder.")
    # components saved as None (an SD3 pipeline without T5, say) must be passed as None again
    index = json.loads((path / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if v == [None, None]}
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, dtype=torch.float32, **absent)
    sd3_like = getattr(pipe, "transformer", None) is not None and hasattr(pipe, "text_encoder_2") \
        and is_flow_matching(pipe.scheduler)
    if getattr(pipe, "unet", None) is None and not sd3_like:
        raise DreamBoothError(f"{type(pipe).__name__} is neither a UNet pipeline (Stable Diffusion style) nor an "
                              "SD3-style transformer pipeline with a flow-matching scheduler; no other is supported.")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return pipe



def encode_images(vae, images: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior, shifted and scaled; flipped copies appended when ``flip``."""
    if flip:
        images = torch.cat([images, images.flip(-1)])
    with torch.no_grad():
        posterior = vae.encode(images.to(vae.device)).latent_dist
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
    return (posterior.mean - shift) * scale, posterior.std * scale


def draw(latents: tuple[torch.Tensor, torch.Tensor], count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` posterior samples of randomly chosen images."""
    mean, std = latents
    index = torch.randint(len(mean), (count,), generator=gen)
    eps = torch.randn((count, *mean.shape[1:]), generator=gen)
    return mean[index.to(mean.device)] + std[index.to(mean.device)] * eps.to(mean.device)


