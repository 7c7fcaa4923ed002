"""Layers other code owns or rewrites (issue 21): PEFT's LoRA layers are refused by name, before and after
diffusers' LoRA loading; fused q/k/v projections are refused at inject and fusing is refused after it."""

import copy

import pytest
import timm
import torch
from helpers import rel_err
from test_diffusers import tiny_unet, unet_inputs

import psoft_vision as pv
from psoft_vision.testing import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")
peft = pytest.importorskip("peft")


def snapshot(model: torch.nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_same(model: torch.nn.Module, before: tuple) -> None:
    weights, types, flags = snapshot(model)
    assert types == before[1] and flags == before[2] and weights.keys() == before[0].keys()
    assert all(torch.equal(v, before[0][k]) for k, v in weights.items())


@torch.no_grad()
def out(unet) -> torch.Tensor:
    return unet(**unet_inputs()).sample


def lora_unet() -> torch.nn.Module:
    """A tiny UNet with a LoRA in it, as ``pipe.load_lora_weights`` leaves it (diffusers' ``add_adapter``)."""
    unet = tiny_unet()
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    return unet


@pytest.mark.parametrize("load", [False, True], ids=["inject", "load_adapter"])
def test_inject_refuses_peft_lora_layers_by_name(tmp_path, load):
    unet = lora_unet()
    before = snapshot(unet)
    with pytest.raises(pv.UnsupportedLayerError, match=r"PEFT LoRA layers.*'down_blocks\.0\.attentions\.0\.transformer_"
                                                         r"blocks\.0\.attn1\.to_q.*fuse_lora\(\)"):
        if load:
            source = pv.inject(tiny_unet(), pv.PSOFTConfig(rank=4))
            pv.load_adapter(unet, pv.save_adapter(source, tmp_path / "a.safetensors"), check_base=False)
        else:
            pv.inject(unet, pv.PSOFTConfig(rank=4))
    assert_same(unet, before)


def test_a_fused_and_unloaded_lora_takes_inject():
    unet = lora_unet()
    with torch.no_grad():
        expected = out(unet)
    unet.fuse_lora()
    unet.unload_lora()
    pv.inject(unet, pv.PSOFTConfig(rank=4))
    assert rel_err(out(unet), expected) < 1e-5  # the LoRA is in the weights, and the adapters start as identity
    assert not any("lora" in name for name, _ in pv.adapted_layers(unet))


def test_inject_refuses_a_peft_model_by_name():
    torch.manual_seed(0)
    model = peft.get_peft_model(timm.create_model("test_vit", pretrained=False, num_classes=10).eval(),
                                peft.LoraConfig(r=4, target_modules=["qkv"]))
    before = snapshot(model)
    with pytest.raises(pv.UnsupportedLayerError, match="PEFT LoRA layers.*merge_and_unload"):
        pv.inject(model, pv.PSOFTConfig(rank=4, targets=r".*(qkv|proj|fc\d).*"))
    assert_same(model, before)


def test_other_layers_of_a_model_with_a_lora_may_still_be_adapted():
    unet = lora_unet()
    pv.inject(unet, pv.PSOFTConfig(rank=4, targets=r".*\.ff\.net\.2"))
    assert {type(m).__name__ for _, m in pv.adapted_layers(unet)} == {"AdaptedLayer"}


def test_fusing_qkv_after_inject_is_refused_and_changes_nothing():
    unet = pv.inject(tiny_unet(), pv.PSOFTConfig(rank=4))
    randomize_adapters(unet, std=0.2)
    expected, before = out(unet), snapshot(unet)
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    with pytest.raises(pv.UnsupportedLayerError, match="holds psoft_vision adapters.*merge_and_unload"):
        unet.fuse_qkv_projections()
    assert_same(unet, before)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    assert torch.equal(out(unet), expected)
    with pv.disabled(unet):  # the adapters still act, and can still be switched off
        assert rel_err(out(unet), out(tiny_unet())) < 1e-6


def test_fusing_is_allowed_again_on_the_plain_model():
    unet = pv.inject(tiny_unet(), pv.PSOFTConfig(rank=4))
    randomize_adapters(unet, std=0.2)
    expected = out(unet)
    for undo in (pv.merge_and_unload, pv.remove):
        model = copy.deepcopy(unet)
        undo(model)
        model.fuse_qkv_projections()
        assert rel_err(out(model), expected if undo is pv.merge_and_unload else out(tiny_unet())) < 1e-5


@pytest.mark.parametrize("load", [False, True], ids=["inject", "load_adapter"])
def test_inject_into_a_fused_unet_is_refused_until_unfused(tmp_path, load):
    source = pv.inject(tiny_unet(), pv.PSOFTConfig(rank=4))
    randomize_adapters(source, std=0.2)
    path = pv.save_adapter(source, tmp_path / "a.safetensors")
    unet = tiny_unet()
    unet.fuse_qkv_projections()
    before = snapshot(unet)
    attempt = (lambda: pv.load_adapter(unet, path)) if load else (lambda: pv.inject(unet, pv.PSOFTConfig(rank=4)))
    with pytest.raises(pv.UnsupportedLayerError, match="projections are fused.*unfuse_qkv_projections"):
        attempt()
    assert_same(unet, before)
    unet.unfuse_qkv_projections()
    pv.load_adapter(unet, path)
    assert rel_err(out(unet), out(source)) < 1e-5  # exactly what was saved, not 4% off
