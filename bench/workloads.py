"""What the benchmark trains: a model, its inputs, its loss, and where adapters go (the same layers for every
method, ours and PEFT's). ``sizes`` gives each config field that sets an adapter's size (a method's
``size_field``: PSOFT's rank, OFT's block size) its value for the workload."""

import torch
import torch.nn.functional as F

VIT_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def _timm_classifier(name: str, batch: int, size: int, device, rank: int = 46, autocast: torch.dtype | None = None):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=100).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(100, (batch,), generator=gen).to(device)

    def loss_fn(model, x=x):
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            return F.cross_entropy(model(x), y)

    return model, (x,), loss_fn, dict(targets=VIT_TARGETS, head="head", lora_rank=8,
                                     sizes=dict(rank=rank, block_size=32))


def vit_b16(device):
    return _timm_classifier("vit_base_patch16_224", 8, 224, device)


def vit_b16_bf16(device):
    """ViT-B/16 as above, under bf16 autocast (fp32 weights), as mixed-precision training runs it."""
    return _timm_classifier("vit_base_patch16_224", 8, 224, device, autocast=torch.bfloat16)


def vit_tiny_b1(device, rank: int = 8):
    """One image through a ViT-Tiny at r=8: per-op overhead, not arithmetic, sets the step time (as on a GPU)."""
    return _timm_classifier("vit_tiny_patch16_224", 1, 224, device, rank=rank)


def test_vit(device):
    """A seconds-long smoke workload (timm's test_vit, batch 2): checks the machinery, measures nothing."""
    return _timm_classifier("test_vit", 2, 160, device)


def _unet_training(model, batch: int, context_length: int, dtype=torch.float32):
    """``(inputs, loss_fn)`` of a UNet's noise-prediction loss on fixed random latents, context and timesteps."""
    config = model.config
    latents = (batch, config.in_channels, config.sample_size, config.sample_size)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(latents, generator=gen).to(model.device, dtype)
    context = torch.randn(batch, context_length, config.cross_attention_dim, generator=gen).to(model.device, dtype)
    timesteps = torch.randint(1000, (batch,), generator=gen).to(model.device)
    noise = torch.randn(latents, generator=gen).to(model.device, dtype)

    def loss_fn(model, x=sample):
        return F.mse_loss(model(x, timesteps, encoder_hidden_states=context).sample.float(), noise.float())

    return (sample,), loss_fn


def unet_small(device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    ).to(device)
    # Rank 16 is to these 64-256 channels about what 46 is to ViT-B's 768 (the adapter path costs r (in + out)).
    return model, *_unet_training(model, 4, 77), dict(targets="unet", head=None, lora_rank=4,
                                                        sizes=dict(rank=16, block_size=32))


def unet_sd15(device):
    """A full-size Stable Diffusion 1.5 UNet from its config (random weights, nothing downloaded), bf16 weights as
    DreamBooth trains it, 64 x 64 latents (512 px), batch 2: the memory claim at a real size. A GPU workload."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8,
    ).to(device, torch.bfloat16)
    return model, *_unet_training(model, 2, 77, torch.bfloat16), dict(targets="unet", head=None, lora_rank=16,
                                                                      sizes=dict(rank=32, block_size=32))


def tiny_t2i(device):
    """The UNet of the shipped offline pipeline (assets/tiny-t2i) on a DreamBooth batch (4 instance + 4 class
    latents), at the DreamBooth trainer's default sizes (its searched settings, docs/dreambooth_offline.md): what
    each method costs per step there."""
    from diffusers import UNet2DConditionModel

    from train.common.paths import TINY_T2I
    from train.dreambooth.cli import build_parser

    defaults = build_parser().parse_args([])
    model = UNet2DConditionModel.from_pretrained(TINY_T2I / "unet").to(device)
    sizes = dict(rank=defaults.rank, block_size=defaults.block_size)
    return model, *_unet_training(model, 8, 16), dict(targets="unet", head=None, lora_rank=defaults.lora_rank,
                                                        sizes=sizes)


WORKLOADS = {"vit-b16": vit_b16, "vit-b16-bf16": vit_b16_bf16, "vit-tiny-b1": vit_tiny_b1,
             "vit-tiny-b1-r46": lambda device: vit_tiny_b1(device, rank=46), "unet-small": unet_small,
             "unet-sd15": unet_sd15, "test-vit": test_vit, "tiny-t2i": tiny_t2i}
