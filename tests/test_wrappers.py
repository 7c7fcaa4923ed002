"""Adapted models inside the wrappers training code puts around them (DDP, FSDP1 with auto-wrapped blocks and
activation checkpointing): adapter files and every export name layers as the plain model does (issue 21)."""

import json
import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from safetensors import safe_open

import psoft_vision as pv
from psoft_vision.testing import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))


def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10).eval()


def adapted(config) -> torch.nn.Module:
    model = pv.inject(vit(), config)
    randomize_adapters(model, std=0.2)
    return model


@pytest.fixture(scope="module")
def gloo():
    """A one-process gloo group, enough for DDP and FSDP1 to wrap a CPU model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def contents(path: Path) -> tuple[dict, dict]:
    with safe_open(path, "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def assert_same_file(a: Path, b: Path) -> None:
    (meta_a, tensors_a), (meta_b, tensors_b) = contents(a), contents(b)
    assert tensors_a.keys() == tensors_b.keys() and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    assert meta_a == meta_b


def ddp(model):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def fsdp1(model):
    """FSDP1 as accelerate sets it up: each block wrapped (auto-wrap policy), activation checkpointing on them."""
    from timm.models.vision_transformer import Block
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "switching to NO_SHARD since the world size is 1"
        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                                        device_id=torch.device("cpu"))


@pytest.mark.parametrize("wrap", [ddp, fsdp1], ids=["DDP", "FSDP1"])
def test_a_wrapped_model_saves_the_plain_names(gloo, tmp_path, wrap):
    model = adapted(pv.PSOFTConfig(rank=4))
    expected = model(X).detach()
    plain = pv.save_adapter(model, tmp_path / "plain.safetensors")
    wrapped = wrap(model)
    names = [name for name, _ in pv.adapted_layers(wrapped)]
    assert all(name.startswith("module.") for name in names) if wrap is ddp else \
        all("._checkpoint_wrapped_module._fsdp_wrapped_module." in name for name in names)  # wrappers inside too
    written = pv.save_adapter(wrapped, tmp_path / "wrapped.safetensors")
    assert_same_file(plain, written)
    loaded = pv.load_adapter(vit(), written)
    torch.testing.assert_close(loaded(X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrap", [ddp, fsdp1], ids=["DDP", "FSDP1"])
def test_a_wrapped_model_exports_the_plain_names(gloo, tmp_path, wrap):
    model = adapted(pv.PSOFTConfig(rank=4))
    plain = {"diffusers": pv.export_lora(model, tmp_path / "plain.safetensors"),
             "peft": pv.export_lora(model, tmp_path / "plain_peft", format="peft")}
    wrapped = wrap(model)
    assert_same_file(plain["diffusers"], pv.export_lora(wrapped, tmp_path / "wrapped.safetensors"))
    folder = pv.export_lora(wrapped, tmp_path / "wrapped_peft", format="peft")
    assert_same_file(plain["peft"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    assert json.loads((folder / "adapter_config.json").read_text()) == \
        json.loads((plain["peft"] / "adapter_config.json").read_text())


@pytest.mark.parametrize("wrap", [ddp, fsdp1], ids=["DDP", "FSDP1"])
def test_a_wrapped_oft_model_exports_the_plain_names(gloo, tmp_path, wrap):
    model = adapted(pv.OFTConfig(block_size=4))
    plain = pv.export_oft(model, tmp_path / "plain")
    folder = pv.export_oft(wrap(model), tmp_path / "wrapped")
    assert_same_file(plain / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    assert (plain / "adapter_config.json").read_text() == (folder / "adapter_config.json").read_text()


def test_a_model_wrapped_twice_is_unwrapped(gloo, tmp_path):
    """DDP around a compiled model (what accelerate's prepare gives with dynamo on and several processes)."""
    from psoft_vision.lifecycle import unwrapped

    model = adapted(pv.PSOFTConfig(rank=4))
    wrapped = ddp(torch.compile(model))
    assert unwrapped(wrapped) is model
    plain = pv.save_adapter(model, tmp_path / "plain.safetensors")
    assert_same_file(plain, pv.save_adapter(wrapped, tmp_path / "wrapped.safetensors"))
