"""An adapted model keeps the ordinary PyTorch module contract: ``state_dict`` round trips (strict, merged or not,
into a model of another initialisation, after ``to_empty``), accelerate's ``save_state`` / ``load_state``, caches
that follow dtype, device and autocast, ``torch.export``, the meta device and accelerate's CPU offloading."""

import copy

import pytest
import timm
import torch

import psoft_vision as pv
from psoft_vision.formats.lora_factors import lora_weights
from psoft_vision.testing import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {"psoft": lambda: pv.PSOFTConfig(rank=4), "oft": lambda: pv.OFTConfig(block_size=8)}


def vit(method: str, seed: int = 0) -> torch.nn.Module:
    """A small ViT whose base weights depend on ``seed``, with randomised adapters of ``method``."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=5)
    pv.inject(model, CONFIGS[method]())
    randomize_adapters(model, seed=seed + 1)
    return model.eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def out(model) -> torch.Tensor:
    return model(X)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("merged", [False, True])
def test_state_dict_loads_strictly_into_a_model_of_another_initialisation(method, merged):
    model, other = vit(method, seed=0), vit(method, seed=1)
    pv.set_strength(model, 0.7)
    expected = out(model)
    if merged:
        pv.merge(model)
    other.load_state_dict(model.state_dict())  # strict
    assert torch.equal(out(pv.unmerge(other)), expected)
    assert all(a.strength == 0.7 for _, layer in pv.adapted_layers(other) for a in layer.adapters.values())


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_merged_state_is_merged_again_on_load_and_unmerges_bit_for_bit(method):
    model, other = vit(method, seed=0), vit(method, seed=1)
    pretrained = {n: layer.base.weight.clone() for n, layer in pv.adapted_layers(model)}
    pv.merge(model)
    merged_out = out(model)
    state = model.state_dict()
    assert all(torch.equal(state[f"{n}.base.weight"], w) for n, w in pretrained.items())  # never the merged weight
    pv.merge(other)  # loading into a merged model too
    other.load_state_dict(state)
    assert all(layer.merged == ["default"] for _, layer in pv.adapted_layers(other))
    torch.testing.assert_close(out(other), merged_out, rtol=0, atol=1e-6)
    pv.unmerge(other)
    assert all(torch.equal(layer.base.weight, pretrained[n]) for n, layer in pv.adapted_layers(other))


def test_inactive_adapters_stay_inactive_through_the_state_dict():
    model, other = vit("psoft", seed=0), vit("psoft", seed=1)
    for m in (model, other):
        pv.inject(m, pv.OFTConfig(block_size=8), name="style")
        randomize_adapters(m, seed=5)
    pv.activate(model, ["style"])
    other.load_state_dict(model.state_dict())
    assert all(layer.active == ["style"] for _, layer in pv.adapted_layers(other))
    assert torch.equal(out(other), out(model))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_to_empty_then_load_state_dict_is_exact(method):
    model = vit(method)
    empty = copy.deepcopy(model).to_empty(device="cpu")
    empty.load_state_dict(model.state_dict())
    assert torch.equal(out(empty), out(model))


def test_a_state_from_other_adapters_is_refused_by_name():
    model, other = vit("psoft"), vit("psoft")
    pv.inject(model, pv.OFTConfig(block_size=8), name="style")
    state = {k: v for k, v in model.state_dict().items() if ".style." not in k}  # the tensors fit; the state does not
    with pytest.raises(pv.KeyMismatchError, match="inject the same adapters"):
        other.load_state_dict(state)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_accelerate_save_state_and_load_state_resume_exactly(method, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = vit(method).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(X).pow(2).mean().backward()
    optimizer.step()
    accelerator.save_state(tmp_path / "state")  # safetensors: every entry of the state dict must be a tensor
    expected = out(model.eval())

    resumed = Accelerator(cpu=True)  # a new process would make its own
    other = vit(method, seed=3)
    other_optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    other, other_optimizer = resumed.prepare(other, other_optimizer)
    resumed.load_state(tmp_path / "state")
    assert torch.equal(out(other.eval()), expected)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_an_autocast_forward_leaves_fp32_results_and_merges_alone(method):
    model = vit(method)
    expected = out(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out(model)  # would cache bf16 transforms, if the cache ignored the autocast state
        assert torch.equal(out(model).float(), out(model).float())
    assert torch.equal(out(model), expected)
    reference = copy.deepcopy(model)
    pv.merge(reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pv.merge(model)
        factors = lora_weights(model) if method == "psoft" else None
    assert all(torch.equal(a.base.weight, b.base.weight)
               for (_, a), (_, b) in zip(pv.adapted_layers(model), pv.adapted_layers(reference), strict=True))
    if factors is not None:
        assert all(up.dtype == torch.float32 for up, _ in factors.values())
        torch.testing.assert_close(factors, lora_weights(reference), rtol=0, atol=0)


def test_a_cast_model_does_not_reuse_a_cache_of_another_dtype():
    model = vit("oft")
    out(model)
    model.double()
    with torch.no_grad():
        assert model(X.double()).dtype == torch.float64


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("grad", [False, True])
def test_torch_export_of_an_unmerged_model(method, grad):
    model = vit(method)
    with torch.set_grad_enabled(grad):
        exported = torch.export.export(model, (X,))
    torch.testing.assert_close(exported.module()(X), out(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_the_meta_device_runs_where_the_plain_model_runs(method):
    model = copy.deepcopy(vit(method)).to("meta").train()
    y = model(X.to("meta"))
    assert y.shape == (2, 5) and y.is_meta
    y.sum().backward()


@pytest.mark.parametrize("method", list(CONFIGS))
def test_accelerate_cpu_offload_runs_and_refuses_what_needs_the_weights_by_name(method, tmp_path):
    from accelerate import cpu_offload

    model = vit(method)
    expected = out(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert torch.equal(out(model), expected)
    model.train()
    model(X).pow(2).mean().backward()
    for attempt in (lambda: pv.merge(model), lambda: pv.save_adapter(model, tmp_path / "a.safetensors")):
        with pytest.raises(pv.WeightsNotLoadedError, match="remove_hook_from_submodules"):
            attempt()
    assert not (tmp_path / "a.safetensors").exists()
