"""The timm zoo (bench/zoo.py): every check of the sweep, with PSOFT and OFTv2 defaults, on a representative subset
of timm families in the default suite, and on every family under ``pytest -m zoo`` (``make zoo`` runs the same
sweep and rewrites docs/models.md), with the fx and ``features_only`` checks. Then that the checks catch a wrong
merge, an adapter left out of the forward, a rotation traced in as a constant, a traced graph a little off and a
wrapper's wrong layer set, and that the table replaces only its own section of docs/models.md."""

import pytest
import timm
import torch

import psoft_vision.adapter
import psoft_vision.targets.structure
import psoft_vision.tracing
from bench import zoo
from bench.zoo import Entry
from psoft_vision.layer import AdaptedLayer
from psoft_vision.methods.psoft import PSOFTAdapter

pytestmark = [pytest.mark.bench, pytest.mark.usefixtures("one_thread")]

#: One family per kind of layer handling; smaller builds than the sweep's where its model takes seconds.
SUBSET = [
    zoo.entry_for("vision_transformer"),
    # EvaAttention calls F.linear(x, self.qkv.weight, qkv_bias): a parent that reads its child's weight
    Entry("eva", "vit_tiny_patch16_dinov3_qkvb", {"depth": 2, "img_size": 128}),
    # SwinV2 reads qkv.weight too, and updates the layer's output in place
    Entry("swin_transformer_v2", "swinv2_tiny_window8_256",
          {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}),
    zoo.entry_for("resnet"),
    zoo.entry_for("efficientnet"),  # Conv2dSame, on the weight path
    zoo.entry_for("nfnet"),  # ScaledStdConv2d, on the weight path
    zoo.entry_for("convnext"),
    zoo.entry_for("maxxvit"),  # CoAtNet
    zoo.entry_for("mobilenetv3"),
    zoo.entry_for("levit"),  # linears wrapped with their batch norm
    Entry("inception_v3", "inception_v3", size=128),  # a function group_matcher
    Entry("hrnet", "hrnet_w18_small", size=128),  # a dict group_matcher whose blocks are named block_types
    zoo.entry_for("mlp_mixer"),
]


def assert_passes(result: zoo.FamilyResult, traceable: bool = True) -> None:
    assert not result.error, f"{result.entry.label()}: {result.error}"
    failures = {m: f"{r.status}: {r.detail}" for m, r in result.methods.items() if r.status != "pass"}
    assert not failures, f"{result.entry.label()}: {failures}"
    assert not result.contract_failures(), f"{result.entry.label()}: {result.contract_failures()}"
    assert result.layers > 0
    if traceable:  # every family of the subset traces with timm's fx feature extraction
        assert all(r.fx == "pass" for r in result.methods.values()), {m: r.fx for m, r in result.methods.items()}


@pytest.mark.parametrize("entry", SUBSET, ids=lambda e: e.family)
def test_representative_families_pass_every_check(entry):
    assert_passes(zoo.run(entry))


@pytest.mark.zoo
@pytest.mark.parametrize("family", zoo.families())
def test_every_timm_family_passes_every_check(family):
    assert_passes(zoo.run_family(family), traceable=False)  # "n/a" where timm cannot trace the plain model


def test_every_shrunk_entry_is_a_timm_family_and_says_why():
    assert set(zoo.SHRUNK) <= set(zoo.families())
    assert all(entry.why and entry.family == family for family, entry in zoo.SHRUNK.items())


def test_a_wrong_merge_fails_the_sweep(monkeypatch):
    monkeypatch.setattr(PSOFTAdapter, "merge_into", lambda self, weight: weight)
    result = zoo.run(zoo.entry_for("vision_transformer"), methods=("psoft",))
    assert result.methods["psoft"].status == "fail"
    assert "merged differs from unmerged" in result.methods["psoft"].detail


def test_an_adapter_outside_the_forward_fails_the_sweep(monkeypatch):
    # in the graph, but with no effect on the output: every gradient is zero
    monkeypatch.setattr(AdaptedLayer, "forward", lambda self, x: self.base(x) + 0 * self.weight.sum())
    result = zoo.run(zoo.entry_for("resnet"), methods=("oft",))
    assert result.methods["oft"].status == "fail"
    assert "no gradient" in result.methods["oft"].detail


def test_a_rotation_traced_in_as_a_constant_fails_the_fx_check(monkeypatch):
    # the cache read while tracing without gradients: the graph holds the rotation, not the parameters
    monkeypatch.setattr(psoft_vision.adapter, "tracing", lambda: False)
    result = zoo.run(zoo.entry_for("resnet"), methods=("oft",))
    assert result.methods["oft"].status == "pass"
    assert "parameters get a gradient eagerly, 0 traced" in result.methods["oft"].fx
    assert result.contract_failures()


def test_a_traced_graph_a_little_off_fails_the_fx_check(monkeypatch):
    # what tracing records is 1e-4 (relative) off in every layer: under the tolerance of a check made in fp32 on
    # some families (their own rounding), far over it in fp64, where the check runs
    forward = PSOFTAdapter.forward
    monkeypatch.setattr(PSOFTAdapter, "forward",
                        lambda self, x, inner: forward(self, x, inner) * (1 + 1e-4 * psoft_vision.tracing.fx_tracing()))
    result = zoo.run(zoo.entry_for("resnet"), methods=("psoft",))
    assert result.methods["psoft"].status == "pass"
    assert result.methods["psoft"].fx.startswith("traced differs from eager by")


def test_a_wrapper_with_the_wrong_layers_fails_the_features_check(monkeypatch):
    # a wrapper read like any other model: its stages of one block are no repeated blocks
    monkeypatch.setattr(psoft_vision.targets.structure, "_feature_wrapper", lambda model: None)
    features = zoo.check_features(zoo.entry_for("regnet"))
    assert features and all(s != "pass" for s in features.values() if not s.startswith("n/a"))


def test_wrapper_names_map_back_where_a_stage_name_holds_underscores():
    full = timm.create_model("dpn48b", pretrained=False)  # features.conv2_1, flattened to features_conv2_1
    wrapper = timm.create_model("dpn48b", pretrained=False, features_only=True)
    assert zoo.original_name(wrapper, full, "features_conv2_1.c1x1_a.conv") == "features.conv2_1.c1x1_a.conv"


def test_zero_and_layer_scale_parameters_get_signal():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].weight.fill_(1e-5)
        kept = model[1].bias.clone() + 1
        model[1].bias.copy_(kept)
    zoo.emulate_pretrained(model)
    assert model[0].weight.abs().min() > 0 and model[1].weight.abs().max() > 1e-3
    assert torch.equal(model[1].bias, kept)


def test_the_table_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "models.md"
    path.write_text("# Models\n\n## timm\n\n<!-- timm-zoo:start -->\nold\n<!-- timm-zoo:end -->\n\n## diffusers\n\n"
                    "<!-- diffusers:start -->\nunet table\n<!-- diffusers:end -->\n")
    result = zoo.run(zoo.entry_for("resnet"))
    zoo.write_section(path, zoo.markdown([result], 1.0, "make zoo"))
    text = path.read_text()
    assert "old" not in text and "| resnet | `test_resnet` | 160 | 12 |" in text
    assert text.endswith("## diffusers\n\n<!-- diffusers:start -->\nunet table\n<!-- diffusers:end -->\n")
    fresh = tmp_path / "new.md"
    zoo.write_section(fresh, "table")
    text = fresh.read_text()
    assert text.startswith("# Models") and "## timm\n\n<!-- timm-zoo:start -->\ntable\n<!-- timm-zoo:end -->" in text
