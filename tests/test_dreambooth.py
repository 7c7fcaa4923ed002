"""DreamBooth trainer (train/dreambooth/) end to end through its CLI entry point, on a tiny pipeline built from the
project's configs (train/offline/pretrain_t2i.py) and saved to a temporary folder, so every run takes the real
``from_pretrained`` path: outputs, adapter file keys and metadata, the exported LoRA under diffusers'
``load_lora_weights``, exact resumption, the prior-preservation batch, the v-prediction target, clear errors, and
diffusers' flags (accumulation, checkpointing, 8-bit Adam, schedules, clipping, validation epochs, tensorboard,
uncached latents, ranks per module type, text encoders with PEFT LoRA, the flags refused). Every pipeline family:
tests/test_dreambooth_families.py."""

import json
import math

import pytest
import torch
from helpers import rel_err, unet_out
from PIL import Image
from safetensors import safe_open

import psoft_vision as pv
from psoft_vision.formats.native import load_adapter_into_pipeline
from psoft_vision.targets import PRESETS, select
from train.dreambooth import metrics
from train.dreambooth import trainer as dreambooth
from train.offline.pretrain_t2i import build_pipeline

TOL = 1e-4  # a LoRA export reproduces the adapted UNet to this relative error (fp32)
pytestmark = [pytest.mark.trainer, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-t2i")
    build_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("subject")
    for i, view in enumerate(sorted((dreambooth.DEFAULT_SUBJECT).glob("*.png"))[:3]):
        Image.open(view).resize((40, 40)).save(path / f"view-{i}.png")  # 40 px: the trainer resizes to 32
    (path / "notes.txt").write_text("not an image")
    return path


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("class-images")


def cli(pipe_dir, subject_dir, class_dir, output_dir, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(pipe_dir), "--instance_data_dir", str(subject_dir),
            "--class_data_dir", str(class_dir), "--output_dir", str(output_dir), "--num_class_images", "2",
            "--sample_batch_size", "2", "--train_batch_size", "2", "--num_inference_steps", "2",
            "--num_validation_images", "2", "--max_train_steps", "2", "--quiet", *map(str, extra)]


@pytest.fixture(scope="module", params=["psoft", "oft"])
def two_steps(request, pipe_dir, subject_dir, class_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    result = dreambooth.main(cli(pipe_dir, subject_dir, class_dir, out, "--method", request.param,
                                 "--validation_steps", 1, "--checkpointing_steps", 1))
    return request.param, out, result


def load(pipe_dir):
    return dreambooth.load_pipeline(pipe_dir, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------


def test_two_step_run_writes_adapter_lora_grids_class_images_and_metrics(two_steps, pipe_dir, class_dir):
    method, out, result = two_steps
    assert result["finished"] and result["steps"] == 2 and result["method"] == method
    assert sorted(p.name for p in class_dir.iterdir()) == ["class-00000.png", "class-00001.png"]
    grids = sorted((out / "validation").iterdir())
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
    assert Image.open(grids[-1]).size == (2 * 32, 32)  # two 32x32 images side by side
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,instance_loss,prior_loss,lr" and len(rows) == 3
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["prediction_type"] == "epsilon" and len(saved["history"]) == 2
    assert (out / "checkpoint" / "trainer_state.json").is_file()

    header, tensors = pv.read_adapter(out / "adapter.safetensors")
    layers = select(load(pipe_dir).unet, PRESETS["unet"])
    assert header["method"] == method and list(header["layers"]) == layers
    assert header["config"]["targets"] == "auto" and set(header["fingerprints"]) == set(layers)
    params = ("q", "alpha", "beta") if method == "psoft" else ("q",)
    anchors = ("anchor.subspace_sketch",) if method == "psoft" else ()  # the subspace for low-precision loads
    assert set(tensors) == {f"{layer}.{p}" for layer in layers for p in params + anchors}
    assert result["trainable"] == sum(tensors[f"{layer}.{p}"].numel() for layer in layers for p in params)
    assert all(tensors[f"{layer}.q"].abs().max() > 0 for layer in layers)  # trained, not the identity


def test_exported_lora_loads_with_diffusers_and_matches_the_adapter(two_steps, pipe_dir):
    _, out, _ = two_steps
    base = unet_out(load(pipe_dir).unet)
    ours = load_adapter_into_pipeline(load(pipe_dir), out / "adapter.safetensors")
    expected = unet_out(ours.unet)
    assert rel_err(expected, base) > 1e-5  # two steps moved the model, or matching proves nothing
    fresh = load(pipe_dir)
    fresh.load_lora_weights(out / "lora", weight_name="pytorch_lora_weights.safetensors")
    assert rel_err(unet_out(fresh.unet), expected) <= TOL
    pv.merge(ours.unet)
    assert rel_err(unet_out(ours.unet), expected) <= TOL


def test_diagnose_finds_psofts_change_inside_its_subspace_and_ofts_outside(two_steps, pipe_dir):
    from train.dreambooth import diagnose

    method, out, _ = two_steps
    rank = json.loads((out / "metrics.json").read_text())["args"]["rank"] if method == "psoft" else 8
    summary = diagnose.diagnose(out, rank=rank, pipeline=str(pipe_dir))
    assert set(summary) == {"attn", "ff", "proj"} and all(row["change"] > 0 for row in summary.values())
    shares = [row["in_subspace"] for row in summary.values()]
    if method == "psoft":  # PSOFT rotates within the top-r singular directions only: all its change is there
        assert min(shares) > 1 - 1e-6 and all("alpha" in row and "beta" in row for row in summary.values())
    else:
        assert max(shares) < 0.9 and not any("alpha" in row for row in summary.values())


def test_resume_continues_exactly_as_an_uninterrupted_run(pipe_dir, subject_dir, class_dir, tmp_path):
    args = ("--max_train_steps", 4, "--checkpointing_steps", 2, "--validation_steps", 4, "--lr_warmup_steps", 1)
    dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "a", *args))
    first = dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "b", *args, "--stop_after_steps", 3))
    assert not first["finished"] and first["step"] == 3
    assert not (tmp_path / "b" / "adapter.safetensors").exists()
    resumed = dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "b", *args,
                                  "--resume_from_checkpoint", "latest"))
    assert resumed["finished"] and resumed["steps"] == 4
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["history"]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    _, ta = pv.read_adapter(tmp_path / "a" / "adapter.safetensors")
    _, tb = pv.read_adapter(tmp_path / "b" / "adapter.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_prior_batch_puts_instances_first_and_the_loss_weights_the_class_half():
    instance, class_ = torch.zeros(2, 4, 2, 2), torch.ones(3, 4, 2, 2)
    e_instance = {"encoder_hidden_states": torch.full((1, 5, 8), 7.0), "pooled_projections": torch.full((1, 3), 1.0)}
    e_class = {"encoder_hidden_states": torch.full((1, 5, 8), -7.0), "pooled_projections": torch.full((1, 3), -1.0)}
    latents, condition = dreambooth.prior_batch(instance, e_instance, class_[:2], e_class)
    assert torch.equal(latents, torch.cat([instance, class_[:2]])) and condition.keys() == e_instance.keys()
    for key, value in condition.items():
        assert torch.equal(value[:2], e_instance[key].expand(2, *e_instance[key].shape[1:]))
        assert torch.equal(value[2:], e_class[key].expand(2, *e_class[key].shape[1:]))
    latents, condition = dreambooth.prior_batch(instance, e_instance, None, None)
    assert torch.equal(latents, instance) and condition["encoder_hidden_states"].shape == (2, 5, 8)

    target = torch.zeros(4, 4, 2, 2)
    prediction = torch.cat([torch.full((2, 4, 2, 2), 2.0), torch.full((2, 4, 2, 2), 1.0)])
    loss, instance_loss, prior_loss = dreambooth.dreambooth_loss(prediction, target, True, 0.5)
    assert (loss.item(), instance_loss, prior_loss) == (4.5, 4.0, 1.0)
    loss, instance_loss, prior_loss = dreambooth.dreambooth_loss(prediction, target, False, 0.5)
    assert (loss.item(), prior_loss) == (2.5, None)


def test_training_batches_pair_instance_and_class_prompts(pipe_dir, subject_dir, class_dir, tmp_path, monkeypatch):
    """In a real run every UNet call in training sees the instance prompt on its first half and the class prompt on
    its second half."""
    seen = []
    apply_method = dreambooth.apply_method

    def recording(models, args):
        apply_method(models, args)
        models["unet"].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()) if m.training else None,
            with_kwargs=True)

    monkeypatch.setattr(dreambooth, "apply_method", recording)
    dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path, "--max_train_steps", 1,
                        "--validation_steps", 5, "--train_batch_size", 3))
    pipe = load(pipe_dir)
    with torch.no_grad():
        instance = pipe.encode_prompt(dreambooth.DEFAULT_INSTANCE_PROMPT, "cpu", 1, False)[0]
        class_ = pipe.encode_prompt(dreambooth.DEFAULT_CLASS_PROMPT, "cpu", 1, False)[0]
    assert len(seen) == 1 and seen[0].shape[0] == 6
    assert torch.equal(seen[0][:3], instance.expand(3, -1, -1))
    assert torch.equal(seen[0][3:], class_.expand(3, -1, -1))


def test_v_prediction_target_and_a_v_prediction_run(pipe_dir, subject_dir, class_dir, tmp_path):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([0, 500, 999])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(dreambooth.training_target(scheduler, x0, noise, t, "v_prediction"), expected, atol=1e-6)
    assert dreambooth.training_target(scheduler, x0, noise, t, "epsilon") is noise
    result = dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path, "--max_train_steps", 1,
                                 "--prediction_type", "v_prediction", "--no-with_prior_preservation"))
    assert result["prediction_type"] == "v_prediction" and result["finished"]


def test_peft_lora_method_saves_a_lora_diffusers_loads_and_only_missing_class_images_are_made(
        pipe_dir, subject_dir, tmp_path):
    classes = tmp_path / "classes"
    classes.mkdir()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(classes / "mine.png")
    result = dreambooth.main(cli(pipe_dir, subject_dir, classes, tmp_path, "--method", "lora", "--lora_rank", 2,
                                 "--max_train_steps", 1))
    assert result["finished"] and not (tmp_path / "adapter.safetensors").exists()
    assert result["class_images_generated"] == 1
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.png", "mine.png"]
    with safe_open(tmp_path / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        keys = list(f.keys())
    layers = select(load(pipe_dir).unet, PRESETS["unet"])
    assert len(keys) == 2 * len(layers) and all(k.startswith("unet.") for k in keys)
    pipe = load(pipe_dir)
    base = unet_out(pipe.unet)
    pipe.load_lora_weights(tmp_path / "lora")
    assert rel_err(unet_out(pipe.unet), base) > 0


def test_bad_input_raises_named_errors(pipe_dir, subject_dir, class_dir, tmp_path):
    def run(*extra, subject=subject_dir, pipe=pipe_dir):
        return dreambooth.main(cli(pipe, subject, class_dir, tmp_path / "out", "--max_train_steps", 1, *extra))

    with pytest.raises(dreambooth.DreamBoothError, match="not a folder"):
        run(subject=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dreambooth.DreamBoothError, match="holds no images"):
        run(subject=tmp_path / "empty")
    with pytest.raises(dreambooth.DreamBoothError, match="unknown"):
        run("--method", "boft")
    with pytest.raises(dreambooth.DreamBoothError, match="model_index.json"):
        run(pipe=subject_dir)
    with pytest.raises(dreambooth.DreamBoothError, match="neither a folder nor a hub id"):
        run(pipe=tmp_path / "no-such-pipeline")  # hub ids: tests/test_hub.py
    with pytest.raises(dreambooth.DreamBoothError, match="not a checkpoint"):
        run("--resume_from_checkpoint", str(subject_dir))
    with pytest.raises(dreambooth.DreamBoothError, match="at least 1"):
        run("--max_train_steps", 0)


@pytest.mark.parametrize("where", ["instance", "class"])
def test_an_unreadable_image_fails_the_run_before_the_model_loads(pipe_dir, subject_dir, tmp_path, monkeypatch, where):
    import shutil

    from train.common.images import ImageReadError

    subject, classes = tmp_path / "subject", tmp_path / "class"
    shutil.copytree(subject_dir, subject)
    classes.mkdir()
    bad = (subject if where == "instance" else classes) / "broken.png"
    bad.write_bytes(Image.open(next(subject.glob("*.png"))).tobytes()[:100])  # raw bytes: no image format
    monkeypatch.setattr(dreambooth, "load_pipeline", lambda *a: pytest.fail("loaded the model before the check"))
    with pytest.raises(ImageReadError, match="broken.png' is not a readable image"):
        dreambooth.main(cli(pipe_dir, subject, classes, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_a_file_is_refused_before_anything_runs(pipe_dir, subject_dir, class_dir, tmp_path):
    blocking = tmp_path / "out"
    blocking.write_text("a file")
    with pytest.raises(dreambooth.DreamBoothError, match="out' is a regular file, not a folder"):
        dreambooth.main(cli(pipe_dir, subject_dir, class_dir, blocking))
    assert blocking.read_text() == "a file"


def test_metric_primitives_on_known_inputs():
    flat = lambda x: x.flatten(1)  # noqa: E731  an embedder: the pixels themselves
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=gen)
    assert metrics.subject_similarity(flat, images[:1], images[:1]) == pytest.approx(1.0, abs=1e-6)
    assert metrics.subject_similarity(flat, images[:1], -images[:1]) == pytest.approx(-1.0, abs=1e-6)
    assert metrics.diversity(flat, images[:1].expand(3, -1, -1, -1)) == pytest.approx(0.0, abs=1e-6)
    assert metrics.diversity(flat, images) > 0.05
    assert metrics.colour_distance(images, images) == 0.0
    assert metrics.colour_distance(torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)) == 1.0
    x0, noise, t = metrics.noisy_inputs(torch.zeros(2, 4, 2, 2), draws=3, seed=0, num_train_timesteps=1000)
    assert x0.shape == noise.shape == (6, 4, 2, 2) and t.tolist()[0] == 50 and t.tolist()[-1] == 950
    with pytest.raises(ValueError, match="dino:WEIGHTS"):
        metrics.make_embedder("dino")


def tiny_sd3_pipeline():
    """An SD3-style pipeline: two tiny CLIP encoders with projection, no T5, a one-block SD3 transformer, flow
    matching."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from train.offline.pretrain_t2i import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        for _ in range(2)]
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16)
    vae = build_pipeline(seed=0).vae
    vae.register_to_config(shift_factor=0.1)  # SD3's VAE has one; the pipeline needs it
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
        tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def test_flow_matching_on_an_sd3_style_transformer(subject_dir, tmp_path):
    """The same loop on pipe.transformer: flow target, adapter on the diffusion-transformer preset, the exported LoRA
    loads with the SD3 pipeline's load_lora_weights and matches."""
    import diffusers

    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    result = dreambooth.main(cli(tmp_path / "sd3", subject_dir, tmp_path / "class", tmp_path / "out",
                                 "--validation_steps", 2))
    assert result["finished"] and result["prediction_type"] == "flow"
    assert len(list((tmp_path / "class").iterdir())) == 2

    def out(pipe):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return pipe.transformer(hidden_states=torch.randn(2, 4, 16, 16, generator=gen),
                                    encoder_hidden_states=torch.randn(2, 7, 32, generator=gen),
                                    pooled_projections=torch.randn(2, 16, generator=gen),
                                    timestep=torch.tensor([100.0, 800.0])).sample

    load_sd3 = lambda: diffusers.StableDiffusion3Pipeline.from_pretrained(  # noqa: E731
        tmp_path / "sd3", text_encoder_3=None, tokenizer_3=None)
    base = out(load_sd3())
    header, _ = pv.read_adapter(tmp_path / "out" / "adapter.safetensors")
    assert list(header["layers"]) == select(load_sd3().transformer, PRESETS["diffusion-transformer"])
    expected = out(load_adapter_into_pipeline(load_sd3(), tmp_path / "out" / "adapter.safetensors"))
    assert rel_err(expected, base) > 1e-5
    fresh = load_sd3()
    fresh.load_lora_weights(tmp_path / "out" / "lora")
    assert rel_err(out(fresh), expected) <= TOL


# ------------------------------------------------------------------------------------------ diffusers' flags
def test_accumulation_clipping_schedule_validation_epochs_8bit_adam_and_tensorboard(
        pipe_dir, subject_dir, class_dir, tmp_path, monkeypatch):
    """One run with many flags at once: 4 optimiser steps of 2 micro-batches each, validation every epoch (3 views
    in batches of 1, 2 per step: 2 steps an epoch), a clipped gradient, a constant schedule after warm-up,
    bitsandbytes' 8-bit AdamW and tensorboard event files holding the loss."""
    pytest.importorskip("bitsandbytes")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []
    apply_method = dreambooth.apply_method

    def counting(models, args):
        apply_method(models, args)
        models["unet"].register_forward_pre_hook(lambda m, a: calls.append(1) if m.training else None)

    monkeypatch.setattr(dreambooth, "apply_method", counting)
    out = tmp_path / "out"
    result = dreambooth.main(cli(pipe_dir, subject_dir, class_dir, out, "--no-with_prior_preservation",
                                 "--train_batch_size", 1, "--gradient_accumulation_steps", 2, "--max_train_steps", 4,
                                 "--validation_epochs", 1, "--max_grad_norm", 1e-3, "--lr_scheduler",
                                 "constant_with_warmup", "--lr_warmup_steps", 3, "--use_8bit_adam", "--allow_tf32",
                                 "--report_to", "tensorboard"))
    assert result["finished"] and len(calls) == 8 and result["optimizer"] == "AdamW8bit"
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["lr"] / 1e-2 for r in history] == pytest.approx([2 / 3, 1, 1, 1])  # the next step's rate
    assert all(r["grad_norm"] > 1e-3 for r in history)  # norms before clipping, all clipped
    assert [p.name for p in sorted((out / "validation").iterdir())] == ["step-000002.png", "step-000004.png"]
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4] and "validation" in events.Tags()["images"]


def test_gradient_checkpointing_and_uncached_latents_train_what_the_default_trains(
        pipe_dir, subject_dir, class_dir, tmp_path):
    runs = {"default": (), "checkpointing": ("--gradient_checkpointing",), "uncached": ("--no-cache_latents",)}
    tensors = {}
    for name, flags in runs.items():
        dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / name, "--random_flip", *flags))
        tensors[name] = pv.read_adapter(tmp_path / name / "adapter.safetensors")[1]
    for name in ("checkpointing", "uncached"):
        assert tensors[name].keys() == tensors["default"].keys()
        for key, value in tensors["default"].items():
            assert torch.allclose(tensors[name][key], value, atol=1e-6), (name, key)


def test_rank_pattern_sets_ranks_per_module_type_and_name(pipe_dir, subject_dir, class_dir, tmp_path):
    from train.dreambooth.ranks import module_type

    out = tmp_path / "psoft"
    dreambooth.main(cli(pipe_dir, subject_dir, class_dir, out, "--max_train_steps", 1, "--rank", 4,
                        "--rank_pattern", "attn=8,ff=2,attn2.to_k=3"))
    header, _ = pv.read_adapter(out / "adapter.safetensors")
    unet = load(pipe_dir).unet
    expected = {name: 3 if name.endswith("attn2.to_k") else {"attn": 8, "ff": 2, "proj": 4}[module_type(unet, name)]
                for name in header["layers"]}
    assert {n: d["rank"] for n, d in header["layers"].items()} == expected
    assert set(expected.values()) == {2, 3, 4, 8} and header["config"]["rank_pattern"] == {
        n: r for n, r in expected.items() if r != 4}

    lora = tmp_path / "lora"  # the PEFT baseline takes the same pattern as its ranks
    dreambooth.main(cli(pipe_dir, subject_dir, class_dir, lora, "--max_train_steps", 1, "--method", "lora",
                        "--lora_rank", 4, "--rank_pattern", "attn=8,ff=2,attn2.to_k=3"))
    with safe_open(lora / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        ranks = {k.removeprefix("unet.").removesuffix(".lora_A.weight"): f.get_slice(k).get_shape()[0]
                 for k in f.keys() if k.endswith("lora_A.weight")}
    assert ranks == expected

    for flags, message in [(("--rank_pattern", "attn"), "KEY=SIZE"), (("--rank_pattern", "vae=3"), "set no adapted"),
                           (("--block_size_pattern", "ff=8"), "does not apply to --method psoft")]:
        with pytest.raises(dreambooth.DreamBoothError, match=message):
            dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "bad", "--max_train_steps", 1, *flags))


def test_lora_layers_keeps_only_those_types_or_names_for_every_method(pipe_dir, subject_dir, class_dir, tmp_path):
    from train.dreambooth.ranks import module_type

    unet = load(pipe_dir).unet
    every = select(unet, PRESETS["unet"])
    attention = [name for name in every if module_type(unet, name) == "attn"]
    dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "psoft", "--max_train_steps", 1,
                        "--lora_layers", "attn"))
    assert list(pv.read_adapter(tmp_path / "psoft" / "adapter.safetensors")[0]["layers"]) == attention
    assert 0 < len(attention) < len(every)
    # PEFT LoRA takes the same flag, here in diffusers' spelling: ends of layer names
    dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "lora", "--max_train_steps", 1, "--method", "lora",
                        "--lora_layers", "to_k,proj_in"))
    with safe_open(tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        layers = [k.removeprefix("unet.").removesuffix(".lora_A.weight") for k in f.keys()
                  if k.endswith("lora_A.weight")]
    assert sorted(layers) == sorted(name for name in every if name.endswith((".to_k", ".proj_in")))
    with pytest.raises(dreambooth.DreamBoothError, match="picks none"):
        dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "bad", "--max_train_steps", 1,
                            "--lora_layers", "attn,conv9"))


def test_train_text_encoder_with_peft_lora_saves_both_and_diffusers_loads_them(pipe_dir, subject_dir, class_dir,
                                                                                tmp_path):
    result = dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path, "--max_train_steps", 1, "--method",
                                 "lora", "--train_text_encoder", "--text_encoder_lr", 1e-3))
    assert result["trained"] == ["unet", "text_encoder"]
    with safe_open(tmp_path / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder"}
    pipe = load(pipe_dir)
    ids = pipe.tokenizer("a photo of sks bag", return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids).last_hidden_state
        pipe.load_lora_weights(tmp_path / "lora")
        assert not torch.equal(pipe.text_encoder(ids).last_hidden_state, before)


def test_diffusers_flags_we_do_not_take_are_listed_and_refused_with_the_reason(pipe_dir, subject_dir, class_dir,
                                                                                tmp_path):
    from train.dreambooth.cli import UNSUPPORTED

    help_text = dreambooth.build_parser().format_help()
    assert all(flag in help_text for flag in UNSUPPORTED) and "--optimizer: AdamW" in help_text
    for flag, reason in [("--center_crop", "always centre-cropped"), ("--prodigy_beta3", "Prodigy"),
                         ("--num_train_epochs", "--max_train_steps")]:
        with pytest.raises(dreambooth.DreamBoothError, match=f"{flag} .*not supported here: .*{reason}"):
            dreambooth.parse_args([flag, "3"] if flag == "--num_train_epochs" else [flag])
    assert "center_crop" not in vars(dreambooth.parse_args([]))  # not recorded as an argument


def test_schedules_and_8bit_adam_errors(monkeypatch):
    import sys

    from train.dreambooth.optim import adamw_8bit, schedule_factor

    values = {name: [schedule_factor(name, 10, 4)(s) for s in (0, 3, 4, 7, 9)]
              for name in ("constant", "constant_with_warmup", "linear")}
    assert values == {"constant": [1, 1, 1, 1, 1], "constant_with_warmup": [0.25, 1, 1, 1, 1],
                      "linear": [0.25, 1, 1, 0.5, 1 / 6]}
    assert schedule_factor("cosine", 10, 4)(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    with monkeypatch.context() as patch:  # as if bitsandbytes were not installed
        patch.setitem(sys.modules, "bitsandbytes", None)
        with pytest.raises(dreambooth.DreamBoothError, match="pip install bitsandbytes"):
            adamw_8bit(torch.device("cpu"))
    bnb = pytest.importorskip("bitsandbytes")

    class NoKernels(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        def step(self, closure=None):
            raise NotImplementedError("no 8-bit kernels for this device")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", NoKernels)
    with pytest.raises(dreambooth.DreamBoothError, match="cannot run 8-bit AdamW on cpu .*leave out --use_8bit_adam"):
        adamw_8bit(torch.device("cpu"))


def test_lora_export_from_a_written_adapter_file_equals_the_direct_export(pipe_dir, subject_dir, class_dir, tmp_path):
    """The route a sharded (FSDP) run takes: adapter files written from gathered tensors, the LoRA files exported
    from a whole copy of the model loaded again with them."""
    from train.dreambooth.adapters import save_outputs
    from train.dreambooth.families import FAMILIES

    direct = tmp_path / "direct"
    dreambooth.main(cli(pipe_dir, subject_dir, class_dir, direct, "--max_train_steps", 1))
    pipe = load_adapter_into_pipeline(load(pipe_dir), direct / "adapter.safetensors")
    args = dreambooth.parse_args(cli(pipe_dir, subject_dir, class_dir, tmp_path / "from-file"))
    result = save_outputs(pipe, {"unet": pipe.unet}, FAMILIES["sd"], args,
                          written={"unet": direct / "adapter.safetensors"})
    assert result["adapter"] == str(direct / "adapter.safetensors")
    for name in ("pytorch_lora_weights.safetensors", "kohya.safetensors"):
        with safe_open(direct / "lora" / name, "pt") as a, safe_open(tmp_path / "from-file" / "lora" / name, "pt") as b:
            keys = set(a.keys())
            assert keys == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)


@pytest.mark.parametrize("method", ["psoft", "lora"])
def test_quantize_trains_on_an_nf4_unet_resumes_exactly_and_records_it(method, pipe_dir, subject_dir, class_dir,
                                                                         tmp_path):
    """--quantize nf4: QPSOFT (and QLoRA with --method lora) on the UNet's linears in bitsandbytes NF4; the class
    images come from the unquantized pipeline, before the base is quantized."""
    pytest.importorskip("bitsandbytes")
    args = ("--method", method, "--quantize", "nf4", "--max_train_steps", 2, "--checkpointing_steps", 1,
            "--validation_steps", 2, "--lr_warmup_steps", 1)
    whole = dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "whole", *args))
    assert whole["finished"] and whole["args"]["quantize"] == "nf4"
    dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "cut", *args, "--stop_after_steps", 1))
    dreambooth.main(cli(pipe_dir, subject_dir, class_dir, tmp_path / "cut", *args,
                        "--resume_from_checkpoint", "latest"))
    losses = [[r["loss"] for r in json.loads((tmp_path / f / "metrics.json").read_text())["history"]]
              for f in ("whole", "cut")]
    assert losses[0] == losses[1] and all(math.isfinite(x) for x in losses[0])
    assert (tmp_path / "whole" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    if method == "lora":
        return
    header, tensors = pv.read_adapter(tmp_path / "whole" / "adapter.safetensors")
    _, resumed = pv.read_adapter(tmp_path / "cut" / "adapter.safetensors")
    assert tensors.keys() == resumed.keys() and all(torch.equal(tensors[k], resumed[k]) for k in tensors)
    kinds = {(len(layer["weight_shape"]), layer["quantization"]) for layer in header["layers"].values()}
    assert kinds == {(2, "bnb-nf4"), (4, None)}  # the linears quantized; the 1x1 conv proj_in / proj_out are not
    unet = pv.quantize_base(load(pipe_dir).unet, "nf4")  # the file loads onto the base it trained on, and moves it
    before = unet_out(unet)
    pv.load_adapter(unet, tmp_path / "whole" / "adapter.safetensors")
    assert rel_err(unet_out(unet), before) > 1e-6
    with pytest.raises(pv.BaseModelMismatchError):  # not onto the floating-point UNet
        pv.load_adapter(load(pipe_dir).unet, tmp_path / "whole" / "adapter.safetensors")
