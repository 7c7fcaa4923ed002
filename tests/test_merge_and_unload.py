"""``pv.merge_and_unload``: the plain model with the adapters baked in, which every tool sees as an ordinary model
(issue 21)."""

import warnings

import diffusers
import pytest
import timm
import torch
from helpers import rel_err
from test_diffusers import tiny_unet, unet_inputs

import psoft_vision as pv
from psoft_vision.testing import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
CONFIGS = {"psoft": lambda: pv.PSOFTConfig(rank=4), "oft": lambda: pv.OFTConfig(block_size=4)}


def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10).eval()


def structure(model: torch.nn.Module) -> dict:
    return {name: type(module) for name, module in model.named_modules()}


@pytest.fixture(params=list(CONFIGS))
def unloaded(request):
    """(the merged-and-unloaded vit, the adapted model's output, the plain vit with its flags)"""
    plain = vit()
    plain.patch_embed.requires_grad_(False)  # a flag inject changes and merge_and_unload must give back
    model = vit()
    model.patch_embed.requires_grad_(False)
    pv.inject(model, CONFIGS[request.param](), name="a")
    pv.inject(model, CONFIGS[request.param](), name="b")  # stacked: both are baked in, in order
    randomize_adapters(model, std=0.2)
    with torch.no_grad():
        expected = model(X)
    assert pv.merge_and_unload(model) is model
    return model, expected, plain


def test_the_unloaded_model_is_the_plain_model_with_the_update(unloaded):
    model, expected, plain = unloaded
    assert structure(model) == structure(plain)  # nn.Linear, timm's own modules: no AdaptedLayer
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in plain.named_parameters()}
    assert not any(k.startswith("_psoft") for k in model.__dict__)
    with torch.no_grad():
        assert rel_err(model(X), expected) < 1e-5
        assert rel_err(plain(X), expected) > 1e-3  # the update is there


def test_the_unloaded_model_scripts_and_exports(unloaded):
    model, expected, _ = unloaded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    exported = torch.export.export(model, (X,))
    with torch.no_grad():
        assert rel_err(scripted(X), expected) < 1e-5
        assert rel_err(exported.module()(X), expected) < 1e-5


def test_a_merged_and_unloaded_unet_saves_and_loads_with_diffusers(tmp_path):
    unet = tiny_unet()
    pv.inject(unet, pv.PSOFTConfig(rank=4, targets="unet+conv"))
    randomize_adapters(unet, std=0.2)
    with torch.no_grad():
        expected = unet(**unet_inputs()).sample
    pv.merge_and_unload(unet)
    unet.save_pretrained(tmp_path / "unet")
    loaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert loaded.state_dict().keys() == tiny_unet().state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded(**unet_inputs()).sample, unet(**unet_inputs()).sample)
        assert rel_err(loaded(**unet_inputs()).sample, expected) < 1e-5


def test_merge_and_unload_refuses_a_quantized_base_and_changes_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pv.quantize_base(vit(), "int8")
    pv.inject(model, pv.PSOFTConfig(rank=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = structure(model)
    with pytest.raises(pv.MergeError, match="quantized bases"):
        pv.merge_and_unload(model)
    assert structure(model) == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
