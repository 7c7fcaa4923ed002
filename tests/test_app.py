"""The Gradio app (apps/gradio_app.py) on the embedded assets, as a fresh machine runs it: its handlers called directly,
the launched server through gradio_client on 127.0.0.1, and the page in Debian's headless Chromium driven by
Playwright. The browser test saves its screenshots under test-artifacts/ (or $PSOFT_VISION_TEST_ARTIFACTS)."""

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import rel_err, unet_out
from PIL import Image
from playwright.sync_api import sync_playwright
from safetensors import safe_open
from safetensors.torch import save_file

import psoft_vision as pv
from apps import gradio_app as app
from psoft_vision.testing import randomize_adapters
from train.offline.data import FASHION, TASKS, task_split
from train.offline.pretrain_t2i import build_pipeline

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("PSOFT_VISION_TEST_ARTIFACTS", REPO / "test-artifacts"))
PROMPT = app.DEFAULT_PROMPT
STEPS = 4
CROPS = TASKS["photo-crops"].classes
pytestmark = [pytest.mark.app, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def models():
    return app.load_models(app.build_parser().parse_args([]))


@pytest.fixture(scope="module")
def generation(models):
    return models[0]


@pytest.fixture(scope="module")
def classification(models):
    return models[1]


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image) if isinstance(image, str | Path) else image, dtype=np.float64)


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Adapter files the generation slot must refuse, with the error each must name."""
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(app.DEFAULT_ADAPTER.read_bytes()[:5000])
    noise = tmp / "noise.safetensors"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    other_base = build_pipeline(seed=1).unet  # the tiny-t2i architecture with other weights
    pv.inject(other_base, pv.PSOFTConfig(rank=4))
    wrong_base = pv.save_adapter(other_base, tmp / "other-base.safetensors")
    endless = tmp / "endless.safetensors"  # its first forward would never end: refused when it is read
    with safe_open(app.DEFAULT_ADAPTER, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(metadata["psoft_vision"])
    header["config"]["neumann_terms"] = 10**9
    save_file(tensors, endless, metadata={**metadata, "psoft_vision": json.dumps(header)})
    return {
        "truncated": (truncated, "AdapterFileError"),
        "noise": (noise, "AdapterFileError"),
        "missing": (tmp / "missing.safetensors", "AdapterFileError"),
        "lora": (app.ASSETS / "dreambooth-psoft-lora.safetensors", "not a psoft_vision adapter"),
        "classifier": (app.DEFAULT_CLASSIFIER_ADAPTER, "KeyMismatchError"),
        "other-base": (wrong_base, "BaseModelMismatchError"),
        "neumann_terms 10**9": (endless, "neumann_terms=1000000000 exceeds 64"),
    }


# ---------------------------------------------------------------------------------------------------- handlers
def test_generate_gives_base_and_adapted_samples_of_one_seed(generation):
    steps = []
    base, adapted = generation.generate(PROMPT, 7, STEPS, 3.0, 1.0, on_step=lambda *s: steps.append(s))
    assert base.size == adapted.size == (app.DISPLAY_SIZE, app.DISPLAY_SIZE)
    assert steps == [(i, 2 * STEPS) for i in range(1, 2 * STEPS + 1)]
    assert np.abs(pixels(base) - pixels(adapted)).mean() > 5  # the DreamBooth adapter changes the sample

    again_base, again_adapted = generation.generate(PROMPT, 7, STEPS, 3.0, 1.0)
    np.testing.assert_array_equal(pixels(again_base), pixels(base))
    np.testing.assert_array_equal(pixels(again_adapted), pixels(adapted))
    off_base, off = generation.generate(PROMPT, 7, STEPS, 3.0, 0.0)  # strength 0 is the base model exactly
    np.testing.assert_array_equal(pixels(off), pixels(base))
    np.testing.assert_array_equal(pixels(off_base), pixels(base))
    half = generation.generate(PROMPT, 7, STEPS, 3.0, 0.5)[1]
    assert 0 < np.abs(pixels(half) - pixels(base)).mean() < np.abs(pixels(adapted) - pixels(base)).mean() * 1.5


def test_adapter_panels_describe_the_loaded_files(generation, classification):
    unet_adapter = sum(p.numel() for _, layer in pv.adapted_layers(generation.adapter.model)
                       for p in layer.adapters[generation.adapter.name].parameters())
    card = generation.adapter.markdown()
    assert "| adapter file | `dreambooth-psoft.safetensors` |" in card and "| method | PSOFT, rank 32 |" in card
    assert f"| trainable parameters | {unet_adapter:,} |" in card
    assert f"{len(list(pv.adapted_layers(generation.adapter.model)))} layers: " in card and "`attn1.to_q` x7" in card
    assert f"{app.DEFAULT_ADAPTER.stat().st_size / 1024:.0f} KiB" in card

    model = classification.adapter.model
    vit_adapter = sum(p.numel() for _, layer in pv.adapted_layers(model) for p in layer.adapters[
        classification.adapter.name].parameters())
    head = sum(p.numel() for p in model.head.parameters())
    card = classification.adapter.markdown()
    assert "PSOFT, rank 24" in card and f"{vit_adapter:,} + {head:,} in `head`" in card
    assert "24 layers: `attn.proj` x6, `attn.qkv` x6, `mlp.fc1` x6, `mlp.fc2` x6" in card


@pytest.mark.parametrize("method", ["psoft", "oft"])
def test_exported_lora_reproduces_the_adapter_at_the_chosen_strength_in_diffusers(method, tmp_path):
    generation = app.Generation.from_pretrained(app.DEFAULT_PIPELINE, "cpu", torch.float32)
    if method == "psoft":
        adapter = app.DEFAULT_ADAPTER
    else:  # an OFTv2 file, which only exports as exact full-rank deltas
        unet = copy.deepcopy(generation.adapter.model)
        pv.inject(unet, pv.OFTConfig(block_size=8))
        randomize_adapters(unet, std=0.2)
        adapter = pv.save_adapter(unet, tmp_path / "oft.safetensors")
    assert "Could not" not in generation.load_adapter(adapter)
    assert ("OFTv2, block size 8" if method == "oft" else "PSOFT, rank 32") in generation.adapter.markdown()

    path = generation.export_lora(0.5)
    assert path.name == f"{adapter.stem}-lora-strength0.5.safetensors"
    with safe_open(path, "pt") as f:
        assert all(".lora_A." in k or ".lora_B." in k for k in f.keys())
    pv.set_strength(generation.adapter.model, 0.5)
    adapted = unet_out(generation.adapter.model)
    plain = diffusers.StableDiffusionPipeline.from_pretrained(app.DEFAULT_PIPELINE, dtype=torch.float32)
    base = unet_out(plain.unet)
    plain.load_lora_weights(path.parent, weight_name=path.name)
    assert rel_err(adapted, base) > 1e-3
    assert rel_err(unet_out(plain.unet), adapted) < 1e-4


def test_bad_adapter_files_are_reported_and_the_adapter_in_use_stays(generation, tmp_path):
    before = generation.generate(PROMPT, 3, STEPS, 3.0, 1.0)[1]
    card, name = generation.adapter.markdown(), generation.adapter.name
    for kind, (path, reason) in bad_files(tmp_path).items():
        message = generation.load_adapter(str(path))
        assert message.startswith(f"**Could not load `{path.name}`**"), kind
        assert reason in message, (kind, message)
        assert f"Still using `dreambooth-psoft.safetensors`:\n\n{card}" in message, kind
        assert (generation.adapter.markdown(), generation.adapter.name) == (card, name), kind
        assert pv.adapter_names(generation.adapter.model) == [name], kind
    np.testing.assert_array_equal(pixels(generation.generate(PROMPT, 3, STEPS, 3.0, 1.0)[1]), pixels(before))


def test_without_an_adapter_only_the_base_sample_is_made_and_export_says_why():
    generation = app.Generation.from_pretrained(app.DEFAULT_PIPELINE, "cpu", torch.float32)
    assert generation.load_adapter(None).startswith("No adapter is loaded")
    base, adapted = generation.generate(PROMPT, 0, 2, 3.0, 1.0)
    assert adapted is None and base.size == (app.DISPLAY_SIZE, app.DISPLAY_SIZE)
    with pytest.raises(app.AppInputError, match="no adapter to export"):
        generation.export_lora(1.0)


@pytest.mark.parametrize("field, values", [
    ("seed", (-1, 1.5, 2**32, "0")), ("steps", (0, 201, 2.5, None)), ("guidance", (-1, float("nan"), 31)),
    ("strength", (float("inf"), -3, True)), ("prompt", (None, 3)),
])
def test_bad_generation_requests_name_the_value_and_the_range(generation, field, values):
    for value in values:
        request = dict(prompt=PROMPT, seed=0, steps=STEPS, guidance=3.0, strength=1.0) | {field: value}
        with pytest.raises(app.AppInputError, match=f"^{field}={value!r} must be"):
            generation.generate(**request)


def test_classify_ranks_the_top5_of_the_base_and_the_adapted_classifier(classification):
    images, labels = task_split("photo-crops", "test")
    base, adapted = classification.classify(Image.fromarray(images[0]))
    assert len(base) == len(adapted) == app.TOP_K
    assert set(base) <= set(FASHION) and set(adapted) <= set(CROPS)
    for top in (base, adapted):
        assert list(top.values()) == sorted(top.values(), reverse=True) and 0 < sum(top.values()) <= 1 + 1e-3
    assert classification.classify(images[0]) == (base, adapted)  # a numpy upload reads the same as a PIL one
    correct = sum(next(iter(classification.classify(Image.fromarray(images[i]))[1])) == CROPS[labels[i]]
                  for i in range(64))
    assert correct >= 32, f"{correct}/64 top-1 with the shipped photo-crops adapter (1/8 by chance)"
    with pytest.raises(app.AppInputError, match="no image"):
        classification.classify(None)


def test_a_new_classifier_adapter_brings_its_own_head_and_a_bad_one_keeps_the_old(tmp_path):
    classification = app.Classification.from_pretrained(app.DEFAULT_CLASSIFIER, "cpu", list(CROPS))
    assert classification.load_adapter(str(app.DEFAULT_ADAPTER)).startswith("**Could not load")
    assert classification.adapter.name is None and classification.classify(np.zeros((32, 32, 3), np.uint8))[1] is None

    model = copy.deepcopy(classification.base)
    model.reset_classifier(3)
    pv.inject(model, pv.OFTConfig(block_size=16, train_modules=("head",)))
    randomize_adapters(model, std=0.2)
    path = pv.save_adapter(model, tmp_path / "three-classes.safetensors")
    message = classification.load_adapter(str(path))
    assert "OFTv2, block size 16" in message and "8 class names were given, but this head has 3 classes" in message
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = classification.transform(Image.fromarray(image)).unsqueeze(0)
    with torch.no_grad():
        expected = model.eval()(x).softmax(-1)[0]
    adapted = classification.classify(image)[1]
    assert adapted == {f"class {i}": round(expected[i].item(), 4) for i in expected.argsort(descending=True).tolist()}

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    message = classification.load_adapter(str(truncated))
    assert "**Could not load `truncated.safetensors`**" in message and "Still using `three-classes" in message
    assert classification.classify(image)[1] == adapted


def test_class_names_come_from_the_model_and_stay_distinct():
    import timm

    imagenet = app.Classification(timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", depth=1))
    assert len(set(imagenet.base_labels)) == 1000 and imagenet.base_labels[1] == "goldfish, Carassius auratus"
    assert {"crane (134)", "crane (517)"} <= set(imagenet.base_labels)  # ImageNet names two classes "crane"
    unnamed = app.Classification(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=3))
    assert unnamed.base_labels == ["class 0", "class 1", "class 2"]


def test_analytics_are_off_unless_the_user_says_and_the_hub_is_left_as_the_user_set_it(tmp_path):
    script = ("import os, apps.gradio_app; print(os.environ.get('HF_HUB_OFFLINE', '-'), "
              "os.environ['GRADIO_ANALYTICS_ENABLED'])")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED")}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env | extra, capture_output=True,
                              text=True, check=True).stdout.split()

    assert run() == ["-", "False"]  # hub ids download unless the user asks for the cache alone
    assert run(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="True") == ["1", "True"]


def test_cli_refuses_an_empty_page_or_models_that_do_not_load_and_documents_every_argument(capsys, tmp_path):
    with pytest.raises(SystemExit, match="leave nothing to show"):
        app.main(["--no-generate", "--no-classify"])
    with pytest.raises(SystemExit, match=f"--pipeline '{tmp_path}' did not load .* save_pretrained"):
        app.main(["--pipeline", str(tmp_path), "--no-classify"])
    with pytest.raises(SystemExit, match="--classifier-model 'vit_no_such_model' did not load .*Unknown model"):
        app.main(["--classifier-model", "vit_no_such_model", "--no-generate"])
    with pytest.raises(SystemExit):
        app.main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--pipeline", "--adapter", "--classifier-model", "--classifier-adapter", "--host", "--port"):
        assert flag in help_text
    assert "default: 127.0.0.1" in help_text


# ------------------------------------------------------------------------------------------- the launched app
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python -m apps.gradio_app`` with no model arguments, as `make app` runs it; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED")}
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "apps.gradio_app", "--port", str(port)], cwd=REPO,
                                   env=env | {"OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the app did not start (exit code {process.poll()}):\n{log.read_text()}")
            time.sleep(0.5)
    yield url, log
    process.terminate()
    process.wait(30)


def test_launched_app_serves_generate_classify_export_and_reports_bad_files(server, tmp_path):
    url, log = server
    client = Client(url, verbose=False)
    base, adapted = client.predict(PROMPT, 1, STEPS, 3.0, 1.0, api_name="/generate")
    assert Image.open(base).size == Image.open(adapted).size == (app.DISPLAY_SIZE, app.DISPLAY_SIZE)
    assert np.abs(pixels(base) - pixels(adapted)).mean() > 5

    lora = client.predict(0.75, api_name="/export_lora")
    assert Path(lora).name == "dreambooth-psoft-lora-strength0.75.safetensors"
    with safe_open(lora, "pt") as f:
        assert len(list(f.keys())) == 2 * 84

    example = tmp_path / "crop.png"
    Image.fromarray(task_split("photo-crops", "test")[0][0]).save(example)
    base_top, adapted_top = client.predict(handle_file(example), api_name="/classify")
    assert {c["label"] for c in base_top["confidences"]} <= set(FASHION)
    assert {c["label"] for c in adapted_top["confidences"]} <= set(CROPS)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(app.DEFAULT_ADAPTER.read_bytes()[:5000])
    message = client.predict(handle_file(truncated), api_name="/load_generation_adapter")
    assert message.startswith("**Could not load `truncated.safetensors`**: AdapterFileError")
    with pytest.raises(AppError, match="Value 0 is less than minimum value 1"):  # the slider's own check
        client.predict(PROMPT, 1, 0, 3.0, 1.0, api_name="/generate")
    again = client.predict(PROMPT, 1, STEPS, 3.0, 1.0, api_name="/generate")[1]
    np.testing.assert_array_equal(pixels(again), pixels(adapted))

    text = log.read_text()
    assert f"Running on local URL:  {url.rstrip('/')}" in text and "public URL" not in text


def test_the_page_in_a_real_browser_generates_both_images(server):
    """Headless Chromium types a prompt, clicks Generate, waits for both images, downloads the exported LoRA, then
    uploads a file that is not an adapter and reads the message, then classifies an example image; it saves a
    screenshot after each."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed; `make test` installs it (apt-get install chromium).")
    url, _ = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page_errors = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda error: page_errors.append(error))
            page.goto(url)
            prompt = page.locator("#prompt textarea")
            prompt.fill("a photo of sks bag on the table")
            page.locator("#generate").click()
            for image in ("#base-image img", "#adapted-image img"):
                page.wait_for_function(
                    "selector => { const img = document.querySelector(selector);"
                    " return img !== null && img.complete && img.naturalWidth > 0; }", arg=image, timeout=60_000)
                assert page.locator(image).evaluate("img => img.naturalWidth") == app.DISPLAY_SIZE

            page.locator("#export").click()
            link = page.locator("#lora-file a[download='dreambooth-psoft-lora-strength1.safetensors']")
            with page.expect_download() as download:
                link.click()
            lora = ARTIFACTS / "app-download.safetensors"
            download.value.save_as(lora)
            with safe_open(lora, "pt") as f:
                assert len(list(f.keys())) == 2 * 84
            page.screenshot(path=ARTIFACTS / "app-generate.png", full_page=True)

            page.locator("#generation-adapter-upload input[type=file]").set_input_files(
                str(app.ASSETS / "dreambooth-psoft-lora.safetensors"))
            card = page.locator("#generation-adapter-card")
            card.get_by_text("Could not load").wait_for(timeout=30_000)
            assert "not a psoft_vision adapter" in card.inner_text()
            page.screenshot(path=ARTIFACTS / "app-bad-adapter.png", full_page=True)

            page.get_by_role("tab", name="Classify").click()
            page.locator("button.gallery-item").nth(CROPS.index("coffee")).click()
            page.locator("#classify").click()
            for top5, names in (("#base-top5", FASHION), ("#adapted-top5", CROPS)):
                page.locator(top5).get_by_text(re.compile("|".join(names))).first.wait_for(timeout=30_000)
            page.screenshot(path=ARTIFACTS / "app-classify.png", full_page=True)
        finally:
            browser.close()
    assert not page_errors, page_errors
