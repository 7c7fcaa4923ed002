"""The Hugging Face hub with no network: hub ids resolve from a cache laid out as huggingface_hub lays it out
(``models--org--name/blobs``, ``snapshots/<commit>/...`` linking to the blobs, ``refs/<branch or tag>``) under
HF_HUB_OFFLINE=1, for an adapter repository, a timm model and a diffusers pipeline, at more than one revision;
uploads go through huggingface_hub's own client with its HTTP transport replaced by one that records every request
and answers as the hub does; model cards are read back with huggingface_hub's ``ModelCard``."""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

import psoft_vision as pv
from psoft_vision.formats.native import load_adapter_into_pipeline
from psoft_vision.testing import randomize_adapters
from train.offline.pretrain_t2i import build_pipeline

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ the cache
def lay_out(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """``folder``'s files as hub repository ``repo_id`` at ``revision`` in ``cache``, as hf_hub_download leaves them:
    content-addressed blobs, a snapshot of relative links named by the commit, the ref naming the commit."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    commit = hashlib.sha1(f"{repo_id}@{revision}:{sorted(digests.values())}".encode()).hexdigest()
    for path, digest in digests.items():
        blob = root / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(path.read_bytes())
        link = root / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE at an empty folder. huggingface_hub read both when it was imported (before
    this test), so its constants are set too; the subprocess tests get the environment alone."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))


def adapted(seed: int) -> torch.nn.Module:
    model = tiny_model()
    pv.inject(model, pv.PSOFTConfig(rank=4, targets=["0", "2"]))
    randomize_adapters(model, seed=seed)
    return model


# ------------------------------------------------------------------------------------------- hub ids resolve
def test_adapter_repository_loads_by_hub_id_at_each_revision_offline(offline_cache, tmp_path):
    x = torch.randn(3, 16)
    first, second = adapted(1), adapted(2)
    pv.save_adapter(first, tmp_path / "main" / "adapter.safetensors", model_card=True)
    pv.save_adapter(first, tmp_path / "main" / "weights" / "other.safetensors")
    pv.save_adapter(second, tmp_path / "v1" / "adapter.safetensors")
    main = lay_out(offline_cache, "someone/adapter", tmp_path / "main")
    lay_out(offline_cache, "someone/adapter", tmp_path / "v1", revision="v1")

    def loaded(**where):
        return pv.load_adapter(tiny_model(), "someone/adapter", **where)(x)

    with torch.no_grad():
        expected_first, expected_second = first(x), second(x)
        torch.testing.assert_close(loaded(), expected_first, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(revision="v1"), expected_second, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(revision=main), expected_first, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(weight_name="weights/other.safetensors"), expected_first, rtol=1e-5,
                                   atol=1e-6)
        # a local folder takes a weight_name the same way, and its adapter.safetensors without one
        for where in (dict(weight_name="adapter.safetensors"), dict()):
            local = pv.load_adapter(tiny_model(), tmp_path / "v1", **where)(x)
            torch.testing.assert_close(local, expected_second, rtol=1e-5, atol=1e-6)
    assert not (offline_cache / "models--someone--adapter" / "refs" / "v2").exists()


def test_hub_failures_are_named_errors_that_say_what_was_tried(offline_cache, tmp_path):
    pv.save_adapter(adapted(1), tmp_path / "repo" / "adapter.safetensors")
    lay_out(offline_cache, "someone/adapter", tmp_path / "repo")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(path="someone/missing"), r"'someone/missing' is not on disk; as a hub id: 'adapter.safetensors' of "
                                       r"hub repository 'someone/missing' \(revision 'main'\) is not in the local "
                                       rf"cache \({re.escape(str(offline_cache))}\) and HF_HUB_OFFLINE=1 is set"),
        (dict(path="someone/adapter", revision="v9"), r"revision 'v9'.* not in the local cache"),
        (dict(path="someone/adapter", weight_name="nope.safetensors"), r"'nope.safetensors' of hub repository"),
    ]
    for where, message in cases:
        with pytest.raises(pv.HubOfflineError, match=message):
            pv.load_adapter(model, where.pop("path"), **where)
    assert pv.adapter_names(model) == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a missing local path that cannot be a repository id is reported by the loader as before
    with pytest.raises(pv.AdapterFileError, match="does not exist"):
        pv.load_adapter(model, tmp_path / "nowhere" / "adapter.safetensors")
    # an upload that cannot happen fails before the run starts, and leaves nothing behind
    from train.vtab import trainer as vtab

    out = tmp_path / "never"
    with pytest.raises(pv.HubOfflineError, match="cannot upload to hub repository 'someone/run': HF_HUB_OFFLINE=1"):
        vtab.main(["--output-dir", str(out), "--push-to-hub", "--hub-model-id", "someone/run", "--quiet"])
    assert not out.exists()


def test_missing_huggingface_hub_names_the_extra_and_the_core_never_imports_it(monkeypatch):
    script = "import sys, psoft_vision; print('huggingface_hub' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.split() == ["False"]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if it were not installed
    with pytest.raises(pv.MissingExtraError, match=r"pip install 'psoft-vision\[hub\]'"):
        pv.load_adapter(tiny_model(), "someone/adapter")


def timm_repo(tmp_path: Path, name: str, seed: int) -> tuple[Path, dict]:
    """A timm hub repository folder (config.json + model.safetensors, timm's own save_for_hf) of the project's
    backbone architecture with weights from ``seed``."""
    import timm
    from timm.models import save_for_hf

    import train.offline.backbone  # noqa: F401  registers the architecture

    torch.manual_seed(seed)
    model = timm.create_model("vit_pico_patch8_32", num_classes=5)
    save_for_hf(model, tmp_path / name)
    return tmp_path / name, model.state_dict()


@pytest.mark.trainer
def test_timm_models_resolve_by_hub_id_and_revision_in_the_vtab_trainer(offline_cache, tmp_path):
    from train.vtab import trainer as vtab

    main, main_weights = timm_repo(tmp_path, "main", 0)
    v1, v1_weights = timm_repo(tmp_path, "v1", 1)
    lay_out(offline_cache, "someone/pico", main)
    lay_out(offline_cache, "someone/pico", v1, revision="v1")
    for extra, weights in (([], main_weights), (["--revision", "v1"], v1_weights)):
        model = vtab.create_model(vtab.parse_args(["--model", "hf-hub:someone/pico", *extra]), num_classes=5)
        assert all(torch.equal(model.state_dict()[k], w) for k, w in weights.items())
    with pytest.raises(pv.HubOfflineError, match=r"'someone/pico' \(revision 'v2'\)"):
        vtab.create_model(vtab.parse_args(["--model", "hf-hub:someone/pico", "--revision", "v2"]), 5)
    with pytest.raises(vtab.TrainerFlagError, match="no weights on the hub"):
        vtab.create_model(vtab.parse_args(["--revision", "v1"]), 5)  # the shipped backbone is a local file

    # a timm name with a tag: its weights come from the repository its pretrained_cfg names, at --revision
    import timm
    from safetensors.torch import save_file

    tiny = "vit_tiny_patch16_224.augreg_in21k"
    torch.manual_seed(3)
    reference = timm.create_model(tiny).state_dict()
    (tmp_path / "tiny").mkdir()
    save_file(reference, tmp_path / "tiny" / "model.safetensors")
    lay_out(offline_cache, "timm/vit_tiny_patch16_224.augreg_in21k", tmp_path / "tiny", revision="v1")
    model = vtab.create_model(vtab.parse_args(["--model", tiny, "--revision", "v1"]), num_classes=5)
    assert all(torch.equal(w, reference[k]) for k, w in model.state_dict().items() if not k.startswith("head."))
    with pytest.raises(pv.HubOfflineError, match=r"'timm/vit_tiny_patch16_224.augreg_in21k' \(revision 'main'\)"):
        vtab.create_model(vtab.parse_args(["--model", tiny]), num_classes=5)

    out = tmp_path / "run"
    metrics = vtab.main(["--model", "hf-hub:someone/pico", "--revision", "v1", "--task", "rotation", "--epochs", "1",
                         "--quiet", "--output-dir", str(out)])
    card = check_card(out)
    assert card.data.base_model == "someone/pico" and card.data.library_name == "timm"
    assert {"psoft", "image-classification", "timm"} <= set(card.data.tags)
    assert f'timm.create_model("hf-hub:someone/pico", pretrained=True, num_classes={metrics["classes"]})' in card.text
    assert f"| test accuracy | {metrics['test_acc']:.4g} |" in card.text


# ------------------------------------------------------------------------------------------------- diffusers
@pytest.fixture(scope="module")
def pipeline_cache(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny pipeline as hub repository someone/tiny-t2i: main with the seed-0 pipeline and an fp16 variant
    (named so, with the seed-2 weights), v1 with the seed-1 pipeline; and a subject."""
    root = tmp_path_factory.mktemp("pipelines")
    cache = root / "home" / "hub"  # HF_HOME/hub: huggingface_hub's cache under HF_HOME
    pipes = {seed: build_pipeline(seed=seed) for seed in (0, 1, 2)}
    pipes[0].save_pretrained(root / "main")
    pipes[2].save_pretrained(root / "main", variant="fp16")
    pipes[1].save_pretrained(root / "v1")
    lay_out(cache, "someone/tiny-t2i", root / "main")
    lay_out(cache, "someone/tiny-t2i", root / "v1", revision="v1")
    subject = root / "subject"
    subject.mkdir()
    from train.dreambooth.cli import DEFAULT_SUBJECT

    for i, view in enumerate(sorted(DEFAULT_SUBJECT.glob("*.png"))[:2]):
        Image.open(view).resize((32, 32)).save(subject / f"view-{i}.png")
    return root, {seed: pipe.unet.state_dict() for seed, pipe in pipes.items()}


@pytest.mark.trainer
@pytest.mark.multiprocess
def test_dreambooth_trains_a_hub_pipeline_at_a_revision_offline_and_its_folder_loads_as_a_repository(
        pipeline_cache, offline_cache, monkeypatch):
    """The trainer in a subprocess whose environment alone (HF_HOME, HF_HUB_OFFLINE=1) points it at the cache; the
    output folder, laid out as repository someone/run, then loads by hub id as its model card says."""
    from train.dreambooth.trainer import load_pipeline

    root, unets = pipeline_cache
    out = root / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {
        "HF_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "train.dreambooth", "--pretrained_model_name_or_path", "someone/tiny-t2i",
               "--revision", "v1", "--instance_data_dir", str(root / "subject"), "--no-with_prior_preservation",
               "--output_dir", str(out), "--train_batch_size", "2", "--max_train_steps", "2", "--num_inference_steps",
               "2", "--num_validation_images", "2", "--rank", "4", "--quiet"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    card = check_card(out)
    assert card.data.base_model == "someone/tiny-t2i" and card.data.library_name == "diffusers"
    assert card.data.instance_prompt == "a photo of sks bag"
    assert {"psoft", "lora", "dreambooth", "text-to-image", "diffusers"} <= set(card.data.tags)
    assert card.data.widget == [{"text": "a photo of sks bag", "output": {"url": "validation/step-000002.png"}}]

    # the variant and the revisions, in this process, through the same cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "home" / "hub"))
    for where, seed in ((dict(), 0), (dict(revision="v1"), 1), (dict(variant="fp16"), 2)):
        unet = load_pipeline("someone/tiny-t2i", torch.device("cpu"), **where).unet.state_dict()
        assert all(torch.equal(unet[k], w) for k, w in unets[seed].items()), where
    with pytest.raises(pv.HubOfflineError, match=r"'someone/tiny-t2i' \(revision 'v7'\)"):
        load_pipeline("someone/tiny-t2i", torch.device("cpu"), revision="v7")

    # the adapter was trained on v1's UNet: it loads by hub id as the card shows, and refuses main's
    lay_out(root / "home" / "hub", "someone/run", out)
    pipe = load_pipeline("someone/tiny-t2i", torch.device("cpu"), revision="v1")
    assert 'load_adapter_into_pipeline(pipe, "' in card.text
    load_adapter_into_pipeline(pipe, "someone/run", weight_name="adapter.safetensors")
    assert pv.adapter_names(pipe.unet) == ["default"]
    with pytest.raises(pv.BaseModelMismatchError):
        load_adapter_into_pipeline(load_pipeline("someone/tiny-t2i", torch.device("cpu")), "someone/run")
    plain = load_pipeline("someone/tiny-t2i", torch.device("cpu"), revision="v1")
    plain.load_lora_weights("someone/run", subfolder="lora", weight_name="pytorch_lora_weights.safetensors")
    sample = torch.randn(1, 4, 4, 4), torch.tensor([500]), torch.randn(1, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain.unet(*sample).sample, pipe.unet(*sample).sample, rtol=1e-4, atol=1e-5)

    # the app takes the same hub ids
    from apps import gradio_app as app

    def app_args(*extra):
        return app.build_parser().parse_args(["--pipeline", "someone/tiny-t2i", "--revision", "v1", "--no-classify",
                                              "--device", "cpu", *extra])

    generation, _, _ = app.load_models(app_args("--adapter", "someone/run"))
    assert generation.adapter.name is not None and generation.adapter.card.summary.title == "PSOFT, rank 4"
    with pytest.raises(SystemExit, match=r"--adapter 'someone/nothing' did not load \(HubOfflineError: "):
        app.load_models(app_args("--adapter", "someone/nothing"))


# -------------------------------------------------------------------------------------------------- the card
def check_card(folder: Path) -> ModelCard:
    """The folder's README.md read by huggingface_hub: valid front matter, every file it names present, and every
    adapter or LoRA file in the folder named."""
    card = ModelCard.load(folder / "README.md")
    metadata = card.data.to_dict()
    assert isinstance(metadata["tags"], list) and all(isinstance(t, str) for t in metadata["tags"])
    named = set(re.findall(r"`([\w./-]+\.(?:safetensors|png|json|csv))`", card.text))
    named |= set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text))
    named |= {entry["output"]["url"] for entry in metadata.get("widget", [])}
    named |= {f"{folder_}/{name}" for folder_, name in re.findall(r'subfolder="([^"]+)", weight_name="([^"]+)"',
                                                                    card.text)}
    assert named and all((folder / name).is_file() for name in named), sorted(named)
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")
               if "checkpoint" not in p.parts}
    assert written <= named, written - named
    return card


def test_save_adapter_writes_a_card_beside_the_file(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224.augreg_in21k", depth=1, num_classes=3)
    pv.inject(model, pv.PSOFTConfig(rank=4, train_modules=("head",)))
    path = pv.save_adapter(model, tmp_path / "cifar" / "adapter.safetensors", model_card=True)
    card = check_card(path.parent)
    assert card.data.base_model == "timm/vit_tiny_patch16_224.augreg_in21k" and card.data.library_name == "timm"
    assert 'timm.create_model("timm/vit_tiny_patch16_224.augreg_in21k", pretrained=True, num_classes=3)' in card.text
    adapter = sum(p.numel() for _, layer in pv.adapted_layers(model) for p in layer.adapters["default"].parameters())
    layers = len(list(pv.adapted_layers(model)))
    # the file also holds each layer's anchor (a sketch of its subspace), which is not trained: not counted
    assert f"| `adapter.safetensors` | PSOFT, rank 4 | {layers} layers: " in card.text
    assert f" | {adapter:,} + {3 * 192 + 3:,} in `head` |" in card.text


# -------------------------------------------------------------------------------------------------- uploads
class RecordingHub:
    """huggingface_hub's HTTP transport, replaced: every request recorded, answered as the hub answers create_repo,
    the README's metadata check, preupload (every file inline, "regular") and the commit."""

    def __init__(self):
        self.requests: list[httpx2.Request] = []
        self.refuse: tuple[int, dict] | None = None  # (status, headers) to answer every request with

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        url = request.url.path
        if self.refuse:
            return httpx2.Response(self.refuse[0], headers=self.refuse[1], json={"error": "You may not write here"})
        if url == "/api/repos/create":
            body = json.loads(request.content)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if url == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/preupload/" in url:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [dict(path=f["path"], uploadMode="regular", shouldIgnore=False)
                                                        for f in files]})
        if "/commit/" in url:
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{url.split('/')[3]}/"
                                              f"{url.split('/')[4]}/commit/0123", "commitOid": "0123"})
        return httpx2.Response(404, json={"error": f"not answered by the test: {url}"})

    def calls(self) -> list[str]:
        """The paths of the repository calls, in order (huggingface_hub may also fetch registries of its own)."""
        return [r.url.path for r in self.requests if r.url.path.startswith(("/api/repos/", "/api/models/"))]

    def created(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.url.path == "/api/repos/create"]

    def uploaded(self) -> tuple[str, dict[str, bytes]]:
        """The commit's repository path and its files, as the commit request carried them."""
        (commit,) = [r for r in self.requests if "/commit/" in r.url.path]
        lines = [json.loads(line) for line in commit.content.decode().splitlines()]
        return commit.url.path, {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                                 for line in lines if line["key"] == "file"}


@pytest.fixture
def recording_hub(monkeypatch):
    from huggingface_hub.utils._http import default_client_factory

    hub = RecordingHub()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    huggingface_hub.close_session()
    yield hub
    huggingface_hub.set_client_factory(default_client_factory)
    huggingface_hub.close_session()


def test_push_to_hub_uploads_a_folder_as_it_is_or_a_model_with_its_card(recording_hub, tmp_path):
    folder = tmp_path / "out"
    pv.save_adapter(adapted(1), folder / "adapter.safetensors", model_card=True)
    (folder / "validation").mkdir()
    (folder / "validation" / "step-000001.png").write_bytes(b"png")
    url = pv.push_to_hub(folder, "someone/pushed", token="hf_secret")
    assert url == "https://huggingface.co/someone/pushed/commit/0123"
    assert recording_hub.created() == [{"name": "pushed", "organization": "someone", "type": "model"}]
    path, files = recording_hub.uploaded()
    assert path == "/api/models/someone/pushed/commit/main"
    assert files == {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert all(r.headers["authorization"] == "Bearer hf_secret" for r in recording_hub.requests
               if r.url.path.startswith(("/api/repos/", "/api/models/")))

    recording_hub.requests.clear()
    model = adapted(2)
    pv.push_to_hub(model, "someone/model", token="hf_secret", base_model="someone/base")
    _, files = recording_hub.uploaded()
    assert set(files) == {"adapter.safetensors", "README.md"}
    assert "base_model: \"someone/base\"" in files["README.md"].decode()
    (tmp_path / "back.safetensors").write_bytes(files["adapter.safetensors"])
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(pv.load_adapter(tiny_model(), tmp_path / "back.safetensors")(x), model(x))

    recording_hub.refuse = 403, {}
    with pytest.raises(pv.HubAccessError, match=r"refused the upload to 'someone/other' \(HTTP 403: You may not"):
        pv.push_to_hub(folder, "someone/other")


def test_download_refusals_from_the_hub_are_named(recording_hub, tmp_path):
    for status, code, error, message in [
        (401, "GatedRepo", pv.HubAccessError, "is gated: accept its conditions"),
        (404, "RepoNotFound", pv.HubAccessError, "does not exist, or is private"),
        (404, "RevisionNotFound", pv.HubNotFoundError, "has no revision 'v3'"),
        (404, "EntryNotFound", pv.HubNotFoundError, "has no such file"),
    ]:
        recording_hub.refuse = status, {"X-Error-Code": code}
        with pytest.raises(error, match=message):
            pv.load_adapter(tiny_model(), "someone/adapter", revision="v3", cache_dir=tmp_path / "cache")


@pytest.mark.trainer
def test_trainers_push_their_output_folder_without_the_checkpoint_or_the_token(recording_hub, tmp_path):
    from train.vtab import trainer as vtab

    out = tmp_path / "vtab-run"
    metrics = vtab.main(["--task", "rotation", "--epochs", "1", "--quiet", "--output-dir", str(out), "--push-to-hub",
                         "--hub-model-id", "someone/vtab-run", "--hub-token", "hf_secret"])
    assert metrics["pushed"] == "https://huggingface.co/someone/vtab-run/commit/0123"
    assert recording_hub.calls() == ["/api/repos/create", "/api/models/someone/vtab-run/preupload/main",
                                     "/api/models/someone/vtab-run/commit/main"]  # made first: a bad token fails early
    path, files = recording_hub.uploaded()
    assert path == "/api/models/someone/vtab-run/commit/main"
    assert set(files) == {"README.md", "adapter.safetensors", "metrics.json", "metrics.csv", "curve.png"}
    assert (out / "checkpoint").is_dir() and all(files[name] == (out / name).read_bytes() for name in files)
    assert not any(b"hf_secret" in data for data in files.values())
    assert "hf_secret" not in (out / "checkpoint" / "run_args.json").read_text()


@pytest.mark.trainer
def test_dreambooth_pushes_its_output_folder_without_checkpoint_class_images_or_token(recording_hub, pipeline_cache):
    from train.dreambooth import trainer as dreambooth

    root, _ = pipeline_cache
    out = root / "pushed-run"
    metrics = dreambooth.main(["--pretrained_model_name_or_path", str(root / "v1"), "--instance_data_dir",
                               str(root / "subject"), "--output_dir", str(out), "--num_class_images", "2",
                               "--sample_batch_size", "2", "--train_batch_size", "2", "--max_train_steps", "1",
                               "--num_inference_steps", "2", "--num_validation_images", "2", "--quiet", "--method",
                               "oft", "--push_to_hub", "--hub_model_id", "someone/db-run", "--hub_token", "hf_secret"])
    assert metrics["pushed"] == "https://huggingface.co/someone/db-run/commit/0123"
    assert recording_hub.calls()[0] == "/api/repos/create"
    path, files = recording_hub.uploaded()
    assert path == "/api/models/someone/db-run/commit/main"
    assert set(files) == {"README.md", "adapter.safetensors", "lora/pytorch_lora_weights.safetensors",
                          "lora/kohya.safetensors", "validation/step-000001.png", "metrics.json", "metrics.csv"}
    assert (out / "class_images").is_dir() and (out / "checkpoint").is_dir()
    assert all(files[name] == (out / name).read_bytes() for name in files)
    assert not any(b"hf_secret" in data for data in files.values())
    card = check_card(out)
    assert {"oft", "lora", "dreambooth"} <= set(card.data.tags) and card.data.base_model is None  # a local base
    assert 'load_adapter_into_pipeline(pipe, "someone/db-run", weight_name="adapter.safetensors")' in card.text
