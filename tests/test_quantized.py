"""QPSOFT and QOFT on quantized frozen bases (bitsandbytes NF4/FP4/int8 and torchao int8 on the CPU)."""

import copy
import warnings

import pytest
import timm
import torch
from helpers import rel_err
from torch import nn

import psoft_vision as pv
import psoft_vision.quantized as quantized
from psoft_vision.testing import randomize_adapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SCHEMES = list(quantized.SCHEMES)
METHODS = {"psoft": lambda: pv.PSOFTConfig(rank=8), "oft": lambda: pv.OFTConfig(block_size=16)}


def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10).eval()


def quantized_vit(scheme: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pv.quantize_base(vit(), scheme)


X = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))


def storage(p: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly subclassed, quantized) parameter is made of, to compare bit for bit."""
    if hasattr(p, "__tensor_flatten__") and type(p) not in (torch.Tensor, nn.Parameter):
        return [t for name in p.__tensor_flatten__()[0] for t in storage(getattr(p, name))]
    return [p.detach().clone()]


def same_storage(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_identity_gradients_refused_merge_and_round_trip(scheme, method, tmp_path):
    model = quantized_vit(scheme)
    with torch.no_grad():
        base_out = model(X)
    pv.inject(model, METHODS[method]())
    kinds = {layer.kind.quantized for _, layer in pv.adapted_layers(model)}
    assert len(kinds) == 1 and kinds.pop().startswith(("bnb-", "torchao-"))
    with torch.no_grad():
        assert torch.equal(model(X), base_out)  # the identity, relative to the quantized model's own output
    randomize_adapters(model, std=0.1)
    model(X).square().mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad and p.numel()]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
                           for p in trained)
    with torch.no_grad():
        adapted = model(X)
    packed = {n: storage(p) for n, p in model.named_parameters() if "base" in n}
    with pytest.raises(pv.MergeError, match="quantized bases.*export_lora"):
        pv.merge(model)
    pv.unmerge(model)
    assert all(same_storage(storage(p), packed[n]) for n, p in model.named_parameters() if "base" in n)  # bit for bit

    path = pv.save_adapter(model, tmp_path / "q.safetensors")
    header, _ = pv.read_adapter(path)
    assert {d["quantization"] for d in header["layers"].values()} == {model.blocks[0].attn.qkv.kind.quantized}
    loaded = pv.load_adapter(quantized_vit(scheme), path)
    with torch.no_grad():
        assert rel_err(loaded(X), adapted) <= 1e-6
    with pytest.raises(pv.BaseModelMismatchError, match="differ"):  # the floating base is not what it trained on
        pv.load_adapter(vit(), path)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_qpsoft_rotates_the_principal_part_of_the_dequantized_weight(scheme):
    """QPSOFT on a quantized layer == PSOFT on a floating layer that holds the dequantized weight: the subspace is
    that of what the layer computes with, and the quantization error stays in the frozen residual."""
    model = quantized_vit(scheme)
    floating = dequantized_copy(model)
    for m in (model, floating):
        pv.inject(m, pv.PSOFTConfig(rank=8))
        randomize_adapters(m, std=0.1)
    layer, reference = model.blocks[1].mlp.fc1.adapters["default"], floating.blocks[1].mlp.fc1.adapters["default"]
    assert torch.equal(layer.A, reference.A) and torch.equal(layer.B, reference.B)
    with torch.no_grad():
        assert rel_err(model(X), floating(X)) <= 1e-5


def test_the_training_forward_never_dequantizes(monkeypatch):
    model = quantized_vit("nf4")
    pv.inject(model, pv.PSOFTConfig(rank=8))
    pv.inject(model, pv.OFTConfig(block_size=16), name="oft")

    def refuse(*args, **kwargs):
        raise AssertionError("the base was dequantized in the forward")

    monkeypatch.setattr(quantized, "dequantized_weight", refuse)
    monkeypatch.setattr(pv.bases, "dequantized_weight", refuse)
    model.train()
    model(X).square().mean().backward()


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A floating ViT whose linears hold exactly what the quantized model's compute with."""
    floating = vit()
    with torch.no_grad():
        for name, module in model.named_modules():
            kind = pv.bases.classify(module) if isinstance(module, nn.Linear) else None
            if kind is not None and kind.quantized:
                floating.get_submodule(name).weight.copy_(quantized.dequantized_weight(module, kind.quantized))
    return floating


@pytest.mark.parametrize("method", list(METHODS))
def test_exported_lora_is_exact_relative_to_the_quantized_base(method, tmp_path):
    """The LoRA holds each update relative to the weight the quantized layer computes with. (Loaded by PEFT onto
    a bitsandbytes model on the CPU it is 0.3% off, because PEFT's load re-lays out the 4-bit weights for the CPU
    kernel, which then computes slightly differently; on the dequantized copy it is exact.)"""
    peft = pytest.importorskip("peft")
    model = quantized_vit("nf4")
    reference = dequantized_copy(model)
    pv.inject(model, METHODS[method]())
    randomize_adapters(model, std=0.1)
    with torch.no_grad():
        adapted = model(X)
    pv.export_lora(model, tmp_path / "lora", format="peft", full_deltas=method == "oft")
    loaded = peft.PeftModel.from_pretrained(reference, tmp_path / "lora").eval()
    with torch.no_grad():
        assert rel_err(loaded(X), adapted) <= 1e-5


def test_quantize_base_keeps_the_head_and_refuses_adapted_models():
    model = quantized_vit("nf4")
    assert type(model.head) is nn.Linear  # the classifier stays in floating point
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n.startswith("blocks."))
    with pytest.raises(pv.ConfigError, match="scheme='int3'"):
        pv.quantize_base(vit(), "int3")
    adapted = pv.inject(vit(), pv.PSOFTConfig(rank=4))
    with pytest.raises(pv.ConfigError, match="quantize the base first"):
        pv.quantize_base(adapted)


def test_other_quantized_weights_are_refused_by_name():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(16, 16)
            self.layer.weight = nn.Parameter(torch.zeros(16, 16, dtype=torch.int8), requires_grad=False)

        def forward(self, x):
            return self.layer(x)

    for config in (pv.PSOFTConfig(rank=4, targets=["layer"]), pv.OFTConfig(block_size=4, targets=["layer"])):
        model = Packed()
        with pytest.raises(pv.UnsupportedLayerError, match="'layer'.*dtype torch.int8.*bitsandbytes Linear4bit"):
            pv.inject(model, config)
        assert type(model.layer) is nn.Linear


def test_a_quantized_diffusers_unet_takes_inject():
    """A UNet with bitsandbytes layers where diffusers' BitsAndBytesConfig puts them (every nn.Linear), as
    from_pretrained(quantization_config=...) builds it on a GPU (diffusers refuses to quantize on a CPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    pv.quantize_base(unet, "nf4")
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 32)
    with torch.no_grad():
        expected = unet(sample, 10, context).sample
    pv.inject(unet, pv.PSOFTConfig(rank=4))
    kinds = {layer.kind.name: layer.kind.quantized for _, layer in pv.adapted_layers(unet)}
    assert kinds == {"linear": "bnb-nf4", "conv2d": None}  # quantized linears, and the floating proj_in/out convs
    with torch.no_grad():
        assert torch.equal(unet(sample, 10, context).sample, expected)
    copy.deepcopy(unet)  # adapted quantized models copy (the app and the trainers deep-copy bases)


def test_qpsoft_inject_dequantizes_one_layer_at_a_time():
    """The subspaces come from the dequantized weights one layer at a time, so inject's peak resident memory is a
    few buffers of the largest layer's size (its fp32 copy, the fp64 Gram matrix of its smaller side, eigh's
    eigenvectors and workspace) plus the adapters' own tensors, whatever the number of layers: 48 layers of
    512 x 2048 hold 192 MiB in fp32, and inject stays far below that (about 10-25 MiB measured)."""
    from psoft_vision.memory import peak_memory_mib, reset_peak_memory

    def nf4_stack(layers: int, width: int) -> nn.Module:
        torch.manual_seed(0)
        stack = nn.Sequential(*[nn.Linear(4 * width, width) if i % 2 else nn.Linear(width, 4 * width)
                                for i in range(layers)])
        return pv.quantize_base(stack, "nf4", skip=[])

    config = pv.PSOFTConfig(rank=16, targets=r"\d+")
    pv.inject(nf4_stack(2, 64), config)  # first-use costs (libraries, thread pools) out of the measurement
    model = nf4_stack(48, 512)
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory_mib(cpu)
    pv.inject(model, config)
    grown = peak_memory_mib(cpu) - before
    assert len(list(pv.adapted_layers(model))) == 48
    assert grown < 192 / 4, f"inject grew the resident set by {grown:.1f} MiB; the model is 192 MiB in fp32"
