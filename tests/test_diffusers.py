"""psoft_vision on tiny diffusers models (CPU, fp32, built from configs): the auto presets pick exactly the
attention / feed-forward layers, every adapter is the identity at init, merged == unmerged with non-zero adapter
parameters, unmerge restores the base weights, and stacked adapters merge in forward order."""

import copy

import diffusers
import pytest
import torch
from helpers import rel_err
from torch import nn

import psoft_vision as pv
from psoft_vision.methods import principal_subspace
from psoft_vision.testing import randomize_adapters

TOL = 1e-5  # relative error allowed between two fp32 forwards that must agree
CHANGED = 1e-3  # randomized adapters must move the output at least this much, or merged == unmerged proves nothing


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second intra-op thread gains nothing, and on a 2-core machine busy with other jobs
    OpenMP oversubscription made this file take 114 s with the default 2 threads against 9 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# tiny models and inputs


def tiny_unet(linear_projection: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=linear_projection,
    ).eval()


def unet_inputs() -> dict:
    gen = torch.Generator().manual_seed(1)
    return dict(
        sample=torch.randn(2, 4, 16, 16, generator=gen),
        timestep=torch.tensor([3, 500]),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=gen),
    )


def tiny_dit() -> nn.Module:
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, norm_num_groups=8,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )


def dit_inputs(gen: torch.Generator) -> dict:
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
        timestep=torch.tensor([3, 700]),
        class_labels=torch.tensor([1, 7]),
    )


def tiny_pixart() -> nn.Module:
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, norm_num_groups=8,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=24,
    )


def pixart_inputs(gen: torch.Generator) -> dict:
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(2, 5, 24, generator=gen),
        timestep=torch.tensor([3, 700]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def tiny_sd3(**extra) -> nn.Module:
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16, **extra,
    )


def sd3_inputs(gen: torch.Generator) -> dict:
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(2, 5, 24, generator=gen),
        pooled_projections=torch.randn(2, 12, generator=gen),
        timestep=torch.tensor([3, 700]),
    )


def tiny_flux() -> nn.Module:
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6),
    )


def flux_inputs(gen: torch.Generator) -> dict:
    height = width = 4  # 16 packed image tokens
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return dict(
        hidden_states=torch.randn(2, height * width, 8, generator=gen),
        encoder_hidden_states=torch.randn(2, 5, 24, generator=gen),
        pooled_projections=torch.randn(2, 12, generator=gen),
        timestep=torch.tensor([0.3, 0.9]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(5, 3),
    )


TRANSFORMERS = {
    "dit": (tiny_dit, dit_inputs),
    "pixart": (tiny_pixart, pixart_inputs),
    "sd3": (tiny_sd3, sd3_inputs),
    # SD3.5 style: a second (self-)attention `attn2` in the first block and RMS q/k norms.
    "sd3.5": (lambda: tiny_sd3(dual_attention_layers=(0,), qk_norm="rms_norm"), sd3_inputs),
    "flux": (tiny_flux, flux_inputs),
}

#: Top-level layers that no preset may ever touch (patch/token embeddings, conditioning, output projections).
NEVER = (
    "conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
    "pos_embed.proj", "x_embedder", "context_embedder", "proj_out", "proj_out_1", "proj_out_2", "norm_out.linear",
    "caption_projection.linear_1", "caption_projection.linear_2", "adaln_single.linear",
)


def build_transformer(kind: str) -> tuple[nn.Module, dict]:
    make, inputs = TRANSFORMERS[kind]
    torch.manual_seed(0)
    model = make().eval()
    return model, inputs(torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# independent expectations (from module types and attributes, not from the presets' regexes)


def expected_unet_targets(unet: nn.Module, resnets: bool = False) -> set[str]:
    names = set()
    for name, module in unet.named_modules():
        kind = type(module).__name__
        if kind == "Transformer2DModel":
            names |= {f"{name}.proj_in", f"{name}.proj_out"}
        elif kind == "BasicTransformerBlock":
            for attn in ("attn1", "attn2"):
                if getattr(module, attn, None) is not None:
                    names |= {f"{name}.{attn}.{proj}" for proj in ("to_q", "to_k", "to_v", "to_out.0")}
            names |= {f"{name}.ff.net.0.proj", f"{name}.ff.net.2"}
        elif resnets and kind == "ResnetBlock2D":
            names |= {f"{name}.conv1", f"{name}.conv2"}
    return names


def expected_transformer_targets(model: nn.Module) -> set[str]:
    names = set()
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(model, prefix, None) or []):
            path = f"{prefix}.{i}"
            for child_name, child in block.named_children():
                if hasattr(child, "to_q"):  # an attention module (Attention, FluxAttention, ...)
                    for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
                        if isinstance(getattr(child, proj, None), nn.Linear):
                            names.add(f"{path}.{child_name}.{proj}")
                    if getattr(child, "to_out", None) is not None:
                        names.add(f"{path}.{child_name}.to_out.0")
                elif type(child).__name__ == "FeedForward":
                    names |= {f"{path}.{child_name}.net.0.proj", f"{path}.{child_name}.net.2"}
            if prefix == "single_transformer_blocks":  # Flux: the fused attention + MLP output and the MLP input
                names |= {f"{path}.proj_mlp", f"{path}.proj_out"}
    return names


# ---------------------------------------------------------------------------------------------------------------
# helpers


@torch.no_grad()
def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).sample


def adapted_names(model: nn.Module) -> set[str]:
    return {name for name, _ in pv.adapted_layers(model)}


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.base.weight.detach().clone() for name, layer in pv.adapted_layers(model)}


def assert_weights_restored(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, layer in pv.adapted_layers(model):
        assert layer.merged == [], name
        diff = (layer.base.weight - before[name]).abs().max().item()
        assert diff <= TOL * before[name].abs().max().item(), f"{name}: unmerge left a max abs diff of {diff:.3g}"


def check_identity_merge_unmerge(model: nn.Module, inputs: dict, reference: torch.Tensor, seed: int = 0) -> None:
    """``model`` carries freshly injected adapters; ``reference`` is its output before injection."""
    assert rel_err(run(model, inputs), reference) <= TOL, "adapters are not the identity at init"

    randomize_adapters(model, seed=seed)
    unmerged = run(model, inputs)
    assert rel_err(unmerged, reference) > CHANGED, "randomized adapters did not change the output"

    before = base_weights(model)
    pv.merge(model)
    for name, layer in pv.adapted_layers(model):
        assert layer.merged == layer.active, name
    merged = run(model, inputs)
    assert rel_err(merged, unmerged) <= TOL, f"merged != unmerged: rel err {rel_err(merged, unmerged):.3g}"

    pv.unmerge(model)
    assert_weights_restored(model, before)
    assert rel_err(run(model, inputs), unmerged) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# 1-3. UNet2DConditionModel


@pytest.mark.parametrize("linear_projection", [False, True], ids=["conv-proj", "linear-proj"])
def test_unet_auto_targets_exactly_the_transformer_layers(linear_projection):
    unet = tiny_unet(linear_projection)
    inputs = unet_inputs()
    reference = run(unet, inputs)
    expected = expected_unet_targets(unet)
    assert len(expected) == 4 * (2 + 2 * 4 + 2)  # 4 Transformer2DModels (1 down, 1 mid, 2 up), one block each
    for name in expected:
        assert isinstance(unet.get_submodule(name), nn.Linear | nn.Conv2d), name

    pv.inject(unet, pv.PSOFTConfig(rank=8, targets="auto"))

    assert adapted_names(unet) == expected
    modules = dict(unet.named_modules())
    for name in NEVER:
        assert not isinstance(modules.get(name), pv.AdaptedLayer), name
    for name, layer in pv.adapted_layers(unet):
        assert "resnets" not in name and "time_emb" not in name
        assert isinstance(layer.base, nn.Linear) or layer.base.kernel_size == (1, 1), name
        assert list(layer.adapters) == ["default"]
    trainable = {name.rsplit(".", 1)[-1] for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {"q", "alpha", "beta"}
    assert all(".adapters.default." in name for name, p in unet.named_parameters() if p.requires_grad)

    assert rel_err(run(unet, inputs), reference) <= TOL


def test_unet_conv_preset_adds_resnet_convs_identity_and_merge():
    unet = tiny_unet()
    inputs = unet_inputs()
    reference = run(unet, inputs)
    expected = expected_unet_targets(unet, resnets=True)
    convs = expected - expected_unet_targets(unet)
    assert len(convs) == 2 * 8  # 8 ResnetBlock2D: 2 down, 2 mid, 4 up
    for name in convs:
        module = unet.get_submodule(name)
        assert isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3), name

    pv.inject(unet, pv.PSOFTConfig(rank=8, targets="unet+conv"))

    assert adapted_names(unet) == expected
    for name in ("conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"):
        assert not any(n.endswith(name) for n in adapted_names(unet)), name
    check_identity_merge_unmerge(unet, inputs, reference)


@pytest.mark.parametrize("targets", ["auto", "unet+conv"])
@pytest.mark.parametrize(
    "oft", [dict(block_size=8), dict(block_size=16, neumann_terms=None)], ids=["b8-neumann", "b16-exact"]
)
def test_unet_oft_identity_and_merge(targets, oft):
    unet = tiny_unet()
    inputs = unet_inputs()
    reference = run(unet, inputs)
    expected = expected_unet_targets(unet, resnets=targets == "unet+conv")

    pv.inject(unet, pv.OFTConfig(targets=targets, **oft))

    assert adapted_names(unet) == expected
    assert {name.rsplit(".", 1)[-1] for name, p in unet.named_parameters() if p.requires_grad} == {"q"}
    check_identity_merge_unmerge(unet, inputs, reference, seed=1)


# ---------------------------------------------------------------------------------------------------------------
# 4. diffusion transformers


@pytest.mark.parametrize("kind", list(TRANSFORMERS))
def test_diffusion_transformer_auto_preset_identity_and_merge(kind):
    model, inputs = build_transformer(kind)
    reference = run(model, inputs)
    assert reference.abs().max() > 0
    expected = expected_transformer_targets(model)
    assert expected

    pv.inject(model, pv.PSOFTConfig(rank=8, targets="auto"))

    assert adapted_names(model) == expected
    modules = dict(model.named_modules())
    present = [name for name in NEVER if name in modules]
    assert any(name in present for name in ("pos_embed.proj", "x_embedder"))  # the patch embedding exists
    for name in present:
        assert not isinstance(modules[name], pv.AdaptedLayer), f"{kind}: {name} must never be adapted"
    for name, layer in pv.adapted_layers(model):
        assert isinstance(layer.base, nn.Linear), name
        assert ".norm" not in name, f"{kind}: {name} (adaLN modulation) is not an attention/ff layer"
    check_identity_merge_unmerge(model, inputs, reference)


@pytest.mark.parametrize("kind", ["dit", "flux"])
def test_diffusion_transformer_oft_identity_and_merge(kind):
    model, inputs = build_transformer(kind)
    reference = run(model, inputs)
    expected = expected_transformer_targets(model)
    pv.inject(model, pv.OFTConfig(block_size=8, targets="auto"))
    assert adapted_names(model) == expected
    check_identity_merge_unmerge(model, inputs, reference, seed=2)


# ---------------------------------------------------------------------------------------------------------------
# 5. stacked adapters (regression: merging must fold them in forward order, innermost first)


def _stack(unet: nn.Module, order: tuple[str, ...]) -> nn.Module:
    configs = {"p": pv.PSOFTConfig(rank=8, targets="unet+conv"), "o": pv.OFTConfig(block_size=8, targets="unet+conv")}
    for name in order:
        pv.inject(unet, configs[name], name=name)
    return unet


def test_stacked_psoft_then_oft_merges_in_forward_order():
    unet = tiny_unet()
    inputs = unet_inputs()
    reference = run(unet, inputs)
    pristine = copy.deepcopy(unet)

    _stack(unet, ("p", "o"))
    for name, layer in pv.adapted_layers(unet):
        assert layer.active == ["p", "o"], name
    check_identity_merge_unmerge(unet, inputs, reference, seed=3)

    # The same adapter values stacked the other way round give another model, so the check above is sensitive
    # to the order in which merge folds the stack.
    swapped = _stack(copy.deepcopy(pristine), ("o", "p"))
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, p in swapped.named_parameters():
            if ".adapters." in name:
                p.copy_(params[name])
    stacked, other = run(unet, inputs), run(swapped, inputs)
    assert rel_err(other, stacked) > CHANGED
    pv.merge(swapped)
    assert rel_err(run(swapped, inputs), other) <= TOL


def test_inject_on_a_merged_model_keeps_it_merged_and_builds_from_the_pretrained_weight():
    unet = tiny_unet()
    inputs = unet_inputs()
    pristine = {name: p.detach().clone() for name, p in unet.named_parameters()}

    pv.inject(unet, pv.PSOFTConfig(rank=8, targets="unet+conv"), name="p")
    randomize_adapters(unet, seed=4)
    psoft_only = run(unet, inputs)
    pv.merge(unet)
    merged = {name: layer.base.weight.detach().clone() for name, layer in pv.adapted_layers(unet)}

    pv.inject(unet, pv.OFTConfig(block_size=8, targets="unet+conv"), name="o")  # "p" stays merged
    pv.inject(unet, pv.PSOFTConfig(rank=4, targets="unet+conv"), name="q")
    for name, layer in pv.adapted_layers(unet):
        assert layer.merged == ["p"] and layer.active == ["p", "o", "q"], name
        assert torch.equal(layer.base.weight, merged[name]), name
        original = pristine[f"{name}.weight"]
        assert torch.equal(layer.pretrained_weight, original), name
        a, _ = principal_subspace(original.flatten(1), layer.adapters["q"].rank)  # "q"'s subspace: the pretrained W
        assert torch.equal(layer.adapters["q"].A.flatten(1), a), name
    assert rel_err(run(unet, inputs), psoft_only) <= TOL  # "o" and "q" are the identity at init
    pv.unmerge(unet)
    assert all(torch.equal(layer.base.weight, pristine[f"{n}.weight"]) for n, layer in pv.adapted_layers(unet))

    trainable = {name.split(".adapters.", 1)[1] for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {"q.q", "q.alpha", "q.beta"}  # inject freezes everything but the new adapter
