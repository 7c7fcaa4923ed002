"""The adapters' transforms built together, once per training forward (psoft_vision/batching.py): the same outputs,
gradients and optimizer steps as each layer building its own, in every situation where a layer may or may not take
its part of the batch."""

import pytest
import timm
import torch
import torch.utils.checkpoint
from torch import nn

import psoft_vision as pv
from psoft_vision import batching
from psoft_vision.testing import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "psoft": lambda: pv.PSOFTConfig(rank=4),
    "psoft-neumann": lambda: pv.PSOFTConfig(rank=4, neumann_terms=4),
    "psoft-no-scaling": lambda: pv.PSOFTConfig(rank=4, train_alpha=False, train_beta=False),
    "psoft-split-qkv": lambda: pv.PSOFTConfig(rank=4, split_qkv=True),
    "oft": lambda: pv.OFTConfig(block_size=8),
    "oft-exact": lambda: pv.OFTConfig(block_size=8, neumann_terms=None),
}


def vit(config, seed=0, std=0.05) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=5)
    pv.inject(model, config)
    randomize_adapters(model, seed=seed + 1, std=std)
    return model.train()


def images(seed=2) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def step_grads(model, x) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def each_layer_alone(model) -> nn.Module:
    """The model without its batching hooks: every layer builds its own transform, as before batching."""
    batching.detach(model)
    return model


def parts_taken(model) -> int:
    """How many adapters of ``model`` took their part of a batch in the last forward."""
    from psoft_vision.adapter import _TAKEN

    return sum(1 for _, layer in pv.adapted_layers(model) for a in layer.adapters.values() if a in _TAKEN)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_batched_step_equals_each_layer_alone(method):
    model, alone = vit(CONFIGS[method]()), each_layer_alone(vit(CONFIGS[method]()))
    x = images()
    out, grads = step_grads(model, x)
    assert parts_taken(model) == 8  # qkv, proj, fc1, fc2 of two blocks
    expected_out, expected = step_grads(alone, x)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-6)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["psoft", "oft"])
def test_three_adamw_steps_follow_each_layer_alone(method):
    runs = []
    for model in (vit(CONFIGS[method]()), each_layer_alone(vit(CONFIGS[method]()))):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
        for seed in range(3):
            model(images(seed)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in runs[0].items():
        torch.testing.assert_close(value, runs[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_neumann_falls_back_to_the_exact_transform_per_layer_without_a_sync():
    """One layer's q past the bound takes the exact solve; the others keep the series: as each layer alone."""
    model, alone = (vit(CONFIGS["oft"](), std=0.01) for _ in range(2))
    each_layer_alone(alone)
    with torch.no_grad():
        for m in (model, alone):
            m.blocks[0].attn.qkv.adapters["default"].q[0].fill_(0.3)  # ||Q||_F far above 0.5
    _, grads = step_grads(model, images())
    _, expected = step_grads(alone, images())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_blocks_give_the_same_gradients(reentrant):
    """Non-reentrant checkpointing recomputes a block with the parts it took; reentrant checkpointing ran the block
    without gradients, so the recomputation builds each layer's own transform (its nested backward must not run
    through the shared batch)."""
    model = vit(CONFIGS["psoft"]())
    x = images().requires_grad_()  # reentrant checkpointing passes gradients only to inputs that require them
    out, expected = step_grads(model, x)
    blocks = model.blocks
    model.blocks = nn.Sequential(*[_Checkpointed(block, reentrant) for block in blocks])
    checkpointed_out, grads = step_grads(model, x)
    torch.testing.assert_close(checkpointed_out, out, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name.replace(".block.", ".")], rtol=1e-5, atol=1e-7, msg=name)


class _Checkpointed(nn.Module):
    def __init__(self, block, reentrant):
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)


def test_a_layer_called_outside_the_models_forward_builds_its_own():
    """``forward_features`` skips the model's hooks: two such forwards, each with its own backward, never share one
    graph (the second backward would fail on freed buffers)."""
    model, alone = vit(CONFIGS["psoft"]()), each_layer_alone(vit(CONFIGS["psoft"]()))
    model(images())  # a batch built for a forward that has ended
    for m in (model, alone):
        for seed in (3, 4):
            m.forward_features(images(seed)).pow(2).mean().backward()
    for (name, p), q in zip(model.named_parameters(), alone.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_parameter_changed_in_place_after_the_batch_was_built_is_read_fresh():
    model = vit(CONFIGS["psoft"]())
    adapter = model.blocks[1].mlp.fc2.adapters["default"]

    def nudge(module, args):
        with torch.no_grad():
            adapter.q.add_(0.01)

    model.blocks[1].register_forward_pre_hook(nudge)  # after the model's pre-hook built the batch
    out, _ = step_grads(model, images())
    assert parts_taken(model) == 7
    batching.detach(model)
    with torch.no_grad():
        adapter.q.sub_(0.01)
    expected, _ = step_grads(model, images())  # each layer alone, with the same nudge
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_layers_of_another_dtype_build_apart_and_eval_uses_the_cache():
    model = vit(CONFIGS["psoft"]())
    model.blocks[0].double()  # its adapters get another batch key
    model.blocks[0].register_forward_pre_hook(lambda m, a: (a[0].double(),))
    model.blocks[0].register_forward_hook(lambda m, a, out: out.float())
    step_grads(model, images())
    assert parts_taken(model) == 8
    model.eval()
    with torch.no_grad():
        first = model(images())
        assert torch.equal(model(images()), first)


def test_remove_takes_the_hooks_away_and_a_copy_keeps_them():
    import copy
    import pickle

    model = vit(CONFIGS["psoft"]())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(step_grads(clone, images())[0], step_grads(model, images())[0], rtol=0, atol=0)
        assert parts_taken(clone) == 8
    pv.remove(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_inject_on_an_outer_model_takes_over_the_inner_hooks():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=5)
    pv.inject(model.blocks, pv.PSOFTConfig(rank=4, targets=r".*\.(qkv|proj|fc1|fc2)"))
    assert len(model.blocks._forward_pre_hooks) == 1
    pv.inject(model, pv.OFTConfig(block_size=8), name="style")
    assert not model.blocks._forward_pre_hooks and len(model._forward_pre_hooks) == 1
    randomize_adapters(model)
    step_grads(model.train(), images())
    assert parts_taken(model) == 8  # the trained adapter of every layer (inject froze the first one)
    for _, layer in pv.adapted_layers(model):
        layer.adapters["default"].requires_grad_(True)
    step_grads(model, images())
    assert parts_taken(model) == 16  # both adapters of every layer, from the outer model's batch


def test_ddp_trains_as_each_layer_alone(tmp_path):
    """DistributedDataParallel (one gloo process) calls the model's own forward: the batch is built, and the
    gradients DDP reduces are those of each layer alone."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, alone = vit(CONFIGS["oft"]()), each_layer_alone(vit(CONFIGS["oft"]()))
        wrapped = DistributedDataParallel(model)
        _, grads = step_grads(wrapped, images())
        assert parts_taken(model) == 8
    finally:
        dist.destroy_process_group()
    _, expected = step_grads(alone, images())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name.removeprefix("module.")], rtol=1e-5, atol=1e-7, msg=name)
