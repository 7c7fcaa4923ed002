"""Merge, strength, disable, several adapters and remove, on a tiny timm ViT."""

import pytest
import timm
import torch
from helpers import rel_err

import psoft_vision as pv
from psoft_vision.testing import randomize_adapters


def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))


def two_adapters(x):
    """A ViT with PSOFT 'a' under OFT 'b', both random; returns the model, its base output and weights."""
    model = vit()
    base = model(x).detach()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    pv.inject(model, pv.PSOFTConfig(rank=8), name="a")
    pv.inject(model, pv.OFTConfig(block_size=16), name="b")
    randomize_adapters(model)
    return model, base, weights, modules


@torch.no_grad()
def test_unmerge_restores_the_pretrained_weights_bit_for_bit(x):
    model, _, weights, _ = two_adapters(x)
    adapted = model(x)
    pv.merge(model)
    assert rel_err(model(x), adapted) <= 1e-5
    pv.unmerge(model)
    for name, layer in pv.adapted_layers(model):
        assert torch.equal(layer.base.weight, weights[f"{name}.weight"])
    assert torch.equal(model(x), adapted)


@torch.no_grad()
def test_merging_an_fp64_model_keeps_its_precision(x):
    """An fp64 base merges in fp64: a merge through fp32 would round every base weight (relative error ~1e-7)."""
    model, _, _, _ = two_adapters(x)
    model.double()
    adapted = model(x.double())
    pv.merge(model)
    assert model.blocks[0].attn.qkv.base.weight.dtype == torch.float64
    assert rel_err(model(x.double()), adapted) <= 1e-12


@torch.no_grad()
def test_merge_by_name_folds_that_adapter_and_those_below(x):
    model, _, _, _ = two_adapters(x)
    adapted = model(x)
    pv.merge(model, "a")
    layer = model.blocks[0].attn.qkv
    assert layer.merged == ["a"] and layer.active == ["a", "b"]
    assert rel_err(model(x), adapted) <= 1e-5
    pv.merge(model, "b")
    assert layer.merged == ["a", "b"]
    assert rel_err(model(x), adapted) <= 1e-5
    with pytest.raises(pv.AdapterNameError, match="no adapter named \\['c'\\]"):
        pv.merge(model, "c")


@pytest.mark.parametrize("config", [pv.PSOFTConfig(rank=8), pv.OFTConfig(block_size=16)], ids=["psoft", "oft"])
@torch.no_grad()
def test_strength_zero_is_the_base_model_exactly_and_one_the_adapter(config, x):
    model = vit()
    base = model(x)
    pv.inject(model, config)
    randomize_adapters(model)
    adapted = model(x)
    pv.set_strength(model, 0.0)
    assert torch.equal(model(x), base)
    pv.set_strength(model, 0.5)
    half = model(x)
    assert rel_err(half, base) > 1e-4 and rel_err(half, adapted) > 1e-4
    pv.merge(model)
    assert rel_err(model(x), half) <= 1e-5
    pv.set_strength(model, 1.0)  # merged layers are merged again at the new strength
    assert model.blocks[0].attn.qkv.merged == ["default"]
    assert rel_err(model(x), adapted) <= 1e-5
    with pytest.raises(pv.ConfigError, match="t=nan"):
        pv.set_strength(model, float("nan"))


@torch.no_grad()
def test_intermediate_strength_stays_orthogonal():
    model = vit()
    pv.inject(model, pv.PSOFTConfig(rank=8, train_alpha=False, train_beta=False))
    randomize_adapters(model, std=0.3)
    layer = model.blocks[0].mlp.fc1
    w = layer.base.weight.double().clone()
    pv.set_strength(model, 0.37)
    pv.merge(model)
    merged = layer.base.weight.double()
    assert rel_err(merged, w) > 1e-3
    assert rel_err(merged @ merged.T, w @ w.T) <= 1e-5


@torch.no_grad()
def test_disabled_runs_the_base_model_and_restores_everything(x):
    model, base, _, _ = two_adapters(x)
    pv.merge(model, "a")
    adapted = model(x)
    with pv.disabled(model):
        assert torch.equal(model(x), base)
        assert model.blocks[0].attn.qkv.active == []
    layer = model.blocks[0].attn.qkv
    assert layer.active == ["a", "b"] and layer.merged == ["a"]
    assert torch.equal(model(x), adapted)


@torch.no_grad()
def test_activate_chooses_and_orders_adapters(x):
    model, base, _, _ = two_adapters(x)
    stacked = model(x)
    pv.activate(model, ["b"])
    only_b = model(x)
    assert rel_err(only_b, stacked) > 1e-4 and rel_err(only_b, base) > 1e-4
    pv.activate(model, ["b", "a"])
    reversed_order = model(x)
    assert rel_err(reversed_order, stacked) > 1e-5  # PSOFT and OFT do not commute
    pv.merge(model)
    assert rel_err(model(x), reversed_order) <= 1e-5
    pv.activate(model, "a")
    assert model.blocks[0].attn.qkv.merged == []
    with pytest.raises(pv.AdapterNameError):
        pv.activate(model, ["a", "zzz"])
    with pytest.raises(pv.AdapterNameError, match="repeat"):
        pv.activate(model, ["a", "a"])


@torch.no_grad()
def test_remove_puts_the_original_modules_and_weights_back(x):
    model, base, weights, modules = two_adapters(x)
    pv.merge(model)
    pv.remove(model, "b")
    assert model.blocks[0].attn.qkv.active == ["a"]
    pv.remove(model)
    assert not list(pv.adapted_layers(model))
    for name, module in model.named_modules():
        assert module is modules[name]
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name])
    assert torch.equal(model(x), base)
    assert pv.adapter_names(model) == []


@torch.no_grad()
def test_eval_cache_follows_parameter_updates_and_strength(x):
    model = vit()
    base = model(x)
    pv.inject(model, pv.PSOFTConfig(rank=8))
    adapter = model.blocks[0].attn.qkv.adapters["default"]
    first = adapter.up_weight()
    assert adapter.up_weight() is first  # cached while nothing changed
    randomize_adapters(model)  # in-place updates, as an optimiser makes them
    adapted = model(x)
    assert rel_err(adapted, base) > 1e-3
    pv.set_strength(model, 0.0)
    assert torch.equal(model(x), base)
    pv.set_strength(model, 1.0)
    assert torch.equal(model(x), adapted)
    with torch.enable_grad():
        assert adapter.up_weight() is not adapter.up_weight()  # never cached while training
