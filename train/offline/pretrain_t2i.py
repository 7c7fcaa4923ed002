"""Pretrain the offline text-to-image pipeline ``assets/tiny-t2i`` (a tiny Stable Diffusion) on Fashion-MNIST.

    apt-get install dataset-fashion-mnist
    python -m train.offline.pretrain_t2i --vae-steps 1500 --unet-steps 6000 --seed 0

Everything is built from configs, offline:
  * a word-level CLIP tokenizer made from a vocabulary in this file (no files downloaded);
  * a tiny CLIP text encoder, randomly initialised with the seed and frozen (the UNet learns to read it);
  * a tiny AutoencoderKL (32x32 RGB <-> 4x16x16 latents) trained for reconstruction on colour-tinted Fashion-MNIST
    and on 32x32 crops of scikit-image photographs (not the DreamBooth subject ``coffee``);
  * a tiny UNet2DConditionModel trained with the epsilon objective on the Fashion-MNIST *train* split, each image
    with a fixed random colour tint, captioned "a photo of a <class>" (10 % empty captions, for guidance).

Writes a ``StableDiffusionPipeline`` with ``save_pretrained`` (fp32), ``samples.png`` (a row per class) and
``training.json``.
"""

import argparse
import json
import string
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..common.paths import TINY_T2I
from ..common.schedule import cosine_with_warmup
from .data import fashion_mnist

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
#: Whole-word tokens; any other text falls back to single characters. "sks" is the rare DreamBooth identifier:
#: a token of its own that no caption of the pretraining data contains.
WORDS = ("a", "an", "photo", "of", "sks", "t", "shirt", "trouser", "pullover", "dress", "coat", "sandal", "sneaker",
         "bag", "ankle", "boot", "top")
MAX_LENGTH = 16
PHOTO_SOURCES = ("astronaut", "chelsea", "rocket", "camera", "coins", "text", "immunohistochemistry", "retina",
                 "brick", "grass", "gravel", "cell")  # VAE data; never "coffee", the DreamBooth subject


def caption(label: int) -> str:
    word = CLASSES[label]
    return f"a photo of {'an' if word[0] in 'aeiou' else 'a'} {word}"


# ------------------------------------------------------------------------------------------------ components
def build_tokenizer(max_length: int = MAX_LENGTH):
    """A CLIP BPE tokenizer whose merges spell out each word of :data:`WORDS`; built from nothing, offline."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "-/,.!?'":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_pipeline(seed: int = 0):
    """The untrained pipeline: tokenizer, text encoder, VAE, UNet and a DDIM scheduler, from configs."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
    )
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ------------------------------------------------------------------------------------------------------ data
def tinted_fashion(images: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32) in [-1, 1], framed in black, each image with a random colour tint."""
    x = torch.from_numpy(np.array(images)).float().div(255)
    x = F.pad(x, (2, 2, 2, 2)).unsqueeze(1)
    tint = torch.rand(len(x), 3, 1, 1, generator=gen) * 0.8 + 0.2
    return (x * tint) * 2 - 1


def photo_crops(count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random 32x32 crops of downscaled scikit-image photographs, in [-1, 1]."""
    import skimage.data
    from PIL import Image

    pools = []
    for name in PHOTO_SOURCES:
        image = np.asarray(getattr(skimage.data, name)())
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        for side in (64, 128):
            scale = side / min(image.shape[:2])
            size = (max(32, round(image.shape[1] * scale)), max(32, round(image.shape[0] * scale)))
            pools.append(torch.from_numpy(np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))))
    out = torch.empty(count, 3, 32, 32)
    for i in range(count):
        pool = pools[int(torch.randint(len(pools), (1,), generator=gen))]
        top = int(torch.randint(pool.shape[0] - 31, (1,), generator=gen))
        left = int(torch.randint(pool.shape[1] - 31, (1,), generator=gen))
        out[i] = pool[top:top + 32, left:left + 32].permute(2, 0, 1).float() / 127.5 - 1
    return out


# -------------------------------------------------------------------------------------------------- training
def train_vae(vae, fashion: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator) -> float:
    photos = photo_crops(20_000, gen)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, 100))
    vae.train()
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        half = batch // 2
        x = torch.cat([fashion[torch.randint(len(fashion), (half,), generator=gen)],
                       photos[torch.randint(len(photos), (batch - half,), generator=gen)]])
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(vae.device)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, x) + 0.5 * F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return loss.item()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def train_unet(pipe, latents: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, lr: float,
               gen: torch.Generator, deadline: float | None, ema_decay: float | None = None,
               warmup: int = 200) -> tuple[int, float]:
    """Train ``pipe.unet`` with the epsilon objective; with ``ema_decay`` its weights end as their exponential
    moving average (the usual trick for diffusion models: the average samples better than the last step).
    Random numbers come from the CPU generator ``gen`` on every device, so a run is the same on CPU and GPU
    up to the device's arithmetic."""
    from diffusers import DDPMScheduler

    device = latents.device
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        prompts = [caption(i) for i in range(len(CLASSES))] + [""]
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        embeddings = pipe.text_encoder(ids)[0]  # (11, L, 64): the frozen encoder runs once
    unet = pipe.unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    averaged = torch.optim.swa_utils.AveragedModel(
        unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay)) if ema_decay else None
    # With a deadline, the step count is fixed after PROBE steps from their speed; the schedule of those first
    # steps is warm-up only, so `--unet-steps <the count>` without a deadline reproduces the run exactly.
    total, probe = [steps], 30
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(total[0], warmup)(s))
    bar = tqdm(range(steps), desc="unet")
    ema, done, probe_start = None, 0, time.time()
    for step in bar:
        if step == probe and deadline is not None:
            total[0] = min(steps, probe + int((deadline - time.time()) / ((time.time() - probe_start) / probe)))
            bar.total = total[0]
            print(f"\n{total[0]} UNet steps fit the time budget")
        if step == total[0]:
            break
        index = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[index.to(device)]
        condition = torch.where(torch.rand(batch, generator=gen) < 0.1, len(CLASSES), labels[index]).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
        prediction = unet(noise_scheduler.add_noise(x0, noise, t), t, embeddings[condition]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if averaged is not None:
            averaged.update_parameters(unet)
        if step % 10 == 0 or step + 1 == total[0]:  # reading the loss waits for the device: not every step
            ema = loss.item() if ema is None else 0.8 * ema + 0.2 * loss.item()
            bar.set_postfix(loss=f"{ema:.4f}")
        done = step + 1
    if averaged is not None:
        with torch.no_grad():
            for p, p_average in zip(unet.parameters(), averaged.module.parameters(), strict=True):
                p.copy_(p_average)
    unet.eval()
    return done, ema


def sample_grid(pipe, path: Path, seed: int = 0, per_class: int = 4) -> None:
    """One row per class, ``per_class`` seeds per row, 25 DDIM steps, guidance 3."""
    from PIL import Image

    prompts = [caption(i) for i in range(len(CLASSES)) for _ in range(per_class)]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=3.0, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(seed)).images
    grid = (images.reshape(len(CLASSES), per_class, 32, 32, 3).transpose(0, 2, 1, 3, 4)
            .reshape(len(CLASSES) * 32, per_class * 32, 3))
    Image.fromarray((grid * 255).round().astype(np.uint8)).resize((per_class * 64, len(CLASSES) * 64),
                                                                  Image.NEAREST).save(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.offline.pretrain_t2i", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--minutes", type=float, help="fit the UNet steps into this much wall time in total (the "
                        "count is printed and saved: pass it as --unet-steps to reproduce the run)")
    parser.add_argument("--train-images", type=int, help="use only the first N training images (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema-decay", type=float, help="end with the exponential moving average of the UNet's "
                        "weights, with this decay (0.999 for long runs); off by default")
    parser.add_argument("--warmup-steps", type=int, default=200, help="UNet learning-rate warm-up steps")
    parser.add_argument("--device", default="cpu", help="torch device for training and sampling (cpu, cuda)")
    parser.add_argument("--init", type=Path, help="continue from this saved pipeline (with --vae-steps 0: keep its "
                        "VAE and train the UNet further); its training.json goes into the new one's stages")
    parser.add_argument("--output", type=Path, default=TINY_T2I)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    start = time.time()
    deadline = start + 60 * args.minutes if args.minutes else None
    gen = torch.Generator().manual_seed(args.seed)
    stages = []
    if args.init:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.init, dtype=torch.float32)
        if (args.init / "training.json").is_file():
            previous = json.loads((args.init / "training.json").read_text())
            stages = [*previous.pop("stages", []), previous]
    else:
        pipe = build_pipeline(args.seed)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    pipe.text_encoder.requires_grad_(False)
    images, labels = fashion_mnist("train")
    if args.train_images:
        images, labels = images[:args.train_images], labels[:args.train_images]
    fashion = tinted_fashion(images, gen)
    vae_loss = train_vae(pipe.vae, fashion, args.vae_steps, args.batch_size, args.vae_lr, gen) if args.vae_steps \
        else None
    pipe.vae.requires_grad_(False).eval()
    latents = encode_all(pipe.vae, fashion.to(args.device))
    if args.vae_steps:
        pipe.vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    scaling = pipe.vae.config.scaling_factor
    latents = latents * scaling
    vae_s = time.time() - start
    steps, unet_loss = train_unet(pipe, latents, torch.from_numpy(labels.astype(np.int64)), args.unet_steps,
                                  args.batch_size, args.unet_lr, gen, deadline, args.ema_decay, args.warmup_steps)
    pipe.unet.requires_grad_(False)

    args.output.mkdir(parents=True, exist_ok=True)
    sample_grid(pipe, args.output / "samples.png", seed=args.seed)
    pipe.to("cpu").save_pretrained(args.output)  # fp32 throughout: about 5 MB
    info = dict(seed=args.seed, init=str(args.init) if args.init else None, vae_steps=args.vae_steps,
                vae_loss=None if vae_loss is None else round(vae_loss, 4), unet_steps=steps,
                unet_loss_ema=round(unet_loss, 4), batch_size=args.batch_size, scaling_factor=scaling,
                train_images=len(images), vae_seconds=round(vae_s), seconds=round(time.time() - start),
                unet_lr=args.unet_lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, device=args.device,
                torch=torch.__version__, stages=stages)
    (args.output / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
