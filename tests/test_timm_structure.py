"""Where ``targets="auto"`` puts adapters in timm models whose structure the zoo sweep (bench/zoo.py) found the
first rule getting wrong, and the layer handling it needed: every group of a dict ``group_matcher`` (not only
``blocks``), layers timm sorts after a group's blocks (inside when more blocks follow, after the blocks
otherwise), layers with one input channel, and parents that read their child layer's geometry."""

import copy
import re

import pytest
import timm
import torch
from helpers import rel_err
from torch import nn

import psoft_vision as pv
from psoft_vision.targets import timm_targets
from psoft_vision.testing import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


def meta_model(name: str, **kwargs) -> nn.Module:
    """A timm model with its structure and no memory: enough to choose targets."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def matching(names: list[str], pattern: str) -> list[str]:
    return [n for n in names if re.fullmatch(pattern, n)]


# (model, layers that must be adapted, layers that must not), as full-match regexes over module names
GROUPS = {
    # HRNet's dict matcher names its blocks "block_types": its stage 1, stages and transitions are blocks; the
    # incremental / downsampling modules and the final layer of the classification neck are the head.
    "hrnet_w18_small": (
        [r"layer1\.0\.conv1", r"transition1\.0\.0", r"stage4\.0\.branches\.0\.0\.conv1"],
        [r"conv[12]", r"incre_modules\..*", r"downsamp_modules\..*", r"final_layer\..*", r"classifier"]),
    # transitions between dense blocks join the previous group (MATCH_PREV_GROUP): inside, since blocks follow
    "densenet121": ([r"features\.transition[123]\.conv"], [r"features\.conv0", r"classifier"]),
    # EfficientViM: each stage's downsample joins the previous group
    "efficientvim_m1": ([r"stages\.1\.downsample\.conv\.0\.conv"], [r"patch_embed\..*"]),
    # XCiT's and VOLO's class-attention blocks are groups of their own, as CaiT's are
    "xcit_nano_12_p8_224": ([r"cls_attn_blocks\.[01]\.attn\.q", r"cls_attn_blocks\.1\.mlp\.fc2"], [r"head"]),
    "volo_d1_224": ([r"post_network\.[01]\.attn\.kv"], [r"aux_head", r"head"]),
    "cait_xxs24_224": ([r"blocks_token_only\.[01]\.attn\.q"], [r"head"]),  # a function matcher
    # sorted after the last block: the final convs stay out
    "legacy_xception": ([r"block12\.skip"], [r"conv3\.pointwise", r"conv4\.pointwise"]),
    "test_efficientnet": ([r"blocks\.0\.0\.conv"], [r"conv_head"]),
    "test_nfnet": ([r"stages\.0\.0\.conv1"], [r"final_conv"]),
    "mobilevit_xxs": ([r"stages\.4\.1\.conv_fusion\.conv"], [r"final_conv\.conv"]),
}


@pytest.mark.parametrize("name", list(GROUPS))
def test_auto_follows_every_group_of_the_group_matcher(name):
    targets = timm_targets(meta_model(name))
    inside, outside = GROUPS[name]
    for pattern in inside:
        assert matching(targets, pattern), f"{name}: nothing matching {pattern!r} is adapted"
    for pattern in outside:
        assert not matching(targets, pattern), f"{name}: {matching(targets, pattern)} should not be adapted"


def test_layers_reading_one_channel_are_left_out_and_oft_adapts_the_rest():
    """CSATv2's spatial attention is one channel wide: a 1-channel 3x3 conv and Linear(1, 3). A rotation of a
    single input channel is the identity, so OFT used to refuse the whole model."""
    model = timm.create_model("csatv2", pretrained=False).eval()
    narrow = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and m.weight.shape[1] == 1]
    assert "stages.0.0.attn.attn.qkv" in narrow and "stages.0.0.attn.attn.pos_embed.proj" in narrow
    targets = timm_targets(model)
    assert targets and not set(targets) & set(narrow)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        pv.inject(model, pv.OFTConfig())
        assert rel_err(model(x), expected) <= 1e-5


def test_adapted_layer_reads_through_to_its_base_layer():
    base = nn.Conv2d(4, 8, kernel_size=2, stride=2)
    layer = pv.AdaptedLayer(base)
    assert (layer.kernel_size, layer.stride, layer.in_channels, layer.padding_mode) == ((2, 2), (2, 2), 4, "zeros")
    with pytest.raises(AttributeError, match="no_such_thing"):
        layer.no_such_thing  # noqa: B018
    twin = copy.deepcopy(layer)
    assert twin.kernel_size == (2, 2) and twin.base is not base


def test_davit_downsampling_reads_the_kernel_size_of_its_adapted_conv():
    """DaViT pads before its 2x2 downsampling conv by ``self.conv.kernel_size``: the parent reads its child."""
    model = timm.create_model("davit_tiny", pretrained=False, depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128),
                              num_heads=(1, 2, 4, 8)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        pv.inject(model, pv.PSOFTConfig(rank=4))
        assert "stages.1.downsample.conv" in dict(pv.adapted_layers(model))
        assert rel_err(model(x), expected) <= 1e-5
        randomize_adapters(model)
        adapted = model(x)
        pv.merge(model)
        assert rel_err(model(x), adapted) <= 1e-5
