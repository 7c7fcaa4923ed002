"""Training features users of timm expect, on adapted models: gradient checkpointing (gradients as without it),
torch.compile (same outputs and gradients, one graph: ``fullgraph=True`` fails on any graph break) and
channels_last convolution models (same outputs and gradients as contiguous ones, merged or not).

torch.compile runs with the ``aot_eager`` backend: Dynamo captures the graph and AOTAutograd traces the backward,
which is where graph breaks and autograd.Function trouble show, without inductor's code generation (1 to 2.5
minutes per tiny model on 2 CPU cores; it agreed to 3e-6 in a manual run).
"""

import pytest
import timm
import torch
from helpers import rel_err
from torch import nn

import psoft_vision as pv
from psoft_vision.testing import emulate_pretrained, randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {"psoft": lambda: pv.PSOFTConfig(rank=4), "oft": lambda: pv.OFTConfig(block_size=8)}
MODELS = {
    "vit": ("vit_tiny_patch16_224", {"depth": 2, "img_size": 64}),
    "resnet": ("test_resnet", {}),
    "convnext": ("test_convnext", {"depths": (1, 1, 1, 1)}),
    "efficientnet_same": ("test_efficientnet", {"pad_type": "same"}),  # Conv2dSame: the weight path
}


def adapted(model: str, method: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A small timm model with every zero parameter given signal, adapted by ``method`` with random adapters."""
    name, kwargs = MODELS[model]
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, **kwargs)
    emulate_pretrained(net)
    pv.inject(net, CONFIGS[method]())
    randomize_adapters(net, seed=seed + 1)
    return net, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 2))


def adapter_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.pow(2).mean().backward()
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()  # a compiled model's names
                          for n, p in model.named_parameters() if p.requires_grad}


def assert_close(grads: dict, expected: dict, tol: float) -> None:
    assert grads.keys() == expected.keys() and expected
    errors = {n: rel_err(g, expected[n]) for n, g in grads.items()}
    assert max(errors.values()) <= tol, sorted(errors.items(), key=lambda e: -e[1])[:3]


# ------------------------------------------------------------------------------------------ grad checkpointing
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("model_name", ["vit", "resnet"])
def test_grad_checkpointing_gives_the_same_gradients(model_name, method):
    model, x = adapted(model_name, method)
    model.train()
    out, expected = adapter_grads(model, x)
    calls = []
    first_block = model.blocks[0] if model_name == "vit" else model.layer1[0]
    first_block.register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute may stop before the end
    model.set_grad_checkpointing(True)
    checkpointed_out, grads = adapter_grads(model, x)
    assert len(calls) == 2  # the block ran again in the backward: checkpointing was on
    assert torch.equal(checkpointed_out, out)
    assert_close(grads, expected, 1e-6)


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.compile
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("model_name", ["vit", "convnext"])
def test_compiled_model_is_one_graph_with_the_same_outputs_and_gradients(model_name, method):
    """OFTv2's default Cayley-Neumann transform used to break the graph once per layer (a Python branch on the
    norm of Q): psoft_vision.orthogonal now keeps both transforms in the graph when compiling."""
    model, x = adapted(model_name, method)
    model.train()
    out, expected = adapter_grads(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_out, grads = adapter_grads(compiled, x)
    assert rel_err(compiled_out, out) <= 1e-6
    assert_close(grads, expected, 1e-5)


@pytest.mark.compile
@pytest.mark.parametrize("method", list(CONFIGS))
def test_inference_forward_has_no_graph_break(method):
    """Eval mode without gradients takes the adapters' cached transforms: still one graph."""
    model, x = adapted("vit", method)
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        expected = model(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    torch._dynamo.reset()
    with torch.no_grad():
        assert rel_err(torch.compile(model, backend="aot_eager", fullgraph=True)(x), expected) <= 1e-6


# ------------------------------------------------------------------------------------------------ channels_last
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("model_name", ["resnet", "efficientnet_same"])
def test_channels_last_gives_the_same_outputs_and_gradients(model_name, method):
    model, x = adapted(model_name, method)
    model.eval()
    out, expected = adapter_grads(model, x)
    model.to(memory_format=torch.channels_last)
    x_last = x.to(memory_format=torch.channels_last)
    assert all(layer.base.weight.is_contiguous(memory_format=torch.channels_last)
               for _, layer in pv.adapted_layers(model) if layer.base.weight.ndim == 4)
    last_out, grads = adapter_grads(model, x_last)
    assert rel_err(last_out, out) <= 1e-5
    assert_close(grads, expected, 1e-4)
    with torch.no_grad():
        pv.merge(model)
        assert rel_err(model(x_last), out) <= 1e-5
        pv.unmerge(model)
        assert rel_err(model(x_last), out) <= 1e-5
