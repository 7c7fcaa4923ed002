"""The project's own offline backbone, registered with timm like any hub model.

``vit_pico_patch8_32`` is a six-block ViT for 32x32 images (4x4 patches of 8x8 pixels, width 128). Its tag
``.fmnist`` is the checkpoint shipped in ``assets/`` (trained by ``python -m train.offline.pretrain_backbone``), so the
ordinary timm path loads it with no network::

    import train.offline.backbone  # registers the name
    model = timm.create_model("vit_pico_patch8_32.fmnist", pretrained=True, num_classes=7)
"""

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..common.paths import ASSETS
from .data import FASHION

BACKBONE_FILE = ASSETS / "vit_pico_patch8_32.fmnist.safetensors"
BACKBONE = "vit_pico_patch8_32.fmnist"

default_cfgs = generate_default_cfgs({
    BACKBONE: dict(
        file=str(BACKBONE_FILE), num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="patch_embed.proj", classifier="head",
        label_names=FASHION, license="apache-2.0", origin_url="assets/MODEL_CARD.md",
    ),
})


@register_model
def vit_pico_patch8_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    architecture = dict(img_size=32, patch_size=8, embed_dim=128, depth=6, num_heads=4)
    return build_model_with_cfg(
        VisionTransformer, "vit_pico_patch8_32", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        **{**architecture, **kwargs},
    )
