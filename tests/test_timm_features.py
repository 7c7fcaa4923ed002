"""Training features users of timm expect, on adapted models: gradient checkpointing (gradients as without it),
torch.compile (same outputs and gradients, one graph: ``fullgraph=True`` fails on any graph break),
channels_last convolution models (same outputs and gradients as contiguous ones, merged or not), torch.fx tracing
(the graph computes the rotations and trains the adapters), timm's ``features_only`` wrappers (injected before or
after wrapping) and TorchScript (a named refusal; torch.export deploys). tests/test_zoo.py checks fx and the
wrappers' layer sets on every family of its subset.

torch.compile runs with the ``aot_eager`` backend: Dynamo captures the graph and AOTAutograd traces the backward,
which is where graph breaks and autograd.Function trouble show, without inductor's code generation (1 to 2.5
minutes per tiny model on 2 CPU cores; it agreed to 3e-6 in a manual run).
"""

import functools
import gc

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


# -------------------------------------------------------------------------------------------------------- torch.fx
@pytest.mark.parametrize("method", list(CONFIGS))
def test_fx_traced_model_computes_the_rotations_and_trains_the_adapters(method):
    """Traced without gradients, where the eager forward would take a cached rotation: the graph reads the adapter
    parameters (no rotation baked in as a constant), and a training step on the traced module moves the adapters
    exactly as it moves them eagerly."""
    model, x = adapted("resnet", method)
    model.eval()
    with torch.no_grad():
        model(x)  # fills the eager cache, which tracing must not read
        traced = torch.fx.symbolic_trace(model)
    assert {f"{n}.adapters.default.q" for n, _ in pv.adapted_layers(model)} <= \
        {node.target for node in traced.graph.nodes if node.op == "get_attr"}
    constants = [functools.reduce(getattr, node.target.split("."), traced) for node in traced.graph.nodes
                 if node.op == "get_attr" and "_tensor_constant" in node.target]
    assert not [c for c in constants if c.is_floating_point()]  # only index tensors; a rotation would be float
    out, expected = adapter_grads(model, x)
    traced_out, grads = adapter_grads(traced, x)
    assert rel_err(traced_out, out) <= 1e-5
    assert_close(grads, expected, 1e-4)  # per tensor, some of them tiny: the zoo's fx check bounds them at 1e-5 of all
    optimizer = torch.optim.SGD([p for p in traced.parameters() if p.requires_grad], lr=1.0)
    optimizer.step()  # the traced module shares the model's parameters
    with torch.no_grad():
        assert rel_err(traced(x), model(x)) <= 1e-5 and rel_err(model(x), out) > 1e-4


@pytest.mark.parametrize("method", list(CONFIGS))
def test_tracing_keeps_nothing_of_the_trace_alive(method):
    """Every Proxy, and with it the traced graph and module, is freed with the traced module: tracing a model again
    and again (a sweep, a feature extractor per task) must not grow memory."""
    model, _ = adapted("resnet", method)
    del model  # everything up to here may be collected
    gc.collect()
    before = sum(isinstance(o, torch.fx.Proxy) for o in gc.get_objects())
    traced = torch.fx.symbolic_trace(adapted("resnet", method)[0])
    del traced
    gc.collect()
    assert sum(isinstance(o, torch.fx.Proxy) for o in gc.get_objects()) == before


# --------------------------------------------------------------------------------------- features_only wrappers
def _wrap(model: nn.Module, feature_cls: str) -> nn.Module:
    """``model`` wrapped as ``create_model(..., features_only=True, feature_cls=...)`` wraps it (timm's builder)."""
    from timm.models._builder import pretrained_cfg_for_features
    from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet
    from timm.models._features_fx import FeatureGraphNet

    cls = {"list": FeatureListNet, "dict": FeatureDictNet, "hook": FeatureHookNet, "getter": FeatureGetterNet,
           "fx": FeatureGraphNet}[feature_cls]
    wrapper = cls(model, out_indices=(1, 2, 3))
    wrapper.pretrained_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return wrapper


@pytest.mark.parametrize("feature_cls", ["list", "dict", "hook", "getter", "fx"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_inject_then_wrap_gives_the_adapted_features_and_trains_the_kept_adapters(feature_cls, method):
    """Injected into the full model, then wrapped: the wrapper's features are the adapted model's intermediates and
    their gradient reaches the adapters of the stages kept (fx included: the graph computes the rotations)."""
    model, x = adapted("resnet", method)
    model.eval()
    expected = model.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    wrapper = _wrap(model, feature_cls)
    features = wrapper(x)
    features = list(features.values()) if isinstance(features, dict) else features
    assert len(features) == 3 and all(rel_err(f, e) <= 1e-5 for f, e in zip(features, expected, strict=True))
    model.zero_grad(set_to_none=True)
    features[-1].pow(2).mean().backward()
    kept = [p for n, p in model.named_parameters() if ".adapters." in n and n.startswith(("layer1.", "layer2.",
                                                                                             "layer3."))]
    assert kept and all(p.grad is not None and p.grad.any() for p in kept)


@pytest.mark.parametrize("feature_cls", ["list", "dict", "hook", "getter", "fx"])
def test_wrap_then_inject_adapts_the_full_models_layers_of_the_kept_stages(feature_cls):
    """The same layer objects: ``targets="auto"`` on the wrapper picks those it picks on the full model, among the
    ones the wrapper keeps (resnet's last stage is dropped, its stem kept and never adapted)."""
    model = timm.create_model("resnet10t", pretrained=False)
    full = [model.get_submodule(n) for n in pv.targets.select(model, "auto")]  # kept alive: ids stay unique
    wrapper = _wrap(model, feature_cls)
    kept = {id(m) for _, m in wrapper.named_modules()}
    chosen = [wrapper.get_submodule(n) for n in pv.targets.select(wrapper, "auto")]
    assert chosen and {id(m) for m in chosen} == {id(m) for m in full} & kept
    assert id(model.conv1[0]) in kept and id(model.conv1[0]) not in {id(m) for m in chosen}  # the stem


@pytest.mark.parametrize("model_name", ["poolformerv2_s12", "cait_xxs24_224"])
def test_the_fx_wrapper_adapts_the_full_models_layers_where_only_its_containers_show_the_blocks(model_name):
    """FeatureGraphNet keeps the modules its graph calls, in plain containers: MetaFormer's blocks are known by its
    Sequential stages only (it has no group_matcher), and CaiT's group_matcher counts ``len(self.blocks)``."""
    full = timm.create_model(model_name, pretrained=False)
    wrapper = timm.create_model(model_name, pretrained=False, features_only=True, feature_cls="fx")
    kept = {n.removeprefix("graph_module.") for n, _ in wrapper.named_modules()}
    chosen = {n.removeprefix("graph_module.") for n in pv.targets.select(wrapper, "auto")}
    assert chosen and chosen == set(pv.targets.select(full, "auto")) & kept


# ------------------------------------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("merged", [False, True])
def test_torchscript_refuses_by_name_and_torch_export_deploys(merged):
    model, x = adapted("resnet", "psoft")
    model.eval()
    with torch.no_grad():
        expected = model(x)
        if merged:
            pv.merge(model)
        with pytest.raises(pv.TorchScriptError, match=r"psoft_vision\.merge\(model\).*torch\.export\.export"):
            torch.jit.script(model)
        assert rel_err(model(x), expected) <= 1e-5  # the refusal left the model as it was
        exported = torch.export.export(model, (x,))
        assert rel_err(exported.module()(x), expected) <= 1e-5
