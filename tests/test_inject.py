"""Injection into timm models: presets, target specs, freezing, several adapters, errors, summary."""

import copy
import re
import warnings

import pytest
import timm
import torch
from helpers import rel_err
from torch import nn

import psoft_vision as pv
from psoft_vision.methods.oft import nearest_block_size
from psoft_vision.testing import randomize_adapters

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
TIMM_MODELS = {
    "vit_tiny_patch16_224": ({}, 224),
    "test_vit": ({}, 160),
    "deit_tiny_distilled_patch16_224": ({}, 224),
    "eva02_tiny_patch14_224": ({"depth": 2}, 224),
    "swin_tiny_patch4_window7_224": ({"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}, 224),
}


def timm_model(name: str):
    kwargs, size = TIMM_MODELS[name]
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval(), torch.randn(2, 3, size, size)


def block_linear_names(model: nn.Module) -> set[str]:
    """The four linears of every block, and the linear of Swin's patch merging between stages."""
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (
        ".blocks." in f".{n}" and n.endswith(BLOCK_LINEARS) or n.endswith("downsample.reduction"))}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_inject_with_defaults_is_the_identity_on_the_block_linears(name):
    model, x = timm_model(name)
    expected = model(x)
    wanted = block_linear_names(model)
    with torch.no_grad():
        pv.inject(model)
        adapted = {n for n, _ in pv.adapted_layers(model)}
        assert adapted == wanted and wanted
        assert not any("patch_embed" in n or "head" in n for n in adapted)
        assert rel_err(model(x), expected) <= 1e-5


def test_split_qkv_on_vit_is_exact_and_merges():
    model, x = timm_model("vit_tiny_patch16_224")
    with torch.no_grad():
        expected = model(x)
        pv.inject(model, pv.PSOFTConfig(rank=16, split_qkv=True))
        assert model.blocks[0].attn.qkv.adapters["default"].chunks == 3
        assert model.blocks[0].attn.proj.adapters["default"].chunks == 1
        assert rel_err(model(x), expected) <= 1e-5
        randomize_adapters(model)
        adapted = model(x)
        pv.merge(model)
        assert rel_err(model(x), adapted) <= 1e-5


def test_patch_embedding_only_when_targeted_explicitly():
    model, x = timm_model("vit_tiny_patch16_224")
    with torch.no_grad():
        expected = model(x)
        pv.inject(model, pv.PSOFTConfig(rank=8, targets=["patch_embed.proj"]))
        assert [n for n, _ in pv.adapted_layers(model)] == ["patch_embed.proj"]
        assert rel_err(model(x), expected) <= 1e-5
        randomize_adapters(model)
        adapted = model(x)
        pv.merge(model)
        assert rel_err(model(x), adapted) <= 1e-5


@pytest.mark.parametrize("method", ["psoft", "oft"])
def test_every_timm_model_merges_exactly(method):
    model, x = timm_model("test_vit")
    config = pv.PSOFTConfig(rank=8) if method == "psoft" else pv.OFTConfig(block_size=16)
    with torch.no_grad():
        pv.inject(model, config)
        randomize_adapters(model)
        adapted = model(x)
        pv.merge(model)
        assert rel_err(model(x), adapted) <= 1e-5
        pv.unmerge(model)
        assert rel_err(model(x), adapted) <= 1e-5


def test_target_specs_list_regex_callable_and_exclude():
    model, _ = timm_model("test_vit")
    suffix = pv.inject(model, pv.PSOFTConfig(rank=4, targets=["attn.qkv", "blocks.0.mlp.fc2"]))
    names = [n for n, _ in pv.adapted_layers(suffix)]
    assert names[-1] == "blocks.0.mlp.fc2" or "blocks.0.mlp.fc2" in names
    assert all(n.endswith("attn.qkv") or n == "blocks.0.mlp.fc2" for n in names)

    model, _ = timm_model("test_vit")
    pv.inject(model, pv.PSOFTConfig(rank=4, targets=r"blocks\.\d+\.mlp\.fc\d", exclude=["blocks.0.mlp.fc1"]))
    names = {n for n, _ in pv.adapted_layers(model)}
    assert "blocks.0.mlp.fc1" not in names and "blocks.0.mlp.fc2" in names
    assert all(".mlp.fc" in n for n in names)

    model, _ = timm_model("test_vit")
    pv.inject(model, pv.PSOFTConfig(rank=4, targets=lambda n, m: isinstance(m, nn.Linear) and m.out_features == 64,
                                    exclude=re.compile(r".*\.1\..*")))
    names = {n for n, _ in pv.adapted_layers(model)}
    assert names and all(".1." not in n and model.get_submodule(n).base.out_features == 64 for n in names)


def test_train_modules_and_freezing():
    model, _ = timm_model("test_vit")
    pv.inject(model, pv.PSOFTConfig(rank=4, train_modules=("head",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.startswith("head.") or ".adapters.default." in n for n in trainable)
    assert not any(p.requires_grad for _, layer in pv.adapted_layers(model) for p in layer.base.parameters())


def test_a_second_named_adapter_stacks_on_top():
    model, x = timm_model("test_vit")
    with torch.no_grad():
        pv.inject(model, pv.PSOFTConfig(rank=4))
        randomize_adapters(model, seed=1)
        first = model(x)
        pv.inject(model, pv.OFTConfig(block_size=8), name="style")
        layer = model.blocks[0].attn.qkv
        assert layer.active == ["default", "style"]
        assert rel_err(model(x), first) <= 1e-5  # the new adapter starts as the identity
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".adapters.style." in n for n in trainable)
        randomize_adapters(model, seed=2)
        stacked = model(x)
        pv.merge(model)
        assert rel_err(model(x), stacked) <= 1e-5
        with pytest.raises(pv.AdapterNameError, match="already has an adapter named 'style'"):
            pv.inject(model, pv.PSOFTConfig(rank=4), name="style")


def test_unknown_targets_name_the_closest_modules():
    model, _ = timm_model("test_vit")
    with pytest.raises(pv.TargetNotFoundError, match=r"'attn\.qkvv'.*blocks\.\d\.attn\.qkv"):
        pv.inject(model, pv.PSOFTConfig(targets=["attn.qkvv"]))
    with pytest.raises(pv.TargetNotFoundError, match="regex 'decoder.*'"):
        pv.inject(model, pv.PSOFTConfig(targets="decoder.*"))
    with pytest.raises(pv.TargetNotFoundError, match="train_modules 'heads'.*'head'"):
        pv.inject(model, pv.PSOFTConfig(train_modules=("heads",)))
    with pytest.raises(pv.UnsupportedLayerError, match="'blocks.0.norm1' is a LayerNorm"):
        pv.inject(model, pv.PSOFTConfig(targets=["blocks.0.norm1"]))
    assert not list(pv.adapted_layers(model))  # nothing was changed by the failures
    assert all(p.requires_grad for p in model.parameters())


def _layer_states(model: nn.Module) -> dict:
    return {name: (type(module).__name__, list(getattr(module, "active", [])), list(getattr(module, "merged", [])))
            for name, module in model.named_modules()}


def test_inject_failing_on_the_fifth_layer_changes_nothing():
    """Adapters are built for every layer before the model is touched: a failure on the fifth of 24 targets
    leaves state dict, module types, merge states and requires_grad flags exactly as they were."""
    model, x = timm_model("test_vit")
    pv.inject(model, pv.PSOFTConfig(rank=4, targets=["blocks.0.attn.qkv", "blocks.0.mlp.fc1"]), name="first")
    randomize_adapters(model, std=0.2)
    pv.merge(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers, flags = _layer_states(model), {n: p.requires_grad for n, p in model.named_parameters()}
    expected = model(x)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | pv.AdaptedLayer) and ".blocks." in
               f".{n}" and n.endswith(BLOCK_LINEARS)]
    assert len(targets) >= 12
    fifth = targets[4]  # blocks.1.attn.qkv: 64 inputs, which 48 does not divide
    with pytest.raises(pv.BlockSizeError, match=re.escape(repr(fifth))):
        pv.inject(model, pv.OFTConfig(block_size=16, targets=targets, block_size_pattern={fifth: 48}))
    assert _layer_states(model) == layers
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(model(x), expected)


def test_auto_block_size_takes_the_nearest_divisor_with_one_warning(tmp_path):
    model, _ = timm_model("test_vit")  # qkv, proj and fc1 read 64 features, which 48 does not divide; fc2 reads 192
    fresh = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"block_size 48 does not divide the input width of \d+ of \d+ layers") as w:
        pv.inject(model, pv.OFTConfig(block_size=48))
    assert len(w) == 1
    sizes = {n: layer.adapters["default"].block_size for n, layer in pv.adapted_layers(model)}
    # 32 and 64 are both 16 away from 48: the smaller wins the tie
    assert sizes["blocks.0.attn.qkv"] == 32 and sizes["blocks.0.mlp.fc2"] == 48
    assert pv.read_adapter(pv.save_adapter(model, tmp_path / "a.safetensors"))[0]["layers"]["blocks.0.attn.qkv"][
        "block_size"] == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: each layer's size is saved in the file
        restored = pv.load_adapter(fresh, tmp_path / "a.safetensors")
    assert {n: layer.adapters["default"].block_size for n, layer in pv.adapted_layers(restored)} == sizes
    assert nearest_block_size(100, 32) == 25 and nearest_block_size(96, 32) == 32 and nearest_block_size(7, 4) == 7


def test_auto_needs_a_known_model_and_a_module():
    with pytest.raises(pv.TargetNotFoundError, match="no preset for Sequential"):
        pv.inject(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="pipe.unet or pipe.transformer"):
        pv.inject(object())


def test_trainable_summary_counts_per_method_and_layer_type():
    model, _ = timm_model("test_vit")
    layers = len(block_linear_names(model))
    pv.inject(model, pv.PSOFTConfig(rank=8, train_modules=("head",)))
    pv.inject(model, pv.PSOFTConfig(rank=4, targets=["patch_embed.proj"]), name="embed")
    text = pv.trainable_summary(model)
    assert re.search(rf"default\s+psoft\s+Linear\s+{layers}\s+{layers * 44:,}\s+0\n", text)
    assert re.search(r"embed\s+psoft\s+Conv2d\s+1\s+14\s+14\n", text)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable {trainable:,} of {total:,}" in text
