"""Offline proxies for DreamBooth's subject fidelity and prompt fidelity, honestly named.

No metric here is DINO, CLIP-I or CLIP-T unless real weights are given; by default images are embedded by the
project's own ViT (``vit_pico_patch8_32.fmnist``, pretrained on Fashion-MNIST, 32x32 input), whose features know
garments, not espresso cups, so the numbers are proxies for comparing runs on the same subject, not scores to quote.

* ``subject_sim``: mean cosine similarity between the embeddings of samples of the instance prompt and of the subject's
  held-out views (DreamBooth's DINO score, with whatever embedder is plugged in);
* ``colour_dist``: total-variation distance between the colour histograms (8 bins per channel) of the instance
  prompt's samples and of the held-out views, in [0, 1]: a cruder, embedder-free subject proxy;
* ``heldout_loss``: the denoising (noise-prediction) MSE on the held-out views with the instance prompt, averaged
  over fixed noise draws and timesteps: lower means the model explains unseen views of the subject better;
* ``class_acc``: the share of samples of the class prompt that the ViT's Fashion-MNIST head calls that class
  (prior preservation: "a photo of a bag" should still give bags);
* ``class_drift``: ``||eps' - eps||^2 / ||eps||^2`` of the class prompt's noise predictions against the base model
  on fixed noisy class latents (language drift; 0 for the base model);
* ``diversity``: mean pairwise cosine distance between embeddings of the instance prompt's samples across seeds.

Plug real embedders with ``--embedder dino:/path/to/dino_vits16.safetensors`` (timm ``vit_small_patch16_224.dino``
with local weights) or ``--embedder clip:/path/to/clip-folder`` (a transformers ``CLIPModel`` folder); nothing is
downloaded.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common.paths import TINY_T2I
from ..offline import backbone
from ..offline.data import fashion_mnist
from ..offline.pretrain_t2i import CLASSES
from .diffusion import encode_images, load_pipeline, training_target
from .images import generate, list_images, load_images
from .subject import DEFAULT_CLASS_PROMPT, DEFAULT_INSTANCE_PROMPT, SUBJECT_DIR


# ------------------------------------------------------------------------------------------------ embedders
class ViTEmbedder:
    """The project's Fashion-MNIST ViT: pre-logits features, centred on the mean feature of 500 Fashion-MNIST test
    images (raw features of any two images have a cosine near 0.8), and its 10-class head for
    :func:`class_accuracy`."""

    name = "vit_pico_patch8_32.fmnist (project ViT, centred pre-logits; a proxy, not DINO)"

    def __init__(self):
        import timm

        self.model = timm.create_model(backbone.BACKBONE, pretrained=True).eval()
        garments = torch.from_numpy(np.array(fashion_mnist("test")[0][:500])).float().div(255)
        garments = F.pad(garments, (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1)
        self.center = 0
        self.center = self(garments).mean(0)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.model.forward_features((x - 0.5) / 0.5)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self._features(images), pre_logits=True) - self.center

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self._features(images)).argmax(-1)


class TimmEmbedder:
    """Any timm model with local weights (e.g. DINO ``vit_small_patch16_224.dino``): pre-logits features."""

    def __init__(self, weights: str, model_name: str = "vit_small_patch16_224.dino"):
        import timm

        if not Path(weights).is_file():
            raise FileNotFoundError(f"embedder weights {weights!r} do not exist; give a local .safetensors/.pth")
        self.model = timm.create_model(model_name, pretrained=True, num_classes=0,
                                       pretrained_cfg_overlay=dict(file=str(weights))).eval()
        config = timm.data.resolve_data_config({}, model=self.model)
        self.size, self.mean, self.std = config["input_size"][1:], config["mean"], config["std"]
        self.name = f"{model_name} ({weights})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=self.size, mode="bicubic", align_corners=False)
        x = (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]
        return self.model(x)


class CLIPEmbedder:
    """A local transformers ``CLIPModel`` folder: image embeddings (CLIP-I)."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, folder: str):
        from transformers import CLIPModel

        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        self.size = self.model.config.vision_config.image_size
        self.name = f"CLIP ({folder})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - torch.tensor(self.MEAN)[:, None, None]) / torch.tensor(self.STD)[:, None, None]
        return self.model.get_image_features(pixel_values=x)


def make_embedder(spec: str = "vit"):
    """``vit`` (default), ``dino:WEIGHTS[:TIMM_NAME]`` or ``clip:FOLDER``."""
    kind, _, rest = spec.partition(":")
    if kind == "vit":
        return ViTEmbedder()
    if kind == "dino" and rest:
        weights, _, name = rest.partition(":")
        return TimmEmbedder(weights, name or "vit_small_patch16_224.dino")
    if kind == "clip" and rest:
        return CLIPEmbedder(rest)
    raise ValueError(f"--embedder {spec!r}: use vit, dino:WEIGHTS[:TIMM_NAME] or clip:FOLDER")


# ---------------------------------------------------------------------------------------------------- metrics
def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float().flatten(1), dim=-1)


def subject_similarity(embedder, samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity over all (sample, reference) pairs."""
    return (_unit(embedder(samples)) @ _unit(embedder(references)).T).mean().item()


def colour_distance(samples: torch.Tensor, references: torch.Tensor, bins: int = 8) -> float:
    """Total-variation distance between the pooled per-channel colour histograms, averaged over channels."""
    def histogram(images):
        return torch.stack([torch.histc(images[:, c].clamp(0, 1), bins, 0, 1) for c in range(3)]) / images[:, 0].numel()

    return 0.5 * (histogram(samples) - histogram(references)).abs().sum(-1).mean().item()


def diversity(embedder, samples: torch.Tensor) -> float:
    """Mean pairwise cosine distance between samples (off-diagonal pairs)."""
    e = _unit(embedder(samples))
    n = len(e)
    similarity = (e @ e.T).sum() - n
    return 1 - (similarity / (n * (n - 1))).item()


def class_accuracy(vit: ViTEmbedder, samples: torch.Tensor, label: int) -> float:
    return (vit.classify(samples) == label).float().mean().item()


def noisy_inputs(latents: torch.Tensor, draws: int, seed: int, num_train_timesteps: int):
    """Fixed ``(x0, noise, timesteps)``: every image repeated ``draws`` times, evenly spaced timesteps."""
    gen = torch.Generator().manual_seed(seed)
    x0 = latents.repeat(draws, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=gen)
    timesteps = torch.linspace(50, num_train_timesteps - 50, len(x0)).round().long()
    return x0, noise, timesteps


@torch.no_grad()
def noise_predictions(pipe, latents: torch.Tensor, prompt: str, draws: int = 8, seed: int = 0):
    """``(prediction, target)`` of the pipeline's UNet on fixed noisy versions of ``latents`` under ``prompt``."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    x0, noise, timesteps = noisy_inputs(latents, draws, seed, scheduler.config.num_train_timesteps)
    embedding = pipe.encode_prompt(prompt, pipe.device, 1, False)[0].expand(len(x0), -1, -1)
    prediction = pipe.unet(scheduler.add_noise(x0, noise, timesteps), timesteps, embedding).sample
    return prediction, training_target(scheduler, x0, noise, timesteps, scheduler.config.prediction_type)


def heldout_loss(pipe, heldout: torch.Tensor, prompt: str) -> float:
    """The noise-prediction MSE of the pipeline's UNet on the held-out views (images in [-1, 1]) under ``prompt``,
    on fixed noise and timesteps."""
    prediction, target = noise_predictions(pipe, encode_images(pipe.vae, heldout, flip=False)[0], prompt)
    return F.mse_loss(prediction, target).item()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2)


def load_adapted(pipeline_dir: Path, run_dir: Path | None):
    """The pipeline, with the run's adapter: ours from adapter.safetensors, PEFT LoRA from lora/."""
    pipe = load_pipeline(Path(pipeline_dir), torch.device("cpu"))
    if run_dir is None:
        return pipe
    run_dir = Path(run_dir)
    if (run_dir / "adapter.safetensors").is_file():
        from psoft_vision.formats.native import load_adapter_into_pipeline

        load_adapter_into_pipeline(pipe, run_dir / "adapter.safetensors")
    else:
        from psoft_vision.formats.names import DIFFUSERS_WEIGHT_NAME

        pipe.load_lora_weights(run_dir / "lora", weight_name=DIFFUSERS_WEIGHT_NAME)
    return pipe


def evaluate(run_dir: Path | None, args, embedder, vit: ViTEmbedder, base: dict | None = None) -> dict:
    """Every metric for one run (``run_dir=None``: the base model); ``base`` is the base model's result, whose
    class-prompt predictions the drift is measured against. Also returns the samples, for grids."""
    pipe = load_adapted(args.pretrained_model_name_or_path, run_dir)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    args.resolution = resolution
    seeds = list(range(1000, 1000 + args.num_samples))
    instance = to_tensor(generate(pipe, args.instance_prompt, seeds, args))
    class_ = to_tensor(generate(pipe, args.class_prompt, seeds, args))
    heldout = load_images(list_images(args.heldout_dir, "--heldout_dir"), resolution)
    class_latents = encode_images(pipe.vae, class_ * 2 - 1 if base is None else base["class_samples"] * 2 - 1,
                                  flip=False)[0]
    class_prediction = noise_predictions(pipe, class_latents, args.class_prompt)[0]
    references = (heldout + 1) / 2
    label = CLASSES.index(args.class_word)
    result = dict(
        subject_sim=subject_similarity(embedder, instance, references),
        colour_dist=colour_distance(instance, references),
        heldout_loss=heldout_loss(pipe, heldout, args.instance_prompt),
        class_acc=class_accuracy(vit, class_, label),
        instance_class_acc=class_accuracy(vit, instance, label),
        diversity=diversity(embedder, instance),
        class_drift=0.0 if base is None else
        ((class_prediction - base["class_prediction"]).pow(2).sum() / base["class_prediction"].pow(2).sum()).item(),
    )
    return dict(result, instance_samples=instance, class_samples=class_, class_prediction=class_prediction)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.dreambooth.metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="DreamBooth output folders (none: the base model only)")
    p.add_argument("--pretrained_model_name_or_path", type=Path, default=TINY_T2I)
    p.add_argument("--heldout_dir", type=Path, default=SUBJECT_DIR / "heldout")
    p.add_argument("--instance_prompt", default=DEFAULT_INSTANCE_PROMPT)
    p.add_argument("--class_prompt", default=DEFAULT_CLASS_PROMPT)
    p.add_argument("--class_word", default="bag", help="the Fashion-MNIST class the class prompt names")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--embedder", default="vit", help="vit, dino:WEIGHTS[:TIMM_NAME] or clip:FOLDER")
    return p


NUMBERS = ("subject_sim", "colour_dist", "heldout_loss", "class_acc", "instance_class_acc", "class_drift", "diversity")


def evaluate_runs(runs: list[Path], args) -> dict[str, dict]:
    """``{"base": ..., str(run): ...}``: the base model's metrics first, then each run's."""
    vit = ViTEmbedder()
    embedder = vit if args.embedder == "vit" else make_embedder(args.embedder)
    torch.manual_seed(0)
    base = evaluate(None, args, embedder, vit)
    results = {"base": base}
    for run in runs:
        results[str(run)] = evaluate(run, args, embedder, vit, base)
    return results


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    results = evaluate_runs(args.runs, args)
    table = {name: {k: round(r[k], 4) for k in NUMBERS} for name, r in results.items()}
    print(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
