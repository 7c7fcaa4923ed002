"""A third method, defined in this file and registered through psoft_vision's registry alone: it injects as the
identity, saves, loads onto a fresh model, merges, is offered by both trainers' --method and trains in them, with no
other file changed."""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import psoft_vision as pv
from train.dreambooth import trainer as dreambooth
from train.offline.pretrain_t2i import build_pipeline
from train.vtab import trainer as vtab
from train.vtab.data import Preprocess

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(kw_only=True)
class DiagConfig(pv.AdapterConfig):
    """No settings of its own: one scale per input channel of every target layer."""

    method = "diag"


class DiagAdapter(pv.Adapter):
    """``W' = W diag(s)``: each input feature (Linear) or input channel (Conv2d) scaled by a learnable ``s``, ones
    at init. Scaling the input rather than the output keeps ``forward`` equal to the merged layer where the layer
    has a bias, which merging leaves alone."""

    method = "diag"

    def __init__(self, base, config: DiagConfig):
        super().__init__(config)
        self.conv = base.conv is not None
        self.s = nn.Parameter(torch.ones(base.in_features, device=base.device))

    def scales(self) -> torch.Tensor:
        return self.at_strength(self.s, 1.0)

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        s = self.scales().to(x.dtype)
        return inner(x * s[:, None, None] if self.conv else x * s)

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.scales().view(1, -1, *[1] * (weight.ndim - 2))
        return (weight.float() * s).to(weight.dtype)

    def describe(self) -> dict:
        return {"channels": self.s.numel()}


@pytest.fixture
def diag():
    method = pv.register_method(pv.Method("diag", DiagConfig, DiagAdapter, size_field=None,
                                          summary="a learnable scale per input channel (a test method)"))
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
