"""Every covered diffusers denoiser (tests/denoisers.py), each from a tiny config: targets="auto" adapts exactly the
block layers the spec names and no conditioning linear, without the partial-blocks warning; PSOFT and OFT are the
identity at init, merge exactly, save and load exactly, and their exported LoRA reloads through the loader a user
of that model has and reproduces the adapted model. Then Sana's depthwise conv named explicitly, the warning the old
name regex earns on AuraFlow, and load_peft_lora's refusals."""

import re
import warnings

import diffusers
import pytest
from denoisers import DENOISERS, OFT, PSOFT, Denoiser, expected_targets, export_and_reload, lora_loader, run
from helpers import rel_err

import psoft_vision as pv
from psoft_vision.errors import AdapterFileError, NotLowRankError, TargetNotFoundError, UnsupportedLayerError
from psoft_vision.formats.peft_adapter import load_peft_lora
from psoft_vision.targets import Preset
from psoft_vision.testing import randomize_adapters

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # two fp32 forwards that must agree (identity at init, merged == unmerged)
LORA_TOL = 1e-4  # a reloaded LoRA against the adapted model
CHANGED = 1e-3  # randomised adapters must move the output at least this much, or agreeing proves nothing
SPECS = [pytest.param(spec, id=key) for key, spec in DENOISERS.items()]
#: ``(spec, extra config arguments)``: a spec with a known failure fails with its error, and passes with its workaround
RUNNING = [pytest.param(spec, {}, id=key) for key, spec in DENOISERS.items() if not spec.known_failure] + [
    param for key, spec in DENOISERS.items() if spec.known_failure for param in (
        pytest.param(spec, {}, id=key, marks=pytest.mark.xfail(raises=spec.known_failure[0], strict=True,
                                                                reason=spec.known_failure[1])),
        pytest.param(spec, spec.workaround, id=f"{key}-workaround"))]
METHODS = {"psoft": lambda **extra: pv.PSOFTConfig(**PSOFT, **extra),
           "oft": lambda **extra: pv.OFTConfig(**OFT, **extra)}


def inject_quietly(model, config, name: str = "default"):
    """Inject; OFT's block size adjusted to a layer's width warns on purpose, anything else fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pv.inject(model, config, name=name)
    unexpected = [str(w.message) for w in caught if "does not divide" not in str(w.message)]
    assert not unexpected, unexpected
    return model


@pytest.mark.parametrize("spec", SPECS)
def test_auto_adapts_every_block_layer_and_no_conditioning(spec: Denoiser):
    model = spec.make()
    expected = expected_targets(spec, model)
    assert len(expected) >= 6

    inject_quietly(model, pv.PSOFTConfig(**PSOFT))  # no "adapts k of the n blocks" warning either

    adapted = {name for name, _ in pv.adapted_layers(model)}
    assert adapted == expected, (sorted(expected - adapted), sorted(adapted - expected))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("spec", "extra"), RUNNING)
def test_identity_merge_save_load_and_lora_reload(spec: Denoiser, extra: dict, method: str, tmp_path):
    model, inputs = spec.make(), spec.example()
    reference = run(model, inputs)
    assert reference.abs().max() > 0

    inject_quietly(model, METHODS[method](**extra))
    assert rel_err(run(model, inputs), reference) <= TOL, "not the identity at init"

    randomize_adapters(model, seed=1, std=0.2)
    adapted = run(model, inputs)
    assert rel_err(adapted, reference) > CHANGED, "randomised adapters did not change the output"
    pv.merge(model)
    assert rel_err(run(model, inputs), adapted) <= TOL, "merged != unmerged"
    pv.unmerge(model)

    pv.save_adapter(model, tmp_path / "adapter.safetensors")
    loaded = pv.load_adapter(spec.make(), tmp_path / "adapter.safetensors")
    assert rel_err(run(loaded, inputs), adapted) <= 1e-6, "save_adapter / load_adapter changed the model"

    fresh = spec.make()
    export_and_reload(spec, model, fresh, tmp_path / "lora", full_deltas=method == "oft")
    assert not any(isinstance(m, pv.AdaptedLayer) for m in fresh.modules())
    assert rel_err(run(fresh, inputs), adapted) <= LORA_TOL, f"the LoRA reloaded by {lora_loader(spec)} differs"


def test_loaders_are_the_ones_diffusers_offers():
    """A pipeline's load_lora_weights where it reaches the model, else the model's load_lora_adapter, else PEFT."""
    kinds = {key: lora_loader(spec) for key, spec in DENOISERS.items()}
    assert {k for k, v in kinds.items() if v == "peft"} == {"pixart", "dit", "hunyuandit", "svd"}
    assert {k for k, v in kinds.items() if v == "model"} == {"controlnet"}  # its pipeline loads into the UNet
    for key in ("pixart", "dit", "hunyuandit", "svd"):
        spec = DENOISERS[key]
        assert not hasattr(getattr(diffusers, spec.pipeline), "load_lora_weights")
        assert not hasattr(spec.cls, "load_lora_adapter")


# ---------------------------------------------------------------------------------------------------------------
# grouped convolutions: Sana's depthwise feed-forward conv

SANA_DEPTHWISE = "transformer_blocks.0.ff.conv_depth"


def test_sana_depthwise_conv_named_explicitly_psoft_is_exact_per_channel(tmp_path):
    spec = DENOISERS["sana"]
    model, inputs = spec.make(), spec.example()
    depthwise = model.get_submodule(SANA_DEPTHWISE)
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels > 1
    reference = run(model, inputs)

    targets = sorted(expected_targets(spec, model)) + [SANA_DEPTHWISE]
    with pytest.warns(UserWarning, match=r"using rank 1 on 'transformer_blocks.0.ff.conv_depth'\.$"):
        pv.inject(model, pv.PSOFTConfig(targets=targets, **PSOFT))  # one channel per group: rank 1 at most

    layer = model.get_submodule(SANA_DEPTHWISE)
    assert (layer.adapters["default"].chunks, layer.adapters["default"].rank) == (depthwise.groups, 1)
    assert rel_err(run(model, inputs), reference) <= TOL
    randomize_adapters(layer, seed=2, std=0.2)  # the depthwise conv's adapter alone moves the output
    assert rel_err(run(model, inputs), reference) > CHANGED
    randomize_adapters(model, seed=3, std=0.2)
    adapted = run(model, inputs)
    pv.merge(model)
    assert rel_err(run(model, inputs), adapted) <= TOL
    pv.unmerge(model)
    pv.save_adapter(model, tmp_path / "sana.safetensors")
    assert rel_err(run(pv.load_adapter(spec.make(), tmp_path / "sana.safetensors"), inputs), adapted) <= 1e-6
    with pytest.raises(NotLowRankError):  # export_lora has no layout for a per-group update: refused, not wrong
        pv.export_lora(model, tmp_path / "lora")


def test_sana_depthwise_conv_is_refused_by_oft_by_name_and_skipped_by_auto():
    spec = DENOISERS["sana"]
    with pytest.raises(UnsupportedLayerError, match="conv_depth.*depthwise.*PSOFT"):
        pv.inject(spec.make(), pv.OFTConfig(targets=[SANA_DEPTHWISE], **OFT))
    model = inject_quietly(spec.make(), pv.OFTConfig(**OFT))
    assert SANA_DEPTHWISE not in {name for name, _ in pv.adapted_layers(model)}


# ---------------------------------------------------------------------------------------------------------------
# the name regex that "diffusion-transformer" was before targets came from structure

OLD_REGEX = (r"(single_)?transformer_blocks\.\d+\."
             r"(attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
             r"|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)")


def old_preset() -> Preset:
    pattern = re.compile(OLD_REGEX)
    return Preset("old-dit-regex", "the pre-structure diffusion-transformer regex",
                  lambda model: [n for n, _ in model.named_modules() if pattern.fullmatch(n)], OLD_REGEX)


def test_the_old_regex_misses_blocks_and_says_so():
    auraflow = DENOISERS["auraflow"].make()
    with pytest.warns(UserWarning, match=r"adapts 1 of the 2 blocks of AuraFlowTransformer2DModel and none of 1 "
                                         r"\('joint_transformer_blocks.0'\)"):
        pv.inject(auraflow, pv.PSOFTConfig(targets=old_preset(), **PSOFT))
    # HunyuanDiT's blocks are blocks.N: the regex finds nothing at all, which is an error rather than a warning
    with pytest.raises(TargetNotFoundError, match="old-dit-regex"):
        pv.inject(DENOISERS["hunyuandit"].make(), pv.PSOFTConfig(targets=old_preset(), **PSOFT))


# ---------------------------------------------------------------------------------------------------------------
# load_peft_lora


def test_load_peft_lora_refuses_what_is_not_a_peft_directory_and_takes_a_pipeline(tmp_path):
    spec = DENOISERS["dit"]
    model, inputs = spec.make(), spec.example()
    inject_quietly(model, pv.PSOFTConfig(**PSOFT))
    randomize_adapters(model, seed=3, std=0.2)
    file = pv.export_lora(model, tmp_path / "lora.safetensors")  # diffusers format: no adapter_config.json
    with pytest.raises(AdapterFileError, match="format='peft'"):
        load_peft_lora(spec.make(), file.parent)
    directory = pv.export_lora(model, tmp_path / "peft", format="peft")
    pipe = diffusers.DiTPipeline(transformer=spec.make(), vae=None, scheduler=None)
    assert load_peft_lora(pipe, directory) is pipe
    assert rel_err(run(pipe.transformer, inputs), run(model, inputs)) <= LORA_TOL
