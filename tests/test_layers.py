"""PSOFT and OFTv2 on single Linear and Conv2d layers: identities, merges, geometry, counts, options."""

import pytest
import torch
from helpers import rel_err
from torch import nn

import psoft_vision as pv
from psoft_vision.methods import principal_subspace
from psoft_vision.testing import randomize_adapters


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


# name: (layer factory, input shape, OFT block size)
LAYERS = {
    "linear": (lambda: nn.Linear(64, 96), (4, 10, 64), 16),
    "conv3x3": (lambda: nn.Conv2d(16, 24, 3, padding=1), (2, 16, 32, 32), 8),
    "conv_stride2": (lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 33, 33), 8),
    "conv_dilation2": (lambda: nn.Conv2d(16, 24, 3, padding=2, dilation=2), (2, 16, 32, 32), 4),
    "conv_3x5": (lambda: nn.Conv2d(16, 24, (3, 5), padding=(1, 2)), (2, 16, 20, 28), 8),
    "conv_1x1_nobias": (lambda: nn.Conv2d(16, 24, 1, bias=False), (2, 16, 16, 16), 16),
    "patch_embed_16x16": (lambda: nn.Conv2d(3, 32, 16, stride=16), (2, 3, 64, 64), 3),
    # the weight path: layers whose forward is not the plain one, adapted through their (adapted) weight
    "conv_grouped": (lambda: nn.Conv2d(16, 24, 3, padding=1, groups=4), (2, 16, 32, 32), 2),
    "conv_reflect": (lambda: nn.Conv2d(16, 24, 3, padding=1, padding_mode="reflect"), (2, 16, 32, 32), 8),
    "linear_standardised": (lambda: StandardisedLinear(64, 96), (4, 10, 64), 16),
}


class StandardisedLinear(nn.Linear):
    """A weight-standardised linear (like timm's StdConv2d): its output is not linear in its stored weight."""

    def forward(self, x):
        centred = self.weight - self.weight.mean(1, keepdim=True)
        return nn.functional.linear(x, centred / centred.std(1, keepdim=True), self.bias)

CASES = [(method, name) for method in ("psoft", "oft") for name in LAYERS]


def build(method: str, name: str, **options):
    factory, shape, block = LAYERS[name]
    model = Holder(factory())
    config = (pv.PSOFTConfig(rank=8, targets=["layer"], **options) if method == "psoft"
              else pv.OFTConfig(block_size=block, targets=["layer"], **options))
    reference = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(shape)
    expected = model(x).detach()
    pv.inject(model, config)
    return model, x, expected, reference


@pytest.mark.parametrize("method,name", CASES)
def test_identity_at_init(method, name):
    model, x, expected, _ = build(method, name)
    assert rel_err(model(x), expected) <= 1e-5


@pytest.mark.parametrize("neumann_terms", [None, 4])
@pytest.mark.parametrize("method,name", CASES)
def test_merged_equals_unmerged_and_unmerge_restores(method, name, neumann_terms):
    model, x, _, reference = build(method, name, neumann_terms=neumann_terms)
    randomize_adapters(model)
    adapted = model(x).detach()
    assert rel_err(adapted, model.layer.base(x)) > 1e-3  # the adapter really changes the layer
    pv.merge(model)
    assert model.layer.merged == ["default"]
    assert rel_err(model(x), adapted) <= 1e-5
    assert rel_err(model.layer.base(x), adapted) <= 1e-5
    pv.unmerge(model)
    assert rel_err(model(x), adapted) <= 1e-5
    assert rel_err(model.layer.base.weight, reference[0]) <= 1e-6


@pytest.mark.parametrize("name", ["linear", "conv3x3", "patch_embed_16x16"])
def test_psoft_without_scalings_keeps_pretrained_geometry(name):
    """W' W'^T = W W^T and the singular values are unchanged (SPEC 1.6); the scalings relax it on purpose."""
    model, _, _, reference = build("psoft", name, train_alpha=False, train_beta=False)
    randomize_adapters(model, std=0.3)
    w = reference[0].flatten(1).double()
    pv.merge(model)
    merged = model.layer.base.weight.flatten(1).double()
    assert (merged - w).norm() / w.norm() > 1e-2
    assert rel_err(merged @ merged.T, w @ w.T) <= 1e-5
    assert rel_err(torch.linalg.svdvals(merged), torch.linalg.svdvals(w)) <= 1e-5

    scaled, _, _, reference = build("psoft", name)
    randomize_adapters(scaled, std=0.3)
    pv.merge(scaled)
    merged = scaled.layer.base.weight.flatten(1).double()
    w = reference[0].flatten(1).double()
    assert rel_err(merged @ merged.T, w @ w.T) > 1e-3


def test_parameter_counts_and_requires_grad():
    model, *_ = build("psoft", "linear")
    adapter = model.layer.adapters["default"]
    assert sum(p.numel() for p in adapter.parameters()) == 8 * 7 // 2 + 2 * 8
    big = Holder(nn.Linear(768, 768))
    pv.inject(big, pv.PSOFTConfig(rank=46, targets=["layer"]))
    assert sum(p.numel() for p in big.parameters() if p.requires_grad) == 1127
    no_scales = Holder(nn.Linear(64, 64))
    pv.inject(no_scales, pv.PSOFTConfig(rank=8, targets=["layer"], train_alpha=False, train_beta=False))
    assert sum(p.numel() for p in no_scales.parameters() if p.requires_grad) == 28

    oft, *_ = build("oft", "linear")  # 64 inputs, block 16
    assert sum(p.numel() for p in oft.parameters() if p.requires_grad) == (64 // 16) * (16 * 15 // 2)
    assert not any(p.requires_grad for p in oft.layer.base.parameters())


def test_rank_larger_than_the_layer_is_clamped_with_a_warning():
    model = Holder(nn.Linear(12, 6))
    with pytest.warns(UserWarning, match="rank 46 exceeds"):
        pv.inject(model, pv.PSOFTConfig(rank=46, targets=["layer"]))
    assert model.layer.adapters["default"].rank == 6
    conv = Holder(nn.Conv2d(2, 40, 3))  # fan-in 2 * 3 * 3 = 18
    with pytest.warns(UserWarning, match="using rank 18"):
        pv.inject(conv, pv.PSOFTConfig(rank=46, targets=["layer"]))


def test_split_qkv_gives_q_k_v_their_own_subspaces():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(32, 96)

        def forward(self, x):
            return self.qkv(x)

    model = Attention()
    w = model.qkv.weight.detach().clone()
    x = torch.randn(5, 32)
    expected = model(x).detach()
    pv.inject(model, pv.PSOFTConfig(rank=6, targets=["qkv"], split_qkv=True))
    adapter = model.qkv.adapters["default"]
    assert adapter.chunks == 3
    assert sum(p.numel() for p in adapter.parameters()) == 3 * (15 + 12)
    assert rel_err(model(x), expected) <= 1e-5
    for chunk in range(3):  # each chunk's A spans the top singular directions of its own rows
        a_expected, _ = principal_subspace(w[32 * chunk : 32 * (chunk + 1)], 6)
        assert torch.allclose(adapter.A[6 * chunk : 6 * (chunk + 1)], a_expected, atol=1e-6)
    with torch.no_grad():
        adapter.q[1].normal_(0, 0.1)  # only k's rotation moves
    delta = adapter.delta_weight()
    assert delta[32:64].abs().max() > 1e-3
    assert delta[:32].abs().max() == 0 and delta[64:].abs().max() == 0
    randomize_adapters(model)
    adapted = model(x).detach()
    pv.merge(model)
    assert rel_err(model(x), adapted) <= 1e-5


def test_psoft_dropout_acts_on_the_adapter_path_only():
    model, x, expected, _ = build("psoft", "linear", dropout=0.5)
    model.train()
    assert rel_err(model(x), expected) <= 1e-5  # at init the adapter path is zero, dropped or not
    randomize_adapters(model)
    first, second = model(x), model(x)
    assert rel_err(first, second) > 1e-4
    model.eval()
    assert torch.equal(model(x), model(x))


def test_oft_dropout_is_applied_in_training_only():
    model, x, expected, _ = build("oft", "linear", dropout=0.5)
    model.train()
    assert rel_err(model(x), expected) <= 1e-5
    randomize_adapters(model, std=0.2)
    outputs = [model(x) for _ in range(4)]
    assert max(rel_err(o, outputs[0]) for o in outputs[1:]) > 1e-4
    model.eval()
    assert torch.equal(model(x), model(x))


def test_oft_block_size_must_divide_the_input_width():
    model = Holder(nn.Linear(100, 10))
    with pytest.raises(pv.BlockSizeError, match=r"block_size=32 does not divide its input width 100.*\[2, 4, 5, 10"):
        pv.inject(model, pv.OFTConfig(block_size=32, targets=["layer"]))
    assert isinstance(model.layer, nn.Linear)  # untouched


def test_unsupported_layers_are_refused_by_name():
    refused = {
        "LayerNorm": nn.LayerNorm(8),
        "ConvTranspose2d": nn.ConvTranspose2d(8, 8, 3),
        "Conv1d": nn.Conv1d(8, 8, 3),
        "no materialised weight": nn.LazyLinear(8),
        "empty weight": nn.Linear(4, 0),
        "torch.nn.utils.weight_norm": nn.utils.weight_norm(nn.Linear(8, 8)),
        "a parametrization": nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)),
    }
    for reason, layer in refused.items():
        for config in (pv.PSOFTConfig(rank=4, targets=["layer"]), pv.OFTConfig(block_size=4, targets=["layer"])):
            model = Holder(layer)
            with pytest.raises(pv.UnsupportedLayerError, match=f"'layer'.*{reason}"):
                pv.inject(model, config)
            assert model.layer is layer


def test_depthwise_convs_take_psoft_per_channel_and_refuse_oft():
    depthwise = Holder(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    with pytest.raises(pv.UnsupportedLayerError, match="'layer' is a depthwise convolution"):
        pv.inject(depthwise, pv.OFTConfig(block_size=2, targets=["layer"]))
    x = torch.randn(2, 8, 16, 16)
    expected = depthwise(x).detach()
    with pytest.warns(UserWarning, match="using rank 1"):  # a 1 x 9 weight per group has rank 1
        pv.inject(depthwise, pv.PSOFTConfig(rank=4, targets=["layer"]))
    assert rel_err(depthwise(x), expected) <= 1e-6
    randomize_adapters(depthwise)
    adapted = depthwise(x)
    adapted.square().mean().backward()
    trained = [p for p in depthwise.parameters() if p.requires_grad and p.numel()]  # rank 1: Q has no entries
    assert trained and all(p.grad is not None and p.grad.abs().max() > 0 for p in trained)
    pv.merge(depthwise)
    assert rel_err(depthwise(x), adapted.detach()) <= 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank=0"), (dict(rank=2.5), "rank=2.5"), (dict(svd="qr"), "svd='qr'"),
    (dict(dropout=1.0), "dropout=1.0"), (dict(neumann_terms=0), "neumann_terms=0"),
])
def test_bad_psoft_config_values_are_named(kwargs, match):
    with pytest.raises(pv.ConfigError, match=match):
        pv.PSOFTConfig(**kwargs)


def test_bad_oft_config_values_are_named():
    with pytest.raises(pv.ConfigError, match="block_size=1"):
        pv.OFTConfig(block_size=1)


def test_subspace_signs_are_canonical_and_lowrank_agrees():
    torch.manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(80, 80))
    v, _ = torch.linalg.qr(torch.randn(60, 60))
    s = 0.7 ** torch.arange(60.0)
    w = u[:, :60] @ torch.diag(s) @ v.T
    a, b = principal_subspace(w, 10)
    pivot = b.abs().argmax(dim=0)
    assert (b[pivot, torch.arange(10)] > 0).all()
    assert torch.allclose(a @ a.T, torch.eye(10), atol=1e-5)
    a_neg, b_neg = principal_subspace(-w, 10)  # B keeps its canonical signs, A takes the flip
    assert torch.allclose(b_neg, b, atol=1e-5) and torch.allclose(a_neg, -a, atol=1e-5)
    a_low, b_low = principal_subspace(w, 10, svd="lowrank")
    assert torch.allclose(a_low, a, atol=1e-4) and torch.allclose(b_low, b, atol=1e-4)
    assert torch.equal(principal_subspace(w, 10, svd="lowrank")[0], a_low)  # seeded


FUSED_CASES = {  # layer case: (small input -> the r-wide path per token, large input -> the formed weight W + U A)
    "linear": ((2, 1, 64), (40, 1, 64)),
    "conv3x3": ((1, 16, 2, 2), (2, 16, 32, 32)),
    "conv_stride2": ((1, 16, 3, 3), (2, 16, 33, 33)),
    "conv_dilation2": ((1, 16, 2, 2), (2, 16, 32, 32)),
    "conv_3x5": ((1, 16, 2, 2), (2, 16, 20, 28)),
    "conv_1x1_nobias": ((1, 16, 1, 1), (2, 16, 16, 16)),
    "patch_embed_16x16": ((1, 3, 16, 16), (2, 3, 64, 64)),
}


@pytest.mark.parametrize("regime", [0, 1], ids=["per-token-path", "formed-weight-path"])
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_path_matches_the_generic_one_in_values_and_gradients(name, regime):
    """A plain frozen Linear or Conv2d runs with its PSOFT adapter in one autograd node; a hook on the base layer
    forces the generic path, which must give the same output and gradients."""
    outputs = []
    for force_generic in (False, True):
        torch.manual_seed(0)
        model = Holder(LAYERS[name][0]())
        pv.inject(model, pv.PSOFTConfig(rank=8, targets=["layer"]))
        randomize_adapters(model)
        if force_generic:
            model.layer.base.register_forward_hook(lambda module, args, out: None)
        x = torch.randn(FUSED_CASES[name][regime], generator=torch.Generator().manual_seed(5), requires_grad=True)
        y = model(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(6))).sum().backward()
        adapter = model.layer.adapters["default"]
        outputs.append((y.detach(), x.grad, adapter.q.grad, adapter.alpha.grad, adapter.beta.grad))
    for fused, generic in zip(*outputs, strict=True):
        assert rel_err(fused, generic) <= 1e-5


def test_psoft_runs_under_autocast():
    model, x, expected, _ = build("psoft", "linear")
    randomize_adapters(model)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), reference) <= 2e-2
    y.float().sum().backward()
    assert model.layer.adapters["default"].q.grad is not None


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (24, 144)], ids=["tall", "wide", "conv-like"])
def test_full_subspace_is_the_best_rank_r_approximation(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    a, b = principal_subspace(w, 10)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :10] * s[:10]) @ vh[:10]
    assert rel_err(b.double() @ a.double(), best) <= 1e-6
    assert torch.allclose(a @ a.T, torch.eye(10), atol=1e-6)


@pytest.mark.parametrize("weight", [torch.zeros(8, 20), torch.outer(torch.arange(1.0, 9.0), torch.ones(20))],
                         ids=["zero", "rank-one"])
def test_rank_deficient_weights_still_give_an_orthonormal_subspace(weight):
    a, b = principal_subspace(weight, 4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-5)
    assert torch.allclose(b @ a, weight, atol=1e-5)
