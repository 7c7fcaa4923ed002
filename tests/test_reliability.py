"""No silent wrongness (issue 17): every bad input is a named error that leaves the model and the files as they were,
or it is handled correctly. Ends with a seeded fuzz test over configs, names, layer types and tampered files."""

import copy
import json
import os
import random
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import timm
import torch
from helpers import rel_err
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import psoft_vision as pv
from psoft_vision.formats.fingerprint import fingerprint, mismatch
from psoft_vision.testing import randomize_adapters

ASSETS = Path(__file__).resolve().parent.parent / "assets"


class Net(nn.Module):
    """Linear, conv and attention layers, small enough for hundreds of injections a second."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, image):
        h = self.fc2(torch.relu(self.fc1(x)))
        return self.attn(h, h, h)[0].sum() + self.conv(image).sum()


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def net_inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 16, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)


def snapshot(model: nn.Module) -> tuple:
    lazy = nn.parameter.UninitializedParameter
    return ({k: v if isinstance(v, lazy) else v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m).__name__ for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: (list(m.active), list(m.merged)) for n, m in pv.adapted_layers(model)})


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN (a damaged base model stays as damaged)."""
    if isinstance(a, nn.parameter.UninitializedParameter):
        return a is b
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all())


def assert_same(model: nn.Module, before: tuple) -> None:
    weights, types, flags, stacks = snapshot(model)
    assert types == before[1] and flags == before[2] and stacks == before[3]
    assert weights.keys() == before[0].keys() and all(identical(weights[k], v) for k, v in before[0].items())


# ------------------------------------------------------------------------------------------------ fingerprints
def test_fingerprint_tells_other_weights_from_a_dtype_change():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(768, 3072, generator=gen) * 0.02
    saved = fingerprint(w)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert mismatch(saved, w.to(dtype)) is None, dtype
    others = {
        "re-initialised": torch.randn(768, 3072, generator=gen) * 0.02,
        "negated": -w,
        "rows shuffled": w[torch.randperm(768, generator=gen)],
        "columns shuffled": w[:, torch.randperm(3072, generator=gen)],
        "another checkpoint (3% further training)": w + 0.03 * w.std() * torch.randn(768, 3072, generator=gen),
        "scaled by 1.05": 1.05 * w,
        "transposed and reshaped": w.T.reshape(768, 3072),
    }
    for what, other in others.items():
        assert mismatch(saved, other) is not None, what
    broken = w.clone()
    broken[3, 5] = float("nan")
    assert mismatch(saved, broken) == "NaN or infinite values"
    assert mismatch({**saved, "probes": [float("nan")] * 8}, w) == "NaN or infinite values"
    assert "shape" in mismatch(saved, w[:, :100])


def test_fingerprint_is_cheap():
    w = torch.randn(768, 3072)
    fingerprint(w)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fingerprint(w)
        times.append(time.perf_counter() - start)
    assert sorted(times)[2] < 0.05  # a ViT-B MLP weight; a few ms on one core (the docstring's figure)


def test_another_base_of_the_same_shapes_is_refused(tmp_path):
    model = timm.create_model("test_vit", pretrained=False, num_classes=10)
    pv.inject(model, pv.PSOFTConfig(rank=4))
    path = pv.save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(123)
    other = timm.create_model("test_vit", pretrained=False, num_classes=10)
    before = snapshot(other)
    with pytest.raises(pv.BaseModelMismatchError, match="base weights differ.*probe moved"):
        pv.load_adapter(other, path)
    assert_same(other, before)


# ---------------------------------------------------------------------------------------------- adapter files
def trained_file(tmp_path, model=None, strength=1.0):
    model = model or net()
    pv.inject(model, pv.PSOFTConfig(rank=4, targets=["fc1", "fc2", "conv", "attn.out_proj"]))
    randomize_adapters(model, std=0.2)
    pv.set_strength(model, strength)
    return model, pv.save_adapter(model, tmp_path / "adapter.safetensors")


def test_strength_is_saved_and_restored(tmp_path):
    with pytest.warns(UserWarning, match="outside"):
        pv.set_strength(pv.inject(net(), pv.PSOFTConfig(rank=4, targets=["fc1"])), 1.5)
    model, path = trained_file(tmp_path, strength=0.5)
    x = net_inputs()
    loaded = pv.load_adapter(net(), path)
    assert pv.read_adapter(path)[0]["strength"] == 0.5
    assert all(layer.adapters["default"].strength == 0.5 for _, layer in pv.adapted_layers(loaded))
    with torch.no_grad():
        assert rel_err(loaded(*x), model(*x)) <= 1e-6


def test_a_parent_reading_the_weight_trains_and_merges_the_adapter():
    """nn.MultiheadAttention computes with out_proj.weight, never calling out_proj: the adapter must still act."""
    model = net()
    x = net_inputs()
    pv.inject(model, pv.PSOFTConfig(rank=4, targets=["attn.out_proj"]))
    randomize_adapters(model, std=0.2)
    out = model(*x)
    out.backward()
    adapter = model.attn.out_proj.adapters["default"]
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter.parameters())
    with torch.no_grad():
        base = net()(*x)
        assert rel_err(out.detach(), base) > 1e-4  # the adapter changes what the parent computes
        pv.merge(model)
        assert rel_err(model(*x), out.detach()) <= 1e-5


def test_temporaries_of_killed_saves_are_removed_and_files_get_ordinary_permissions(tmp_path):
    target = tmp_path / "adapter.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".adapter.safetensors.{int(dead.stdout)}.psoft-tmp"
    stale.write_bytes(b"x" * 1000)
    unrelated = tmp_path / ".other.safetensors.1.psoft-tmp"
    unrelated.write_bytes(b"x")
    _, path = trained_file(tmp_path)
    assert path == target and not stale.exists() and unrelated.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_remove_gives_back_the_requires_grad_flags():
    model = net()
    model.fc1.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    pv.inject(model, pv.PSOFTConfig(rank=4, targets=["fc1"]))
    pv.inject(model, pv.OFTConfig(block_size=4, targets=["fc2"]), name="second")
    pv.remove(model, "default")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "adapters" not in n)
    pv.remove(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def tamper(path, edit_header=None, edit_tensors=None, raw_metadata=None):
    """Rewrite an adapter file with its header or tensors changed (bypassing psoft_vision's own writer)."""
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(metadata["psoft_vision"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    metadata["psoft_vision"] = raw_metadata if raw_metadata is not None else json.dumps(header)
    save_file(tensors, path, metadata=metadata)
    return path


def first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


TAMPERINGS = {
    "garbage JSON": (dict(raw_metadata="{not json"), pv.AdapterFileError, "damaged psoft_vision metadata"),
    "JSON list": (dict(raw_metadata="[1, 2]"), pv.AdapterFileError, "not a JSON object"),
    "unknown method": (dict(edit_header=lambda h: h.update(method="lora")), pv.AdapterFileError, "'lora' adapter"),
    "missing layers": (dict(edit_header=lambda h: h.pop("layers")), pv.AdapterFileError, "layers"),
    "newer version": (dict(edit_header=lambda h: h.update(format_version=99)), pv.AdapterVersionError, "99"),
    "bad config value": (dict(edit_header=lambda h: h["config"].update(rank=-3)), pv.AdapterFileError, "rank=-3"),
    "unknown layer": (dict(edit_header=lambda h: h["layers"].update({"nope": {"rank": 4}})), pv.KeyMismatchError,
                      "nope"),
    "NaN tensor": (dict(edit_tensors=lambda t: t[first_key(t, ".q")].fill_(float("nan"))), pv.AdapterFileError,
                   "NaN or infinite"),
    "inf tensor": (dict(edit_tensors=lambda t: t[first_key(t, ".alpha")].fill_(float("inf"))), pv.AdapterFileError,
                   "NaN or infinite"),
    "integer tensor": (dict(edit_tensors=lambda t: t.update({(k := first_key(t, ".q")): t[k].to(torch.int8)})),
                       pv.KeyMismatchError, "int8"),
    "missing tensor": (dict(edit_tensors=lambda t: t.pop(first_key(t, ".beta"))), pv.KeyMismatchError, "missing"),
    "extra tensor": (dict(edit_tensors=lambda t: t.update(extra=torch.zeros(2))), pv.KeyMismatchError, "unknown"),
    "wrong shape": (dict(edit_tensors=lambda t: t.update({first_key(t, ".q"): torch.zeros(1, 2)})),
                    pv.KeyMismatchError, "wrong shape"),
    "NaN fingerprint": (dict(edit_header=lambda h: next(iter(h["fingerprints"].values())).update(
        probes=[float("nan")] * 8)), pv.BaseModelMismatchError, "NaN"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_tampered_files_are_named_and_change_nothing(tmp_path, case):
    _, path = trained_file(tmp_path)
    edits, error, match = TAMPERINGS[case]
    tamper(path, **edits)
    model = net()
    pv.inject(model, pv.OFTConfig(block_size=4, targets=["fc1"]), name="other")
    pv.merge(model)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        pv.load_adapter(model, path)
    assert_same(model, before)


def test_other_peoples_files_say_what_they_are(tmp_path):
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT"}))
    save_file({"base_model.model.fc1.oft_R.weight": torch.zeros(2)}, peft_dir / "adapter_model.safetensors")
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)}, kohya)
    diffusers_lora = tmp_path / "diffusers.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 2)}, diffusers_lora)
    for path, what in ((peft_dir, "PEFT OFT adapter folder.*PeftModel.from_pretrained"),
                       (peft_dir / "adapter_model.safetensors", "PEFT OFT adapter folder"),
                       (kohya, "kohya-style LoRA.*load_lora_weights"),
                       (diffusers_lora, "diffusers LoRA file.*load_lora_weights"),
                       (tmp_path / "missing.safetensors", "does not exist")):
        with pytest.raises(pv.AdapterFileError, match=what):
            pv.load_adapter(net(), path)


# ------------------------------------------------------------------------------------------- low precision
@torch.no_grad()
def test_the_shipped_adapter_on_a_bf16_copy_of_its_base_errs_no_more_than_twice_the_base_rounding(tmp_path):
    """The trained photo-crops adapter on the shipped backbone (issue 17 measured 6.3% without anchors)."""
    import train.offline.backbone  # noqa: F401  registers the shipped backbone
    from train.vtab.data import Preprocess, offline_splits

    base = timm.create_model("vit_pico_patch8_32.fmnist", pretrained=True, num_classes=8).eval()
    test_set = offline_splits("photo-crops", "train800", "val200", Preprocess.for_model(base))[2]
    x = torch.stack([test_set[i][0] for i in range(256)])
    model = pv.load_adapter(copy.deepcopy(base), ASSETS / "vtab-photo-crops-psoft.safetensors")
    path = pv.save_adapter(model, tmp_path / "a.safetensors")  # this version's file: with the subspace anchors
    expected = model(x)
    same_head = copy.deepcopy(base)
    same_head.head = copy.deepcopy(model.head)  # the base with the trained head: its rounding alone
    base_out = same_head(x)
    for dtype in (torch.bfloat16, torch.float16):
        low = copy.deepcopy(same_head).to(dtype)
        rounding = rel_err(low(x.to(dtype)).float(), base_out)
        pv.load_adapter(low, path)
        error = rel_err(low(x.to(dtype)).float(), expected)
        assert error <= 2 * rounding, (dtype, error, rounding)
    assert torch.equal(pv.load_adapter(copy.deepcopy(base), path)(x), expected)  # same dtype: bit for bit


def test_adapters_injected_into_an_eval_model_run_in_eval_mode(tmp_path):
    """Adapter dropout must not act in an eval-mode model (load_adapter used to leave it on: random outputs)."""
    model = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    pv.inject(model, pv.PSOFTConfig(rank=4, dropout=0.5))
    randomize_adapters(model, std=0.2)
    assert not any(m.training for m in model.modules())
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    path = pv.save_adapter(model, tmp_path / "a.safetensors")
    loaded = pv.load_adapter(timm.create_model("test_vit", pretrained=False, num_classes=10).eval(), path,
                             check_base=False)
    assert not any(m.training for m in loaded.modules())
    trained = pv.inject(timm.create_model("test_vit", pretrained=False, num_classes=10).train(), pv.OFTConfig())
    assert all(m.training for m in trained.modules())


# ---------------------------------------------------------------------------------------------------- fuzz
BAD_CONFIG_FIELDS = {
    "rank": [0, -1, 2.5, "8", True, None], "block_size": [1, 0, 3.5, "4"], "dropout": [-0.1, 1.0, "x", None, True],
    "neumann_terms": [0, -2, 1.5, "4"], "svd": ["qr", 3], "targets": [5, [], [""], [3], "(", 3.0],
    "exclude": [3, "(", [None]], "train_modules": [5, [3], [""]], "rank_pattern": [{"fc1": 0}, [], {3: 4}],
    "block_size_pattern": [{"fc1": 1}, "x"],
}
BAD_NAMES = ["", "a.b", 3, None, "training", "forward", "half", "eval", "_modules", "cuda", "to", "default"]
BAD_LAYERS = {
    "LayerNorm": lambda: nn.LayerNorm(16), "Embedding": lambda: nn.Embedding(4, 16),
    "Conv1d": lambda: nn.Conv1d(4, 4, 3), "ConvTranspose2d": lambda: nn.ConvTranspose2d(4, 4, 3),
    "lazy": lambda: nn.LazyLinear(4), "empty": lambda: nn.Linear(16, 0),
    "weight_norm": lambda: nn.utils.weight_norm(nn.Linear(16, 16)),
    "NaN weights": lambda: nn.Linear(16, 16).requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan"))),
}


BAD_METADATA = {  # values of the header's fields, and of each layer's facts and fingerprint, that a file may hold
    "strength": [1e308, float("inf"), float("nan"), -1e3, 101, "1", True, None, [1]],
    "format_version": [True, "2", 2.5, 3, None], "anchors": ["yes", 1, None], "include_bases": [1, "no", None],
    "name": [3, None, "", "a.b"], "method": [None, 3, "lora"], "config": [[], "x", None],
    "layers": [[], "x", None], "fingerprints": [[], "x", None],
}
BAD_CONFIG_VALUES = {"neumann_terms": [10**9, 65, 0, "4"], "rank": [0, "4", 10**9], "train_modules": ["fc1", 3],
                     "svd": [3]}
BAD_LAYER_FACTS = {"rank": ["4", 0, -1, 2.5, True, 10**9, None], "weight_dtype": [3, ["float16"], None]}
BAD_FINGERPRINT_VALUES = ["x", None, [], {}, float("nan"), 1e308, [1.0] * 3, -1, True]


def bad_metadata(rng: random.Random, header: dict) -> tuple[str, str | None]:
    """Damage one of the header's fields (or the JSON itself): returns (what was done, raw JSON or None)."""
    kind = rng.choice(["field", "config", "layer", "layer facts", "fingerprint", "fingerprint type", "missing",
                       "raw"])
    layer = rng.choice(sorted(header["layers"]))
    if kind == "field":
        field = rng.choice(list(BAD_METADATA))
        header[field] = rng.choice(BAD_METADATA[field])
        return f"{field}={header[field]!r}", None
    if kind == "config":
        field = rng.choice(list(BAD_CONFIG_VALUES))
        header["config"][field] = rng.choice(BAD_CONFIG_VALUES[field])
        return f"config {field}={header['config'][field]!r}", None
    if kind == "layer":
        field = rng.choice(list(BAD_LAYER_FACTS))
        header["layers"][layer][field] = rng.choice(BAD_LAYER_FACTS[field])
        return f"layer {layer} {field}={header['layers'][layer][field]!r}", None
    if kind == "layer facts":
        header["layers"][layer] = rng.choice([[], 4, "x", None])
        return f"layer {layer} facts {header['layers'][layer]!r}", None
    if kind == "fingerprint":
        key = rng.choice(sorted(header["fingerprints"][layer]))
        header["fingerprints"][layer][key] = rng.choice(BAD_FINGERPRINT_VALUES)
        return f"fingerprint {layer} {key}={header['fingerprints'][layer][key]!r}", None
    if kind == "fingerprint type":
        header["fingerprints"][layer] = rng.choice([[], 4, "x", None])
        return f"fingerprint {layer} = {header['fingerprints'][layer]!r}", None
    if kind == "missing":
        where = rng.choice([header, header["config"], header["layers"][layer], header["fingerprints"][layer]])
        key = rng.choice(sorted(where))
        del where[key]
        return f"without {key!r}", None
    depth = rng.choice([10, 1000, 100_000])
    text = rng.choice(['{"method": "psoft", "method": "oft"}', "[" * depth + "]" * depth,
                       json.dumps(header)[:-1] + ', "strength": 0.5}'])  # the last: a duplicate key at the end
    return f"raw JSON {text[:40]!r}", text


def fuzz_case(rng: random.Random, tmp_path, good_file):
    """One random bad input: returns (description, callable that must raise a named error or work, model)."""
    model = net()
    if rng.random() < 0.3:  # sometimes a model that already carries a merged adapter
        pv.inject(model, pv.OFTConfig(block_size=4, targets=["fc2"]), name="default")
        pv.merge(model)
    kind = rng.choice(["config", "name", "layer", "file", "file bytes", "metadata"])
    if kind == "config":
        field = rng.choice(list(BAD_CONFIG_FIELDS))
        value = rng.choice(BAD_CONFIG_FIELDS[field])
        make = pv.OFTConfig if field.startswith("block_size") or field == "neumann_terms" and rng.random() < .5 \
            else pv.PSOFTConfig
        extra = {} if field == "targets" else {"targets": ["fc1"]}
        return f"{make.__name__}({field}={value!r})", lambda: pv.inject(model, make(**extra, **{field: value})), model
    if kind == "name":
        name = rng.choice(BAD_NAMES)
        return f"name={name!r}", lambda: pv.inject(model, pv.PSOFTConfig(rank=4, targets=["fc1"]), name=name), model
    if kind == "layer":
        which = rng.choice(list(BAD_LAYERS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fc1 = BAD_LAYERS[which]()
        config = rng.choice([pv.PSOFTConfig(rank=4, targets=["fc1"]), pv.OFTConfig(block_size=4, targets=["fc1"])])
        return f"layer {which}", lambda: pv.inject(model, config), model
    path = tmp_path / f"case{rng.randrange(10**9)}.safetensors"
    if kind == "metadata":
        path.write_bytes(good_file.read_bytes())
        done = []
        tamper(path, edit_header=lambda header: done.extend(bad_metadata(rng, header)))
        what, raw = done
        if raw is not None:
            tamper(path, raw_metadata=raw)
        return f"metadata {what}", lambda: pv.load_adapter(model, path), model
    data = bytearray(good_file.read_bytes())
    if kind == "file":  # truncation
        path.write_bytes(bytes(data[:rng.randrange(len(data))]))
    else:  # flipped bytes anywhere: in the header they break it; in tensor data they change values (no checksum)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    return f"{kind} {path.name}", lambda: pv.load_adapter(model, path), model


def test_fuzz_bad_inputs_are_named_errors_that_change_nothing(tmp_path):
    _, good_file = trained_file(tmp_path)
    rng = random.Random(0)
    start, outcomes = time.perf_counter(), {"named error": 0, "worked": 0}
    kinds = set()
    for _ in range(360):
        description, attempt, model = fuzz_case(rng, tmp_path, good_file)
        kinds.add(description.split()[0])
        before = snapshot(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                attempt()
        except pv.PSOFTVisionError:
            assert_same(model, before)
            outcomes["named error"] += 1
        except Exception as error:  # noqa: BLE001  anything else is a failure of the test, with the case named
            raise AssertionError(f"{description}: {type(error).__name__}: {error}") from error
        else:
            outcomes["worked"] += 1  # byte flips in tensor data, or a config the layer takes: the model must run
            with torch.no_grad():
                out = model(*net_inputs())
            assert torch.isfinite(out).all() or "bytes" in description, description
    assert outcomes["named error"] > 240 and time.perf_counter() - start < 60, outcomes
    assert "metadata" in kinds
