"""DreamBooth on every pipeline family the trainer knows (train/dreambooth/families.py), end to end, and the
``transformers`` target rule its --train_text_encoder uses."""

import pytest
import torch

import psoft_vision as pv
from psoft_vision.targets import select
from psoft_vision.targets.presets import preset_for
from psoft_vision.targets.structure import transformers_targets

pytestmark = [pytest.mark.trainer, pytest.mark.usefixtures("one_thread")]


# ------------------------------------------------------------------------------------------ transformers targets
def tiny_clip(layers: int = 1, projection: bool = True, vocab: int = 40):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=8, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_t5(layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=layers, num_heads=2))


def test_transformers_rule_adapts_the_linears_of_the_layer_stacks_and_nothing_else():
    clip = tiny_clip(layers=2)
    expected = [f"text_model.encoder.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1",
                 "mlp.fc2")]
    assert preset_for(clip) == "transformers"
    assert transformers_targets(clip) == expected == select(clip, "auto")  # never text_projection or embeddings
    one_layer = tiny_clip(layers=1, projection=False)  # a stack of one layer is a stack: CLIPEncoderLayer is declared
    names = [n for n, _ in one_layer.named_modules()]
    prefix = "text_model." if "text_model" in names else ""  # recent transformers drop this level in CLIPTextModel
    assert select(one_layer, "auto") == [prefix + n.removeprefix("text_model.") for n in expected if ".layers.0." in n]

    t5 = tiny_t5().eval()  # no dropout
    expected = [f"encoder.block.{i}.layer.{j}.{p}" for i in range(2) for j, ps in
                ((0, ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")),
                 (1, ("DenseReluDense.wi", "DenseReluDense.wo"))) for p in ps]
    assert select(t5, "auto") == expected  # not the shared embedding, relative_attention_bias or final norm

    pv.inject(t5, pv.PSOFTConfig(rank=2))
    ids = torch.tensor([[3, 4, 5, 1]])
    with torch.no_grad():
        before = t5(ids).last_hidden_state
        with pv.disabled(t5):
            assert torch.allclose(t5(ids).last_hidden_state, before, atol=1e-6)  # the identity at init
    assert {n for n, p in t5.named_parameters() if p.requires_grad} == {
        f"{layer}.adapters.default.{k}" for layer in expected for k in ("q", "alpha", "beta")}


# ------------------------------------------------------------------------------------------ tiny pipelines
# Every family from configs and offline tokenizers (no file is downloaded): 16x16 images, 8x8 latents, one or two
# layers. Saved once per session, and loaded back by the trainer through DiffusionPipeline.from_pretrained.
RESOLUTION = 16
WORDS = ("a", "photo", "of", "sks", "bag", "dog")


def clip_tokenizer():
    from train.offline.pretrain_t2i import build_tokenizer

    return build_tokenizer()  # a CLIP BPE tokenizer from a vocabulary in code, 16 tokens long


def t5_tokenizer():
    """A T5 (Unigram) tokenizer: the special tokens, a piece per word, single letters for the rest."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *((f"▁{w}", -1.0) for w in WORDS),
             *((c, -5.0) for c in string.ascii_lowercase + "-")]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=8)


def gemma_tokenizer():
    """A Gemma (BPE) tokenizer whose merges spell each word of WORDS; anything else falls back to letters."""
    import string

    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
    for c in string.ascii_lowercase + "▁-":
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in WORDS:
        symbols = ["▁", *word]
        while len(symbols) > 1:
            if (symbols[0], symbols[1]) not in merges:
                merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=merges)


def vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=RESOLUTION, mid_block_add_attention=False,
                         **extra)


def t5_encoder(vocab: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))


def build_sd(prediction_type: str = "epsilon"):
    import diffusers

    tokenizer = clip_tokenizer()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    return diffusers.StableDiffusionPipeline(
        vae=vae(), text_encoder=tiny_clip(projection=False, vocab=len(tokenizer)), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl():
    import diffusers

    tokenizer = clip_tokenizer()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 timestep_spacing="leading", steps_offset=1)
    # two layers: SDXL conditions on the penultimate hidden states, so a one-layer CLIP would train nothing
    return diffusers.StableDiffusionXLPipeline(
        vae=vae(force_upcast=True), text_encoder=tiny_clip(2, projection=False, vocab=len(tokenizer)),
        text_encoder_2=tiny_clip(2, vocab=len(tokenizer)), tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=scheduler)


def build_sd3():
    import diffusers

    tokenizer, t5 = clip_tokenizer(), t5_tokenizer()
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.1), text_encoder=tiny_clip(vocab=len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=tiny_clip(vocab=len(tokenizer)), tokenizer_2=tokenizer, text_encoder_3=t5_encoder(len(t5)),
        tokenizer_3=t5)


def build_flux():
    import diffusers

    tokenizer, t5 = clip_tokenizer(), t5_tokenizer()
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15)  # FLUX.1-dev's
    return diffusers.FluxPipeline(
        scheduler=scheduler, vae=vae(shift_factor=0.1, scaling_factor=0.5),
        text_encoder=tiny_clip(projection=False, vocab=len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=t5_encoder(len(t5)), tokenizer_2=t5, transformer=transformer)


def build_sana():
    import diffusers
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=512))
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")  # x4: SanaPipeline wants sides divisible by 32
    dc_ae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.4)
    transformer = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8)
    scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0)  # what Sana ships
    return diffusers.SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=dc_ae,
                                  transformer=transformer, scheduler=scheduler)


#: The image side per family: 8x8 latents everywhere (Sana's pipeline wants sides divisible by 32).
SIDES = {"sana": 32}
BUILDERS = {"sd": build_sd, "sd-v": lambda: build_sd("v_prediction"), "sdxl": build_sdxl, "sd3": build_sd3,
            "flux": build_flux, "sana": build_sana}


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory):
    """Each family's tiny pipeline, built and saved on first use, once per session."""
    built = {}

    def get(name: str):
        if name not in built:
            torch.manual_seed(0)
            built[name] = tmp_path_factory.mktemp(f"pipe-{name}")
            BUILDERS[name]().save_pretrained(built[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def views(tmp_path_factory):
    from PIL import Image

    from train.dreambooth.subject import SUBJECT_DIR

    path = tmp_path_factory.mktemp("views")
    for i, view in enumerate(sorted((SUBJECT_DIR / "train").glob("*.png"))[:3]):
        Image.open(view).resize((40, 40)).save(path / f"view-{i}.png")
    return path


def family_of_name(name: str):
    from train.dreambooth.families import FAMILIES

    return FAMILIES[name.removesuffix("-v")]


def argv(name: str, pipe, views, out, *extra) -> list[str]:
    family = family_of_name(name)
    side = SIDES.get(name, RESOLUTION)
    return ["--pretrained_model_name_or_path", str(pipe), "--instance_data_dir", str(views), "--class_data_dir",
            str(out.parent / f"class-{name}"), "--output_dir", str(out), "--resolution", str(side),
            "--num_class_images", "2", "--sample_batch_size", "2", "--train_batch_size", "2",
            "--num_inference_steps", "2", "--num_validation_images", "2", "--max_train_steps", "2",
            "--validation_steps", "2", "--rank", "4", "--quiet",
            *(["--train_text_encoder"] if family.text_encoders else []),
            *(["--max_sequence_length", "8"] if family.sequence_length else []), *map(str, extra)]


@pytest.fixture(scope="session", params=list(BUILDERS))
def trained(request, pipeline_dirs, views, tmp_path_factory):
    """Two steps uninterrupted, and the same two steps as one step, a stop, and a resume."""
    from train.dreambooth import trainer

    name, root = request.param, tmp_path_factory.mktemp(f"runs-{request.param}")
    pipe = pipeline_dirs(name)
    whole = trainer.main(argv(name, pipe, views, root / "whole"))
    cut = trainer.main(argv(name, pipe, views, root / "cut", "--stop_after_steps", 1))
    resumed = trainer.main(argv(name, pipe, views, root / "cut", "--resume_from_checkpoint", "latest"))
    return dict(name=name, pipe=pipe, out=root / "whole", whole=whole, cut=cut, resumed=resumed,
                resumed_out=root / "cut")


def adapter_files(folder):
    return sorted(p.name for p in folder.glob("adapter*.safetensors"))


def test_two_steps_and_a_resume_equal_to_the_uninterrupted_run(trained):
    import json

    from PIL import Image

    name, out, whole = trained["name"], trained["out"], trained["whole"]
    family = family_of_name(name)
    assert whole["finished"] and whole["steps"] == 2 and whole["family"] == family.name
    assert whole["trained"][1:] == list(family.text_encoders)
    assert whole["prediction_type"] == {"sd": "epsilon", "sd-v": "v_prediction", "sdxl": "epsilon"}.get(name, "flow")
    side = SIDES.get(name, RESOLUTION)
    assert Image.open(out / "validation" / "step-000002.png").size == (2 * side, side)  # two validation images
    assert (out / "lora" / "kohya.safetensors").is_file() == family.kohya
    assert family.kohya or whole["kohya"].startswith("not written: ")

    assert not trained["cut"]["finished"] and trained["resumed"]["finished"]
    files = adapter_files(out)
    assert files == adapter_files(trained["resumed_out"]) and len(files) == 1 + len(family.text_encoders)
    for file in files:  # bit-identical adapter tensors, text encoders' included
        _, a = pv.read_adapter(out / file)
        _, b = pv.read_adapter(trained["resumed_out"] / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    losses = [json.loads((f / "metrics.json").read_text())["history"] for f in (out, trained["resumed_out"])]
    assert [r["loss"] for r in losses[0]] == [r["loss"] for r in losses[1]]


TOL = 1e-4  # an exported LoRA reproduces the adapted outputs to this relative error (fp32)


def rel_err(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def load(pipe_dir):
    from train.dreambooth.diffusion import load_pipeline

    return load_pipeline(pipe_dir, torch.device("cpu"))


@torch.no_grad()
def outputs(pipe, name: str, condition: dict) -> dict[str, torch.Tensor]:
    """The denoiser's prediction on fixed noisy latents under a fixed conditioning, and each text encoder's last
    hidden state on fixed token ids: what an adapter changes, without sampling."""
    from types import SimpleNamespace

    from psoft_vision.model import denoiser

    family = family_of_name(name)
    model, _ = denoiser(pipe)
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([100.0, 700.0])
    out = {"denoiser": family.predict(model, model.config, SimpleNamespace(guidance_scale=3.0), noisy, timesteps,
                                      condition)}
    for attribute in family.text_encoders:
        ids = getattr(pipe, attribute.replace("text_encoder", "tokenizer"))(
            "a photo of sks bag", padding="max_length", max_length=16, return_tensors="pt").input_ids
        out[attribute] = getattr(pipe, attribute)(ids).last_hidden_state
    return out


def base_condition(pipe, name: str) -> dict:
    """The conditioning of two prompts by the base pipeline, with SDXL's time ids for two 16x16 images."""
    from types import SimpleNamespace

    family = family_of_name(name)
    args = SimpleNamespace(max_sequence_length=8)
    with torch.no_grad():
        a, b = (family.encode(pipe, p, args, torch.device("cpu")) for p in ("a photo of sks bag", "a photo of a dog"))
    condition = {k: torch.cat([a[k], b[k]]) for k in a}
    if family.image_condition:
        condition.update(family.image_condition([(16, 16, 0, 0)] * 2, 16))
    return condition


def test_the_exported_loras_load_with_load_lora_weights_and_reproduce_the_adapters(trained):
    name, out, pipe_dir = trained["name"], trained["out"], trained["pipe"]
    condition = base_condition(load(pipe_dir), name)
    base = outputs(load(pipe_dir), name, condition)
    ours = load(pipe_dir)
    for file in adapter_files(out):  # adapter.safetensors -> the denoiser, adapter_<encoder> -> that encoder
        role = file.removeprefix("adapter").removeprefix("_").removesuffix(".safetensors")
        from psoft_vision.model import denoiser

        pv.load_adapter(getattr(ours, role) if role else denoiser(ours)[0], out / file)
    expected = outputs(ours, name, condition)
    assert expected.keys() == base.keys() == {"denoiser", *family_of_name(name).text_encoders}
    for key in expected:
        assert rel_err(expected[key], base[key]) > 1e-6, key  # two steps moved it, or matching proves nothing
    # diffusers reads a Flux kohya file's single blocks only at FLUX.1's own widths (it hard-codes the split of
    # linear1): that read is tested at that width in tests/test_export_formats.py, not on this tiny Flux
    kohya = family_of_name(name).kohya and name != "flux"
    files = ["pytorch_lora_weights.safetensors"] + (["kohya.safetensors"] if kohya else [])
    for file in files:
        fresh = load(pipe_dir)
        fresh.load_lora_weights(out / "lora", weight_name=file)
        got = outputs(fresh, name, condition)
        for key in expected:
            assert rel_err(got[key], expected[key]) <= TOL, (file, key)


# ------------------------------------------------------------------------------------------ the families' pieces
def test_flux_packing_and_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    from train.dreambooth.families import latent_image_ids, pack, unpack

    latents = torch.randn(2, 4, 8, 6)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 4, 8, 6))
    assert torch.equal(unpack(pack(latents), latents.shape), latents)
    assert torch.equal(latent_image_ids(4, 3, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_flow_sigmas_static_and_resolution_dependent_shift():
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    from train.dreambooth.diffusion import flow_sigmas

    u = torch.tensor([0.0, 0.25, 0.5, 0.999])
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s = 1 - (u * 1000).long() / 1000  # the unshifted sigma at each index, descending from 1
    assert torch.allclose(flow_sigmas(sd3, u, tokens=4096), 3 * s / (1 + 2 * s), atol=1e-6)
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    for tokens in (256, 1024, 4096):  # FluxPipeline's mu: linear in the image's token count
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        assert torch.allclose(flow_sigmas(flux, u, tokens), expected.float(), atol=1e-6)
    assert (flow_sigmas(flux, u, 4096) >= flow_sigmas(flux, u, 256)).all()  # more tokens, more noise


def test_sdxl_time_ids_come_from_each_images_size_and_crop(tmp_path):
    from PIL import Image

    from train.dreambooth.families import sdxl_time_ids
    from train.dreambooth.images import image_sizes

    Image.new("RGB", (40, 60)).save(tmp_path / "tall.png")  # width 40, height 60
    Image.new("RGB", (90, 30)).save(tmp_path / "wide.png")
    sizes = image_sizes([tmp_path / "tall.png", tmp_path / "wide.png"], 16)
    assert sizes == [(60, 40, 4, 0), (30, 90, 0, 16)]  # resized to 24x16 and 16x48, centre-cropped to 16x16
    assert sdxl_time_ids(sizes, 16)["time_ids"].tolist() == [[60, 40, 4, 0, 16, 16], [30, 90, 0, 16, 16, 16]]


def test_vae_upcast_rule_and_a_bf16_run(pipeline_dirs, views, tmp_path):
    from types import SimpleNamespace

    from train.dreambooth import trainer
    from train.dreambooth.diffusion import vae_dtype

    upcast, plain = SimpleNamespace(config={"force_upcast": True}), SimpleNamespace(config={"force_upcast": False})
    assert vae_dtype(upcast, torch.float16) == torch.float32  # SDXL's VAE overflows in fp16
    assert vae_dtype(plain, torch.float16) == torch.float16 and vae_dtype(upcast, torch.bfloat16) == torch.bfloat16
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        result = trainer.main(argv("sdxl", pipeline_dirs("sdxl"), views, tmp_path / "out", "--mixed_precision",
                                   "bf16", "--max_train_steps", 1))
    finally:  # the next runs in this process use none
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result["finished"] and result["dtypes"] == {"unet": "bfloat16", "vae": "bfloat16",
                                                       "text_encoder": "bfloat16", "text_encoder_2": "bfloat16"}
    _, tensors = pv.read_adapter(tmp_path / "out" / "adapter.safetensors")
    assert {t.dtype for k, t in tensors.items() if "anchor" not in k} == {torch.float32}  # adapters train in fp32


def test_flow_options_and_named_errors(pipeline_dirs, views, tmp_path):
    from train.dreambooth import trainer

    result = trainer.main(argv("sd3", pipeline_dirs("sd3"), views, tmp_path / "a", "--weighting_scheme",
                               "logit_normal", "--precondition_outputs", 1, "--max_train_steps", 1))
    assert result["finished"] and result["args"]["weighting_scheme"] == "logit_normal"
    with pytest.raises(trainer.DreamBoothError, match="Sana's Gemma"):
        trainer.main(argv("sana", pipeline_dirs("sana"), views, tmp_path / "b", "--train_text_encoder"))
    with pytest.raises(trainer.DreamBoothError, match="does not apply to sd3"):
        trainer.main(argv("sd3", pipeline_dirs("sd3"), views, tmp_path / "c", "--prediction_type", "epsilon"))
    with pytest.raises(trainer.DreamBoothError, match="multiple of 4"):  # Flux packs 2x2 latents
        trainer.main(argv("flux", pipeline_dirs("flux"), views, tmp_path / "d", "--resolution", 18))
