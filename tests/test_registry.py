"""A third method, defined in the tests (tests/helpers.py: Diag) and registered through psoft_vision's registry alone:
it injects as the identity, saves, loads onto a fresh model, merges, is offered by both trainers' --method with its
own flags and learning rates, and trains, saves and exports in them, with no other file changed (the benchmark
measures it too: tests/test_bench.py)."""

import copy
import dataclasses

import pytest
import torch
from helpers import DIAG, DiagConfig
from torch import nn

import psoft_vision as pv
from psoft_vision.testing import randomize_adapters
from train.common.methods import build_config
from train.dreambooth import trainer as dreambooth
from train.offline.pretrain_t2i import build_pipeline
from train.vtab import trainer as vtab
from train.vtab.data import Preprocess

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def diag():
    method = pv.register_method(DIAG)
    yield method
    pv.unregister_method("diag")


class Tiny(nn.Module):
    """A biased Conv2d and a biased Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def method_choices(parser) -> list[str]:
    action = next(a for a in parser._actions if a.dest == "method")
    return action.choices or action.help


def test_inject_save_load_and_merge_through_the_registry(diag, tmp_path):
    model = Tiny().requires_grad_(False)
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    pv.inject(model, DiagConfig(targets=["conv", "fc"]))
    assert torch.equal(model(x), before)  # the identity at init
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".s"):
                p.uniform_(0.5, 1.5)
    trained = model(x)
    assert (trained - before).abs().max() > 1e-2

    path = pv.save_adapter(model, tmp_path / "diag.safetensors")
    header, tensors = pv.read_adapter(path)
    assert header["method"] == "diag" and header["layers"] == {"conv": {"channels": 3}, "fc": {"channels": 144}}
    assert sorted(tensors) == ["conv.s", "fc.s"]
    pv.load_adapter(fresh, path)
    assert torch.allclose(fresh(x), trained, atol=1e-6)

    pv.merge(model)
    assert (model(x) - trained).abs().max() <= 1e-5
    pv.set_strength(fresh, 0.0)
    assert torch.allclose(fresh(x), before, atol=1e-6)


def test_both_trainers_offer_every_registered_method(diag):
    assert method_choices(vtab.build_parser()) == ("psoft", "oft", "diag", *vtab.BASELINES)
    assert "diag" in vtab.METHODS
    assert "diag" in method_choices(dreambooth.build_parser())
    args = dreambooth.parse_args(["--method", "diag"])
    assert args.learning_rate == dreambooth.FALLBACK_LR and args.output_dir.name == "diag"
    pv.unregister_method("diag")
    assert "diag" not in method_choices(vtab.build_parser()) and "diag" not in vtab.METHODS
    with pytest.raises(dreambooth.DreamBoothError, match="unknown"):
        dreambooth.parse_args(["--method", "diag"])


@pytest.mark.trainer
def test_a_short_vtab_run_trains_and_saves_the_method(diag, tmp_path):
    metrics = vtab.main(["--method", "diag", "--epochs", "1", "--quiet", "--output-dir", str(tmp_path)])
    assert metrics["finished"] and metrics["args"]["lr"] == vtab.FALLBACK_LR
    header, _ = pv.read_adapter(tmp_path / "adapter.safetensors")
    assert header["method"] == "diag" and metrics["trainable"] == sum(d["channels"] for d in header["layers"].values())

    args = vtab.parse_args(["--method", "diag"])
    model = vtab.create_model(args, num_classes=metrics["classes"]).eval()
    pv.load_adapter(model, tmp_path / "adapter.safetensors")  # the adapter and the trained head
    _, _, test_set, _ = vtab.load_data(args, Preprocess.for_model(model))
    x, y = test_set.tensors
    with torch.no_grad():
        accuracy = (torch.cat([model(b).argmax(-1) for b in x.split(256)]) == y).float().mean().item()
    assert accuracy == pytest.approx(metrics["test_acc"], abs=1e-3)


@pytest.mark.trainer
def test_a_dreambooth_step_saves_the_method_and_its_full_delta_lora(diag, tmp_path):
    build_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    result = dreambooth.main([
        "--method", "diag", "--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--output_dir",
        str(tmp_path / "out"), "--no-with_prior_preservation", "--max_train_steps", "1", "--train_batch_size", "1",
        "--num_validation_images", "1", "--num_inference_steps", "2", "--quiet"])
    header, _ = pv.read_adapter(result["adapter"])
    assert result["finished"] and header["method"] == "diag"
    base = dreambooth.load_pipeline(tmp_path / "pipe", torch.device("cpu"))
    pv.inject(base.unet, DiagConfig())
    assert set(header["layers"]) == {name for name, _ in pv.adapted_layers(base.unet)}
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


# ------------------------------------------------------------------------------------- what a method declares
#: Diag with learning rates of its own for both trainers.
DECLARED = dataclasses.replace(DIAG, learning_rates={"vtab": 3e-2, "dreambooth": 2e-3})


@pytest.fixture
def declared():
    method = pv.register_method(DECLARED)
    yield method
    pv.unregister_method("diag")


@pytest.mark.parametrize("name", ["psoft", "oft"])
def test_a_shipped_method_declares_the_identity_of_each_parameter(name):
    method = pv.get_method(name)
    model = Tiny().requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    pv.inject(model, method.config(targets=["fc"], **{method.size_field: 4}))
    assert {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad} == set(method.identity)
    randomize_adapters(model, std=0.0)  # every parameter at its declared identity value
    assert (model(x) - before).abs().max() <= 1e-6
    randomize_adapters(model)
    assert (model(x) - before).abs().max() > 1e-3


def test_a_parameter_without_a_declared_identity_is_named():
    pv.register_method(dataclasses.replace(DIAG, identity={}))
    try:
        model = pv.inject(Tiny().requires_grad_(False), DiagConfig(targets=["fc"]))
        with pytest.raises(pv.ConfigError, match=r"DiagAdapter.s: method 'diag' declares no identity value"):
            randomize_adapters(model)
    finally:
        pv.unregister_method("diag")


def test_a_size_pattern_must_be_a_field_that_patterns_the_size():
    with pytest.raises(pv.ConfigError, match="not a field of DiagConfig"):
        pv.register_method(dataclasses.replace(DIAG, size_pattern_field="limit_pattern"))
    with pytest.raises(pv.ConfigError, match="needs the size_field"):
        pv.register_method(dataclasses.replace(DIAG, size_pattern_field="limit"))
    assert "diag" not in pv.registered_methods()


def test_config_fields_become_flags_of_both_trainers_with_the_method_learning_rates(declared):
    args = vtab.parse_args(["--method", "diag", "--limit", "0.25"])
    assert args.lr == 3e-2 and build_config(declared, args).limit == 0.25
    assert build_config(declared, vtab.parse_args(["--method", "diag", "--limit", "none"])).limit is None
    assert build_config(declared, vtab.parse_args(["--method", "diag"])).limit is None  # the config's default
    args = dreambooth.parse_args(["--method", "diag", "--limit", "0.25"])
    assert args.learning_rate == 2e-3 and build_config(declared, args).limit == 0.25
    # the shipped methods' fields too, under the names the trainers had before
    oft = vtab.parse_args(["--method", "oft", "--block-size", "8", "--block-size-pattern", "fc1=16", "--neumann-terms",
                           "none"])
    assert build_config(pv.get_method("oft"), oft) == pv.OFTConfig(block_size=8, block_size_pattern={"fc1": 16},
                                                                     neumann_terms=None)
    psoft = dreambooth.parse_args(["--rank", "4", "--no-train_alpha", "--split_qkv", "--svd", "lowrank"])
    assert build_config(pv.get_method("psoft"), psoft) == pv.PSOFTConfig(rank=4, train_alpha=False, split_qkv=True,
                                                                          svd="lowrank")
    pv.unregister_method("diag")
    with pytest.raises(SystemExit):  # the flag goes with the method
        vtab.parse_args(["--limit", "0.25"])


@pytest.mark.trainer
def test_a_declared_method_trains_saves_loads_and_exports_with_its_flags_in_both_trainers(declared, tmp_path):
    metrics = vtab.main(["--method", "diag", "--limit", "0.25", "--epochs", "1", "--quiet", "--output-dir",
                         str(tmp_path / "vtab")])
    assert metrics["finished"] and metrics["args"]["lr"] == 3e-2
    header, _ = pv.read_adapter(tmp_path / "vtab" / "adapter.safetensors")
    assert header["config"]["limit"] == 0.25
    model = vtab.create_model(vtab.parse_args(["--method", "diag"]), num_classes=metrics["classes"]).eval()
    fresh = copy.deepcopy(model)
    pv.load_adapter(model, tmp_path / "vtab" / "adapter.safetensors")
    assert {adapter.limit for _, layer in pv.adapted_layers(model) for adapter in layer.adapters.values()} == {0.25}
    import peft
    exported = pv.export_lora(model, tmp_path / "peft", format="peft", full_deltas=True)
    loaded = peft.PeftModel.from_pretrained(fresh, exported).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert ((loaded(x) - model(x)).norm() / model(x).norm()).item() <= 1e-5

    build_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    result = dreambooth.main([
        "--method", "diag", "--limit", "0.25", "--pretrained_model_name_or_path", str(tmp_path / "pipe"),
        "--output_dir", str(tmp_path / "out"), "--no-with_prior_preservation", "--max_train_steps", "1",
        "--train_batch_size", "1", "--num_validation_images", "1", "--num_inference_steps", "2", "--quiet"])
    header, _ = pv.read_adapter(result["adapter"])
    assert result["finished"] and header["config"]["limit"] == 0.25 and result["args"]["learning_rate"] == 2e-3
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0
