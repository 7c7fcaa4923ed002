"""save_adapter / load_adapter: round trips, file contents, atomic writes, and every bad input."""

import json

import pytest
import timm
import torch
from helpers import rel_err
from safetensors import safe_open
from safetensors.torch import save_file

import psoft_vision as pv
import psoft_vision.files
from psoft_vision.testing import randomize_adapters


def vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False, num_classes=10).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def trained(tmp_path, x):
    """A PSOFT adapter (split qkv, trained head) saved to a file; returns the path and the adapted output."""
    model = vit()
    pv.inject(model, pv.PSOFTConfig(rank=8, split_qkv=True, train_modules=("head",)))
    randomize_adapters(model)
    with torch.no_grad():
        model.head.weight.mul_(2)
        out = model(x)
    return pv.save_adapter(model, tmp_path / "adapter.safetensors"), out


def state(model):
    return ({n: p.detach().clone() for n, p in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    weights, flags = before
    assert not list(pv.adapted_layers(model))
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@torch.no_grad()
def test_round_trip_reproduces_the_adapted_model(trained, x):
    path, out = trained
    model = pv.load_adapter(vit(), path)
    assert rel_err(model(x), out) <= 1e-6
    assert model.blocks[0].attn.qkv.adapters["default"].chunks == 3
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"head.weight", "head.bias"}


def test_file_holds_the_trainable_tensors_and_metadata(trained):
    path, _ = trained
    header, tensors = pv.read_adapter(path)
    assert header["format_version"] == 2 and header["method"] == "psoft" and header["name"] == "default"
    assert header["config"]["rank"] == 8 and header["config"]["split_qkv"] is True
    assert header["package_version"] == pv.__version__ and header["strength"] == 1.0 and header["anchors"] is True
    layers = header["layers"]
    assert layers["blocks.0.attn.qkv"] == {"rank": 8, "chunks": 3, "svd": "full", "weight_shape": [192, 64],
                                           "weight_dtype": "float32", "quantization": None}
    assert set(header["fingerprints"]) == set(layers)
    expected = {f"{layer}.{p}" for layer in layers for p in ("q", "alpha", "beta", "anchor.subspace_sketch")}
    assert set(tensors) == expected | {"train_modules.head.weight", "train_modules.head.bias"}
    assert tensors["blocks.0.attn.qkv.q"].shape == (3, 28)
    assert tensors["blocks.0.attn.qkv.anchor.subspace_sketch"].shape == (24, 32)  # 3 chunks x r, min(4 r, 64)
    with safe_open(path, "pt") as f:
        assert f.metadata()["format"] == "psoft_vision.adapter"


@torch.no_grad()
def test_include_bases_reloads_bit_exact_subspaces(tmp_path, x):
    model = vit()
    pv.inject(model, pv.OFTConfig(block_size=16), name="first")
    pv.inject(model, pv.PSOFTConfig(rank=8, svd="lowrank"), name="second")
    randomize_adapters(model)
    out = model(x)
    path = pv.save_adapter(model, tmp_path / "second.safetensors", name="second", include_bases=True)
    pv.save_adapter(model, tmp_path / "first.safetensors", name="first")
    assert "blocks.0.attn.qkv.A" in pv.read_adapter(path)[1]
    fresh = vit()
    pv.load_adapter(fresh, tmp_path / "first.safetensors")
    pv.load_adapter(fresh, path)
    original = model.blocks[1].mlp.fc2.adapters["second"]
    reloaded = fresh.blocks[1].mlp.fc2.adapters["second"]
    assert torch.equal(original.A, reloaded.A) and torch.equal(original.B, reloaded.B)
    assert torch.equal(fresh(x), out)
    with pytest.raises(pv.AdapterNameError, match="pass name="):
        pv.save_adapter(model, tmp_path / "x.safetensors")


@torch.no_grad()
def test_load_under_another_name_and_name_clash(trained, x):
    path, out = trained
    model = pv.load_adapter(vit(), path, name="subject")
    assert pv.adapter_names(model) == ["subject"]
    with pytest.raises(pv.AdapterNameError, match="already has an adapter named 'subject'"):
        pv.load_adapter(model, path, name="subject")
    assert rel_err(model(x), out) <= 1e-6


def test_the_same_base_in_half_precision_matches_its_fingerprint(trained):
    path, _ = trained
    model = vit().to(torch.bfloat16)
    pv.load_adapter(model, path)
    assert pv.adapter_names(model) == ["default"]


def test_write_is_atomic(trained, monkeypatch):
    path, _ = trained
    before = path.read_bytes()
    model = pv.load_adapter(vit(), path)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(psoft_vision.files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        pv.save_adapter(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def rewrite(path, out, tensors=None, header_update=None, metadata=None):
    header, original = pv.read_adapter(path)
    header.update(header_update or {})
    meta = metadata if metadata is not None else {"format": "psoft_vision.adapter", "psoft_vision": json.dumps(header)}
    save_file(original if tensors is None else tensors(original), out, metadata=meta)
    return out


def write(out, data: bytes):
    out.write_bytes(data)
    return out


def drop_key(t):
    return {k: v for k, v in t.items() if k != "blocks.1.mlp.fc1.q"}


def add_key(t):
    return {**t, "blocks.1.mlp.fc1.extra": torch.zeros(3)}


def reshape_key(t):
    return {**t, "blocks.1.mlp.fc1.q": torch.zeros(1, 7)}


@pytest.mark.parametrize("make_bad, error, match", [
    (lambda p, o: write(o, b"definitely not safetensors"), pv.AdapterFileError, "not a readable safetensors"),
    (lambda p, o: write(o, p.read_bytes()[:-200]), pv.AdapterFileError, "truncated"),
    (lambda p, o: rewrite(p, o, metadata={}), pv.AdapterFileError, "not a psoft_vision adapter"),
    (lambda p, o: rewrite(p, o, header_update={"format_version": 99}), pv.AdapterVersionError, "version 99"),
    (lambda p, o: rewrite(p, o, tensors=drop_key), pv.KeyMismatchError, r"missing keys \['blocks.1.mlp.fc1.q'\]"),
    (lambda p, o: rewrite(p, o, tensors=add_key), pv.KeyMismatchError, r"unknown keys \['blocks.1.mlp.fc1.extra'\]"),
    (lambda p, o: rewrite(p, o, tensors=reshape_key), pv.KeyMismatchError, "wrong shape: .*file \\(1, 7\\)"),
    (lambda p, o: rewrite(p, o, header_update={"layers": {"decoder.fc": {}}}), pv.KeyMismatchError, "decoder.fc"),
], ids=["not-safetensors", "truncated", "foreign", "newer-version", "missing-key", "unknown-key", "shape",
        "unknown-layer"])
def test_bad_files_raise_named_errors_and_leave_the_model_as_it_was(trained, tmp_path, make_bad, error, match):
    path, _ = trained
    bad = make_bad(path, tmp_path / "bad.safetensors")
    model = vit()
    before = state(model)
    with pytest.raises(error, match=match):
        pv.load_adapter(model, bad)
    assert_unchanged(model, before)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(pv.AdapterFileError, match="nothing.safetensors' is not a regular file \\(it does not exist"):
        pv.load_adapter(vit(), tmp_path / "nothing.safetensors")


@torch.no_grad()
def test_another_base_model_fails_loudly_unless_told_otherwise(trained, x):
    path, _ = trained
    other = vit(seed=7)
    before = state(other)
    with pytest.raises(pv.BaseModelMismatchError, match="check_base=False"):
        pv.load_adapter(other, path)
    assert_unchanged(other, before)
    pv.load_adapter(other, path, check_base=False)
    assert pv.adapter_names(other) == ["default"]


@torch.no_grad()
def test_failed_load_keeps_merged_adapters_merged(trained, tmp_path, x):
    path, _ = trained
    model = vit()
    pv.inject(model, pv.PSOFTConfig(rank=4), name="resident")
    randomize_adapters(model)
    pv.merge(model)
    out = model(x)
    bad = rewrite(path, tmp_path / "bad.safetensors", tensors=drop_key)
    with pytest.raises(pv.KeyMismatchError):
        pv.load_adapter(model, bad)
    assert pv.adapter_names(model) == ["resident"]
    assert model.blocks[0].attn.qkv.merged == ["resident"]
    assert torch.equal(model(x), out)


def test_a_compiled_model_saves_loads_and_exports_under_its_own_layer_names(tmp_path, x):
    model = vit()
    pv.inject(model, pv.PSOFTConfig(rank=4))
    randomize_adapters(model)
    compiled = torch.compile(model)  # nothing is compiled until a forward: the names are what is tested
    header, _ = pv.read_adapter(pv.save_adapter(compiled, tmp_path / "a.safetensors"))
    assert list(header["layers"])[0] == "blocks.0.attn.qkv"
    fresh = torch.compile(vit())
    assert pv.load_adapter(fresh, tmp_path / "a.safetensors") is fresh
    assert len(list(pv.adapted_layers(fresh))) == len(header["layers"])
    lora = pv.export_lora(compiled, tmp_path / "lora", format="peft")
    config = json.loads((lora / "adapter_config.json").read_text())
    assert not any("_orig_mod" in name for name in config["target_modules"])
