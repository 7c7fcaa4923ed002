"""LoRA export: a PSOFT adapter written by export_lora loads with diffusers' load_lora_weights (UNet pipeline, SD3
transformer) and with peft.PeftModel.from_pretrained (timm ViT) and reproduces the adapted model; per-layer ranks
(clamped, split_qkv) keep scaling 1; OFT is refused unless full_deltas=True, which is exact; psoft_vision adapter
files load into a pipeline. Everything is tiny, CPU, fp32, built from configs and saved to a temporary directory."""

import copy
import json
import string
import warnings

import diffusers
import peft
import pytest
import timm
import torch
from helpers import rel_err
from safetensors import safe_open
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from psoft_vision.errors import AdapterNameError, ConfigError, LoRAExportError, NotLowRankError
from psoft_vision.export import export_lora
from psoft_vision.formats.lora_factors import lora_weights
from psoft_vision.formats.native import load_adapter_into_pipeline
from psoft_vision.inject import inject
from psoft_vision.lifecycle import activate, adapted_layers, merge, set_strength
from psoft_vision.methods import OFTConfig, PSOFTConfig
from psoft_vision.model import denoiser
from psoft_vision.targets import PRESETS
from psoft_vision.testing import randomize_adapters

TOL = 1e-4  # the brief: a loaded LoRA reproduces the adapted model to this relative error
CHANGED = 1e-2  # the adapter must move the output at least this much, or reproducing it proves nothing


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# tiny models


def tiny_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16, pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline saved with save_pretrained: every test loads it back from disk."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=60, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=32,
    ))
    scheduler = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("tiny-sd")
    pipe.save_pretrained(path)
    return path


def load_sd(path) -> diffusers.StableDiffusionPipeline:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs() -> dict:
    gen = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=gen), timestep=torch.tensor([3, 500]),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=gen))


@torch.no_grad()
def unet_out(pipe) -> torch.Tensor:
    return pipe.unet(**unet_inputs()).sample


@torch.no_grad()
def images(pipe) -> torch.Tensor:
    out = pipe("a photo of a dog", num_inference_steps=2, height=16, width=16, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    return out.images


def adapt(model: nn.Module, config, name: str = "default", seed: int = 0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank clamping warns on purpose
        inject(model, config, name=name)
    randomize_adapters(model, seed=seed)
    return model


def lora_metadata(path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["lora_adapter_metadata"])


def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10).eval()


VIT_TARGETS = f"({PRESETS['timm-vit'].pattern})|patch_embed\\.proj"  # every block linear and the 16x16/stride-16 conv


def vit_input() -> torch.Tensor:
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------------------------------------------------------
# diffusers format


def test_diffusers_lora_reproduces_psoft_unet_with_convs_and_mixed_ranks(sd_dir, tmp_path):
    pipe = load_sd(sd_dir)
    base, base_images = unet_out(pipe), images(pipe)
    # rank 40 is clamped to 32 on the 32-channel layers and kept on the 64-channel ones: two ranks in one file
    adapt(pipe.unet, PSOFTConfig(targets="unet+conv", rank=40))
    expected, expected_images = unet_out(pipe), images(pipe)
    assert rel_err(expected, base) > CHANGED

    file = export_lora(pipe.unet, tmp_path / "lora" / "psoft.safetensors")
    assert file == tmp_path / "lora" / "psoft.safetensors"
    assert [p.name for p in file.parent.iterdir()] == ["psoft.safetensors"]  # no temporary left behind
    meta = lora_metadata(file)
    assert meta["unet.r"] == meta["unet.lora_alpha"]
    assert meta["unet.rank_pattern"] and meta["unet.rank_pattern"] == meta["unet.alpha_pattern"]
    assert set(meta["unet.rank_pattern"].values()) | {meta["unet.r"]} == {32, 40}
    with safe_open(file, "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("unet.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))
                   for k in keys)
        conv = "unet.down_blocks.0.resnets.0.conv1"
        assert f.get_tensor(f"{conv}.lora_A.weight").shape == (32, 32, 3, 3)
        assert f.get_tensor(f"{conv}.lora_B.weight").shape == (32, 32, 1, 1)
    assert len(keys) == 2 * len(list(adapted_layers(pipe.unet)))

    fresh = load_sd(sd_dir)
    fresh.load_lora_weights(file.parent, weight_name=file.name)
    assert rel_err(unet_out(fresh), expected) <= TOL
    assert rel_err(images(fresh), expected_images) <= TOL
    assert rel_err(images(fresh), base_images) > 1e-4
    # every loaded layer has scaling exactly 1 whatever its rank
    scalings = {s for m in fresh.unet.modules() if isinstance(getattr(m, "scaling", None), dict)
                for s in m.scaling.values()}
    assert scalings == {1.0}


def test_diffusers_lora_of_a_merged_scaled_adapter_into_a_directory(sd_dir, tmp_path):
    pipe = load_sd(sd_dir)
    adapt(pipe.unet, PSOFTConfig(targets="unet", rank=4, split_qkv=True))
    set_strength(pipe.unet, 0.5)
    merge(pipe.unet)
    expected = unet_out(pipe)
    file = export_lora(pipe, tmp_path)  # the pipeline itself; a directory gets the default weight name
    assert file.name == "pytorch_lora_weights.safetensors"
    fresh = load_sd(sd_dir)
    fresh.load_lora_weights(tmp_path)
    assert rel_err(unet_out(fresh), expected) <= TOL


def tiny_sd3() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def test_diffusers_lora_onto_a_transformer(tmp_path):
    model = tiny_sd3()
    fresh = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
                  encoder_hidden_states=torch.randn(2, 5, 24, generator=gen),
                  pooled_projections=torch.randn(2, 12, generator=gen), timestep=torch.tensor([3, 700]))
    with torch.no_grad():
        base = model(**inputs).sample
        adapt(model, PSOFTConfig(rank=6))
        expected = model(**inputs).sample
    assert rel_err(expected, base) > CHANGED
    file = export_lora(model, tmp_path / "sd3.safetensors")
    assert lora_metadata(file)["transformer.r"] == 6
    # what SD3LoraLoaderMixin.load_lora_weights does for pipe.transformer
    fresh.load_lora_adapter(tmp_path, weight_name=file.name, prefix="transformer")
    with torch.no_grad():
        assert rel_err(fresh(**inputs).sample, expected) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# peft format


@pytest.mark.parametrize("rank", [8, 70])  # 8: qkv split into 3 x 8 = 24 vs 8 elsewhere; 70: clamped to 64, qkv 192
def test_peft_lora_reproduces_split_qkv_and_clamped_ranks_with_conv_and_head(rank, tmp_path):
    model = vit()
    fresh = copy.deepcopy(model)
    x = vit_input()
    with torch.no_grad():
        base = model(x)
        adapt(model, PSOFTConfig(targets=VIT_TARGETS, rank=rank, split_qkv=True, train_modules=("head",)))
        model.head.weight.add_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(3)))
        expected = model(x)
    assert rel_err(expected, base) > CHANGED

    out = export_lora(model, tmp_path / "peft", format="peft")
    assert out == tmp_path / "peft"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    assert "patch_embed.proj" in config["target_modules"] and "head" not in config["target_modules"]
    assert config["rank_pattern"] == config["alpha_pattern"] and config["r"] == config["lora_alpha"]
    assert {config["r"], *config["rank_pattern"].values()} == ({8, 24} if rank == 8 else {64, 192})

    loaded = peft.PeftModel.from_pretrained(fresh, out).eval()
    qkv = loaded.base_model.model.blocks[0].attn.qkv
    assert qkv.r["default"] == 3 * min(rank, 64) and qkv.scaling["default"] == 1.0
    with torch.no_grad():
        assert rel_err(loaded(x), expected) <= TOL


def test_target_modules_become_a_regex_when_a_name_is_a_suffix_of_another(tmp_path):
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.inner = nn.Sequential()
            self.inner.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.inner.fc(self.fc(x))

    torch.manual_seed(0)
    model = Outer()
    fresh = copy.deepcopy(model)
    adapt(model, PSOFTConfig(targets=["fc"], exclude=["inner.fc"], rank=2))
    assert [n for n, _ in adapted_layers(model)] == ["fc"]
    out = export_lora(model, tmp_path / "peft", format="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == "^(fc)$"  # the list ["fc"] would also catch inner.fc in PEFT
    x = torch.randn(3, 8)
    loaded = peft.PeftModel.from_pretrained(fresh, out)
    assert not hasattr(loaded.base_model.model.inner.fc, "lora_A")
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# OFT and full deltas


def test_oft_is_refused_with_a_pointer_to_full_deltas(tmp_path):
    model = adapt(vit(), OFTConfig(block_size=16))
    with pytest.raises(NotLowRankError, match="full_deltas=True") as caught:
        export_lora(model, tmp_path / "x.safetensors")
    assert "not low rank" in str(caught.value) and isinstance(caught.value, ConfigError)
    assert not list(tmp_path.iterdir())


def test_full_deltas_export_oft_exactly_in_peft_format(tmp_path):
    model = vit()
    fresh = copy.deepcopy(model)
    x = vit_input()
    with torch.no_grad():
        base = model(x)
        adapt(model, OFTConfig(targets="timm-vit", block_size=16))  # convs: see the UNet test below
        expected = model(x)
    assert rel_err(expected, base) > CHANGED
    factors = lora_weights(model, full_deltas=True)
    # rank min(out, in * kh * kw): identity on the smaller side
    assert factors["blocks.0.attn.qkv"][0].shape == (192, 64)  # out > in: up = delta, down = I
    assert torch.equal(factors["blocks.0.attn.qkv"][1], torch.eye(64))
    assert factors["blocks.0.mlp.fc2"][0].shape == (64, 64)  # out < in: up = I, down = delta
    assert torch.equal(factors["blocks.0.mlp.fc2"][0], torch.eye(64))
    out = export_lora(model, tmp_path, format="peft", full_deltas=True)
    loaded = peft.PeftModel.from_pretrained(fresh, out)
    with torch.no_grad():
        assert rel_err(loaded(x), expected) <= TOL


def test_full_deltas_export_oft_on_unet_convs_in_diffusers_format(sd_dir, tmp_path):
    pipe = load_sd(sd_dir)
    base = unet_out(pipe)
    adapt(pipe.unet, OFTConfig(targets="unet+conv", block_size=8))
    expected = unet_out(pipe)
    assert rel_err(expected, base) > CHANGED
    file = export_lora(pipe.unet, tmp_path / "oft.safetensors", full_deltas=True)
    fresh = load_sd(sd_dir)
    fresh.load_lora_weights(tmp_path, weight_name=file.name)
    assert rel_err(unet_out(fresh), expected) <= TOL


def test_full_deltas_of_psoft_equal_its_low_rank_factors():
    model = adapt(vit(), PSOFTConfig(rank=4, split_qkv=True))
    low, full = lora_weights(model), lora_weights(model, full_deltas=True)
    for name, (up, down) in low.items():
        full_up, full_down = full[name]
        assert full_up.shape[1] == min(up.shape[0], down.flatten(1).shape[1])
        torch.testing.assert_close(full_up @ full_down.flatten(1), up @ down.flatten(1), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# several adapters, errors


def test_stacked_adapters_need_a_name_and_warn_that_the_lora_is_one_of_them(tmp_path):
    model = vit()
    fresh = copy.deepcopy(model)
    adapt(model, PSOFTConfig(rank=4), name="a", seed=1)
    adapt(model, PSOFTConfig(rank=6), name="b", seed=2)
    x = vit_input()
    with pytest.raises(AdapterNameError, match="pass name="):
        export_lora(model, tmp_path / "x", format="peft")
    with pytest.raises(AdapterNameError, match="'c'"):
        export_lora(model, tmp_path / "x", format="peft", name="c")
    with pytest.warns(UserWarning, match="stacked adapters compose"):
        out = export_lora(model, tmp_path / "a", format="peft", name="a")
    activate(model, ["a"])
    with torch.no_grad():
        expected = model(x)
        assert rel_err(peft.PeftModel.from_pretrained(fresh, out)(x), expected) <= TOL


def test_bad_arguments_are_refused_clearly(tmp_path):
    model = adapt(vit(), PSOFTConfig(rank=2))
    with pytest.raises(ConfigError, match="format='kohya'"):
        export_lora(model, tmp_path / "x.safetensors", format="kohya")
    with pytest.raises(ConfigError, match="directory"):
        export_lora(model, tmp_path / "x.safetensors", format="peft")
    with pytest.raises(TypeError, match="unet or transformer"):
        export_lora(object(), tmp_path / "x.safetensors")
    with pytest.raises(AdapterNameError, match="no adapters"):
        export_lora(vit(), tmp_path / "x.safetensors", format="peft")

    dilated = nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2))
    adapt(dilated, PSOFTConfig(targets=["0"], rank=2))
    with pytest.raises(LoRAExportError, match=r"dilation=\(2, 2\)"):
        export_lora(dilated, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    model = adapt(vit(), PSOFTConfig(rank=2))
    file = export_lora(model, tmp_path / "x.safetensors")
    before = file.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("psoft_vision.files.save_file", fail)
    randomize_adapters(model, seed=5)
    with pytest.raises(OSError, match="disk full"):
        export_lora(model, file)
    assert file.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# psoft_vision adapter files into a pipeline


def test_load_adapter_into_pipeline_matches_the_saved_model(sd_dir, tmp_path):
    from psoft_vision import save_adapter

    pipe = load_sd(sd_dir)
    adapt(pipe.unet, PSOFTConfig(targets="unet+conv", rank=4))
    expected = unet_out(pipe)
    file = save_adapter(pipe.unet, tmp_path / "adapter.safetensors")

    fresh = load_sd(sd_dir)
    assert load_adapter_into_pipeline(fresh, file) is fresh
    assert rel_err(unet_out(fresh), expected) <= 1e-6
    assert denoiser(fresh) == (fresh.unet, "unet")
    with pytest.raises(TypeError, match="neither a `unet` nor a `transformer`"):
        load_adapter_into_pipeline(object(), file)


def test_full_deltas_of_a_wide_strided_conv_use_the_patch_extraction_kernel(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 32, 3, stride=2, padding=1))
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 2, 17, 17)
    adapt(model, OFTConfig(targets=["0"], block_size=2), seed=3)
    up, down = lora_weights(model, full_deltas=True)["0"]
    assert up.shape == (32, 18) and down.shape == (18, 2, 3, 3)  # out 32 > in * kh * kw = 18: down = I
    out = export_lora(model, tmp_path, format="peft", full_deltas=True)
    loaded = peft.PeftModel.from_pretrained(fresh, out)
    with torch.no_grad():
        expected = model(x)
        assert rel_err(loaded(x), expected) <= TOL
        assert rel_err(expected, fresh[0].base_layer(x)) > CHANGED
