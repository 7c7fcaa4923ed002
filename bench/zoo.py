"""The timm zoo sweep: one model of every timm family, adapted with PSOFT and OFTv2 defaults and checked end to end.

``python -m bench.zoo --out docs/models.md`` (``make zoo``) runs every family and rewrites the timm table of that
file; ``--families vision_transformer resnet`` runs some. tests/test_zoo.py runs the same checks (a subset by
default, all of them under ``pytest -m zoo``).

A family is a timm model module (``timm.list_modules()``: ``vision_transformer``, ``resnet``, ...), because that
is where timm puts an architecture's code: two models of one module share their blocks, their ``group_matcher``
and so the layers ``targets="auto"`` finds. Each family is checked on its smallest model by parameter count, built
with ``pretrained=False`` (nothing is downloaded); the few whose smallest model is too big or too slow for a CPU
are built smaller through their constructor's keyword arguments (:data:`SHRUNK`).

A randomly initialised model is not a pretrained one: zero-initialised residual branches, layer scales and
biases would hide a wrong adapter behind a branch that contributes nothing. ``emulate_pretrained``
(psoft_vision.testing) gives those parameters random values of a trained model's size first, so every path carries
signal.

The checks, for each method with its default config (:func:`check`): the identity at init, a non-zero finite
gradient in every adapter parameter after one backward, merged equal to unmerged once the adapters are randomised,
unmerge restoring outputs and weights bit for bit, and save -> a freshly built model with the same base weights ->
load reproducing the output.
"""

import argparse
import copy
import datetime
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

import psoft_vision as pv
from psoft_vision.testing import emulate_pretrained, randomize_adapters

IDENTITY_TOLERANCE = 1e-5  # relative, adapters at init
MERGE_TOLERANCE = 1e-4  # relative, merged against unmerged with randomised adapters
LOAD_TOLERANCE = 1e-5  # relative, a loaded adapter against the one saved
#: Relative, the fx-traced model against the eager one: its output, and each adapter parameter's gradient measured
#: against the norm of all adapter gradients (a parameter whose gradient is rounding noise has no relative error).
FX_TOLERANCE = 1e-5
#: The two checks that compare two computations of one function, merged against unmerged and traced against eager,
#: run on an fp64 copy of the model: in fp32 these small random-weight models' own rounding reaches the tolerances
#: (visformer_tiny's plain output differs from its fp64 output by 4e-5, and skresnet18's gradients by 3e-4), so in
#: fp32 the checks would judge a model's conditioning, not the adapters.
EXACT_DTYPE = torch.float64
#: The ``features_only`` wrappers of timm (``feature_cls``), each checked where the family builds it.
FEATURE_CLASSES = ("list", "dict", "hook", "getter", "fx")
#: A randomised adapter must move the output at least this much (relative), or the merge check proves nothing.
MIN_EFFECT = 1e-3
METHODS = {"psoft": pv.PSOFTConfig, "oft": pv.OFTConfig}
NAMES = {"psoft": "PSOFT", "oft": "OFTv2"}

#: The smallest model of each family by parameter count in timm 1.0.31 (counted on the meta device). A family
#: missing here (a newer timm) is found by :func:`smallest_model`, which builds every model of it on meta.
SMALLEST = {
    "beit": "beit_base_patch16_224",
    "byoanet": "halonet_h1",
    "byobnet": "test_byobnet",
    "cait": "cait_xxs24_224",
    "coat": "coat_tiny",
    "convit": "convit_tiny",
    "convmixer": "convmixer_768_32",
    "convnext": "test_convnext",
    "cpubone": "cpubone_nano",
    "crossvit": "crossvit_tiny_240",
    "csatv2": "csatv2",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m",
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "dpn": "dpn48b",
    "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "test_efficientnet",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "eva": "vit_tiny_patch16_dinov3_qkvb",
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf",
    "gcvit": "gcvit_xxtiny",
    "gemma4_vit": "gemma4_vit_167m",
    "ghostnet": "ghostnet_050",
    "hardcorenas": "hardcorenas_b",
    "hgnet": "hgnetv2_b0",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s",
    "lowformer": "lowformer_b0",
    "mambaout": "test_mambaout",
    "maxxvit": "test_coatnet",
    "metaformer": "poolformerv2_s12",
    "mlp_mixer": "gmlp_ti16_224",
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv5": "mobilenetv5_base",
    "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_parfac_gap",
    "nasnet": "nasnetalarge",
    "nest": "nest_tiny",
    "nextvit": "nextvit_small",
    "nfnet": "test_nfnet",
    "pit": "pit_ti_224",
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "qwen3_vit": "qwen3_vit_88m",
    "rdnet": "rdnet_tiny",
    "regnet": "regnetx_002",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m1",
    "res2net": "res2next50",
    "resnest": "resnest14d",
    "resnet": "test_resnet",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42",
    "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_s",
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": "tnt_s_legacy_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_svt_small",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",
    "vision_transformer": "test_vit",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    "vision_transformer_relpos": "test_vit_relpos",
    "vision_transformer_sam": "samvit_base_patch16_224",
    "vitamin": "vitamin_small_224",
    "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception": "legacy_xception",
    "xception_aligned": "xception41p",
    "xcit": "xcit_nano_12_p8_224",
}


@dataclass(frozen=True)
class Entry:
    """The model a family is checked on: a timm name, constructor keyword arguments, and the input's side."""

    family: str
    model: str
    kwargs: dict = field(default_factory=dict)
    size: int | None = None  # the input's height and width; None: the model's pretrained_cfg["input_size"]
    why: str = ""  # why the kwargs differ from the model's own

    def label(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.model}({args})" if args else self.model


#: Families built otherwise than their smallest model at its own input size, one entry each, with the reason.
_TINY_VIT = {"embed_dim": 128, "depth": 2, "num_heads": 2}
SHRUNK: dict[str, Entry] = {e.family: e for e in (
    Entry("beit", "beit_base_patch16_224", {**_TINY_VIT, "img_size": 112},
          why="the smallest BEiT is ViT-B (86M): 2 blocks of width 128 at 112 px"),
    Entry("convmixer", "convmixer_768_32", size=112,
          why="32 depthwise 9x9 convs at width 768 take a minute on CPU at 224 px: 112 px"),
    Entry("deepseek_vit", "deepseek_vit_412m", {**_TINY_VIT, "img_size": 112},
          why="the smallest DeepSeek ViT has 412M parameters: 2 blocks of width 128 at 112 px"),
    Entry("efficientnet", "test_efficientnet", {"pad_type": "same"},
          why="TF 'same' padding, as in the tf_ variants: covers Conv2dSame on the weight path"),
    Entry("gemma4_vit", "gemma4_vit_167m", {**_TINY_VIT, "head_dim": 64, "intermediate_size": 512}, size=128,
          why="the smallest Gemma 4 ViT has 167M parameters at 768 px: 2 blocks of width 128 at 128 px"),
    Entry("hieradet_sam2", "sam2_hiera_tiny", size=224,
          why="its input is 896 px (2 minutes on CPU); any multiple of its patch works: 224 px"),
    Entry("mobilenetv5", "mobilenetv5_base", {"channel_multiplier": 0.25}, size=128,
          why="the smallest MobileNetV5 has 83M parameters: a quarter of the channels at 128 px"),
    Entry("naflexvit", "naflexvit_base_patch16_parfac_gap", _TINY_VIT, size=128,
          why="the smallest NaFlexViT is ViT-B (86M): 2 blocks of width 128 at 128 px"),
    Entry("nasnet", "nasnetalarge", {"stem_size": 32, "num_features": 768}, size=128,
          why="NASNet-A Large (89M, 331 px) is the only one: 32 channels per cell instead of 168, at 128 px"),
    Entry("pnasnet", "pnasnet5large", size=96,
          why="PNASNet-5 Large (86M, 331 px) is the only one and has no width argument: 96 px"),
    Entry("qwen3_vit", "qwen3_vit_88m", {**_TINY_VIT, "img_size": 128},
          why="the smallest Qwen3 ViT has 88M parameters at 768 px: 2 blocks of width 128 at 128 px"),
    Entry("vgg", "vgg11", {"mlp_ratio": 0.125}, size=96,
          why="VGG-11 has 133M parameters, 103M of them in its 4096-wide pre-logits conv: width 512 there, 96 px"),
    Entry("vision_transformer_sam", "samvit_base_patch16_224",
          {**_TINY_VIT, "global_attn_indexes": [1], "window_size": 4, "img_size": 112},
          why="the smallest SAM ViT is ViT-B (86M): 2 blocks of width 128 (one windowed, one global) at 112 px"),
)}


def smallest_model(family: str) -> str:
    """The model of ``family`` with the fewest parameters, counted on the meta device (nothing is allocated)."""
    counts = {}
    for name in timm.list_models(module=family):
        try:
            with torch.device("meta"):
                counts[name] = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception:  # a model that needs what a meta build cannot give is not the smallest we can run
            continue
    if not counts:
        raise LookupError(f"no model of timm family {family!r} builds; add an entry to bench.zoo.SHRUNK.")
    return min(counts, key=counts.get)


def entry_for(family: str) -> Entry:
    if family in SHRUNK:
        return SHRUNK[family]
    return Entry(family, SMALLEST.get(family) or smallest_model(family))


def families() -> list[str]:
    """Every timm model family (module), sorted."""
    return sorted(timm.list_modules())


# ------------------------------------------------------------------------------------------------------ models
class Built:
    """A family's model, built once; :meth:`fresh` gives new copies with the same base weights."""

    def __init__(self, entry: Entry):
        self.entry = entry
        torch.manual_seed(0)
        model = self._create()
        emulate_pretrained(model)
        self.state = copy.deepcopy(model.state_dict())
        cfg = model.pretrained_cfg
        side = entry.size or entry.kwargs.get("img_size")
        shape = (cfg["input_size"][0], side, side) if side else tuple(cfg["input_size"])
        self.x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.y = output(model(self.x))

    def _create(self) -> nn.Module:
        return timm.create_model(self.entry.model, pretrained=False, **self.entry.kwargs).eval()

    def fresh(self) -> nn.Module:
        model = self._create()
        model.load_state_dict(self.state)
        return model


def output(out) -> torch.Tensor:
    """The model's prediction: a tensor, or the first tensor of a tuple or a dict (an fx feature extractor's)."""
    while isinstance(out, tuple | list | dict):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out.double()


def probe_loss(out: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the prediction: a loss whose gradient is not zero by construction, as that of
    ``out.pow(2).mean()`` is on a model ending in a normalisation without affine weights (deepseek_vit, qwen3_vit)."""
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    return (out * probe).sum()


def in_exact_dtype(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``model`` and ``x`` in :data:`EXACT_DTYPE`."""
    return copy.deepcopy(model).to(EXACT_DTYPE), x.to(EXACT_DTYPE)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------------ checks
class CheckFailed(AssertionError):
    """One of the sweep's checks did not hold; the message names the check and the numbers."""


@dataclass
class MethodResult:
    status: str  # "pass", "fail" (a check did not hold), "error" (an exception), "left out" (a named refusal)
    detail: str = ""
    fx: str = ""  # the fx check (check_fx): "pass", or what failed; "n/a: ..." where timm cannot trace the plain model
    trainable: int = 0
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class FamilyResult:
    entry: Entry
    layers: int = 0
    layer_types: Counter = field(default_factory=Counter)
    methods: dict[str, MethodResult] = field(default_factory=dict)
    error: str = ""  # the model itself could not be built or run
    features: dict[str, str] = field(default_factory=dict)  # feature_cls -> "pass", "n/a: ..." or what failed
    seconds: float = 0.0
    input_side: str = ""  # the input's height (and width where it differs), in pixels

    def passed(self) -> bool:
        return not self.error and all(r.status == "pass" for r in self.methods.values())

    def contract_failures(self) -> list[str]:
        """What failed of the fx and ``features_only`` checks (those timm itself cannot do are not failures)."""
        failed = [f"{NAMES[m]} fx: {r.fx}" for m, r in self.methods.items() if r.fx not in ("", "pass")
                  and not r.fx.startswith("n/a")]
        return failed + [f"features_only {cls}: {s}" for cls, s in self.features.items()
                         if s != "pass" and not s.startswith("n/a")]


def _dead_gradients(model: nn.Module) -> list[str]:
    dead = []
    for layer_name, layer in pv.adapted_layers(model):
        for name, p in layer.adapters.named_parameters():
            if p.numel() and (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()):
                dead.append(f"{layer_name}.{name}")
    return dead


def check(built: Built, method: str) -> MethodResult:
    """Every check of one method with its default config on a fresh copy of the family's model."""
    numbers = {}
    model = built.fresh()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clamped ranks and adjusted block sizes: expected on small layers
            pv.inject(model, METHODS[method]())
    except pv.PSOFTVisionError as refusal:  # a named refusal: the family is left out, and the table says why
        return MethodResult("left out", f"{type(refusal).__name__}: {refusal}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        numbers["identity"] = rel(output(model(built.x)), built.y)
    if not numbers["identity"] <= IDENTITY_TOLERANCE:
        raise CheckFailed(f"identity at init: relative change {numbers['identity']:.1e} > {IDENTITY_TOLERANCE:.0e}")

    loss = probe_loss(output(model(built.x)))
    if not loss.requires_grad:
        raise CheckFailed("no gradient: the output depends on no adapter parameter")
    loss.backward()
    dead = _dead_gradients(model)
    if dead:
        raise CheckFailed(f"no gradient (zero, missing or not finite) in {len(dead)} adapter parameters: "
                          f"{', '.join(dead[:4])}{' ...' if len(dead) > 4 else ''}")
    model.zero_grad(set_to_none=True)

    randomize_adapters(model, seed=1)
    with torch.no_grad():
        unmerged = output(model(built.x))
        numbers["effect"] = rel(unmerged, built.y)
        if not numbers["effect"] >= MIN_EFFECT:
            raise CheckFailed(f"randomised adapters move the output by {numbers['effect']:.1e} only "
                              f"(< {MIN_EFFECT:.0e}): the merge check would prove nothing")
        weights = {name: layer.base.weight.clone() for name, layer in pv.adapted_layers(model)}
        pv.merge(model)
        numbers["merge fp32"] = rel(output(model(built.x)), unmerged)  # reported; checked in EXACT_DTYPE
        pv.unmerge(model)
        restored = output(model(built.x))
        wide, x = in_exact_dtype(model, built.x)
        wide_unmerged = output(wide(x))
        numbers["merge"] = rel(output(pv.merge(wide)(x)), wide_unmerged)
    if not numbers["merge"] <= MERGE_TOLERANCE:
        raise CheckFailed(f"merged differs from unmerged by {numbers['merge']:.1e} > {MERGE_TOLERANCE:.0e}")
    changed = [n for n, layer in pv.adapted_layers(model) if not torch.equal(layer.base.weight, weights[n])]
    if changed or not torch.equal(restored, unmerged):
        raise CheckFailed(f"unmerge is not exact: {len(changed)} weights differ ({changed[:3]}), output "
                          f"{'equal' if torch.equal(restored, unmerged) else 'differs'}")

    numbers["state_dict"] = _state_dict_round_trip(built, method, model, unmerged)

    with tempfile.TemporaryDirectory() as folder:
        path = pv.save_adapter(model, Path(folder) / "adapter.safetensors")
        loaded = pv.load_adapter(built.fresh(), path)
        with torch.no_grad():
            numbers["load"] = rel(output(loaded.eval()(built.x)), unmerged)
    if not numbers["load"] <= LOAD_TOLERANCE:
        raise CheckFailed(f"the loaded adapter gives another output: relative difference {numbers['load']:.1e}")
    return MethodResult("pass", trainable=trainable, numbers=numbers, fx=check_fx(built, model, numbers))


def _adapter_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = output(model(x))
    if out.requires_grad:  # not when every adapter is traced in as a constant
        probe_loss(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


class _TimmTracer(torch.fx.Tracer):
    """torch.fx's tracer with timm's untraceable modules as leaves and its untraceable functions wrapped, as timm's fx
    feature extraction (``timm.models.create_feature_extractor``) traces, in one trace instead of its four."""

    def __init__(self):
        from timm.models import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, self.leaves) or super().is_leaf_module(module, name)


def fx_traced(model: nn.Module) -> nn.Module:
    """``model`` traced by torch.fx as timm traces it, without gradients: a rotation cached then would enter the
    graph as a constant, and the gradient check of :func:`check_fx` would find it."""
    with torch.no_grad():
        return torch.fx.GraphModule(model, _TimmTracer().trace(model))


def check_fx(built: Built, model: nn.Module, numbers: dict) -> str:
    """The adapted model (randomised adapters) traced by torch.fx against itself eagerly, both in ``EXACT_DTYPE``:
    the same output and the same gradient in every adapter parameter, to ``FX_TOLERANCE``. "n/a: ..." where timm
    cannot trace the plain model."""
    model, x = in_exact_dtype(model, built.x)
    with torch.no_grad():
        model(x)  # every cache warm, as after an evaluation: tracing must not take a cached rotation as a constant
    try:
        traced = fx_traced(model)
    except Exception as error:  # noqa: BLE001 - a failure to trace is this check's result
        try:
            fx_traced(built.fresh())
        except Exception as plain:  # noqa: BLE001 - timm's own limit, not the adapters'
            return f"n/a: timm cannot trace the plain model ({type(plain).__name__})"
        return f"the adapted model does not trace: {type(error).__name__}: {str(error)[:200]}"
    out, grads = _adapter_grads(model, x)
    try:
        traced_out, traced_grads = _adapter_grads(traced, x)
    except Exception as error:  # noqa: BLE001 - a traced module that cannot run is this check's result
        try:
            with torch.no_grad():
                fx_traced(built.fresh())(built.x)
        except Exception as plain:  # noqa: BLE001 - timm's own limit (hiera traces its optional mask as an input)
            return f"n/a: timm's traced plain model does not run either ({type(plain).__name__})"
        return f"the traced model does not run: {type(error).__name__}: {str(error)[:200]}"
    if traced_grads.keys() != grads.keys():
        return f"{len(grads)} parameters get a gradient eagerly, {len(traced_grads)} traced"
    scale = torch.cat([g.flatten() for g in grads.values()]).norm().clamp_min(1e-30)
    numbers["fx"] = max(rel(traced_out, out), *(((traced_grads[n] - g).norm() / scale).item()
                                                 for n, g in grads.items()))
    if not numbers["fx"] <= FX_TOLERANCE:
        return f"traced differs from eager by {numbers['fx']:.1e} > {FX_TOLERANCE:.0e}"
    return "pass"


def original_name(wrapper: nn.Module, model: nn.Module, name: str) -> str:
    """The name in the full model of a wrapper's module, as timm's wrappers rename: FeatureGetterNet keeps the model
    as ``model``, FeatureHookNet may as ``body``, FeatureGraphNet's graph as ``graph_module``; the others flatten the
    first level of a ``Sequential`` child (``stages.0`` -> ``stages_0``)."""
    for prefix in ("model.", "body.", "graph_module."):
        if name.startswith(prefix) and prefix[:-1] in dict(wrapper.named_children()):
            return name.removeprefix(prefix)
    head, _, rest = name.partition(".")
    if head not in dict(model.named_children()):  # ``parent_child``, where either name may hold underscores
        head = next(f"{parent}.{child}" for parent, module in model.named_children()
                    for child, _ in module.named_children() if head == f"{parent}_{child}")
    return f"{head}.{rest}" if rest else head


def check_features(entry: Entry) -> dict[str, str]:
    """For each timm ``features_only`` wrapper the model builds: ``inject`` (``targets="auto"``) adapts exactly the
    layers that it adapts on the full model among those the wrapper keeps, at least one, never a stem layer."""
    results = {}
    full = timm.create_model(entry.model, pretrained=False, **entry.kwargs)
    expected = set(pv.targets.select(full, "auto"))
    for cls in FEATURE_CLASSES:
        try:
            wrapper = timm.create_model(entry.model, pretrained=False, features_only=True, feature_cls=cls,
                                        **entry.kwargs)
        except Exception as error:  # noqa: BLE001 - timm's own limit: this wrapper is not offered for the model
            results[cls] = f"n/a: timm does not build it ({type(error).__name__})"
            continue
        try:
            kept = {original_name(wrapper, full, n) for n, m in pv.targets.structure.candidate_modules(wrapper)
                    if pv.targets.structure.dense_layer(m)}
            chosen = {original_name(wrapper, full, n) for n in pv.targets.select(wrapper, "auto")}
        except Exception as error:  # noqa: BLE001 - recorded as this wrapper's failure
            results[cls] = f"{type(error).__name__}: {str(error)[:200]}"
            continue
        missing, extra = (expected & kept) - chosen, chosen - expected
        results[cls] = "pass" if chosen and not missing and not extra else \
            f"{len(missing)} of the full model's layers left out ({sorted(missing)[:2]}), {len(extra)} others " \
            f"adapted ({sorted(extra)[:2]})"
    return results


@torch.no_grad()
def _state_dict_round_trip(built: Built, method: str, model: nn.Module, unmerged: torch.Tensor) -> float:
    """The merged model's ``state_dict`` loaded (strict) into the model built anew from another initialisation and
    injected: the same output, merged, and bit for bit the unmerged one after ``unmerge``."""
    pv.merge(model)
    state = model.state_dict()
    pv.unmerge(model)
    torch.manual_seed(1)
    other = built._create()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pv.inject(other, METHODS[method]())
    other.load_state_dict(state)
    error = rel(output(other(built.x)), unmerged)
    if not error <= MERGE_TOLERANCE:
        raise CheckFailed(f"state_dict round trip: the reloaded merged model differs by {error:.1e}")
    if not torch.equal(output(pv.unmerge(other)(built.x)), unmerged):
        raise CheckFailed("state_dict round trip: unmerged after reloading, the output is not the same bit for bit")
    return error


def run_family(family: str, methods=tuple(METHODS)) -> FamilyResult:
    """:func:`run` on the family's entry."""
    return run(entry_for(family), methods)


def run(entry: Entry, methods=tuple(METHODS)) -> FamilyResult:
    """Build the entry's model and run :func:`check` for each method; failures are recorded, not raised."""
    start = time.perf_counter()
    result = FamilyResult(entry)
    try:
        built = Built(result.entry)
    except Exception as error:  # noqa: BLE001 - a model that cannot run on CPU is reported, not fatal to the sweep
        result.error = f"{type(error).__name__}: {error}"
        result.seconds = time.perf_counter() - start
        return result
    height, width = built.x.shape[-2:]
    result.input_side = f"{height}" if height == width else f"{height}x{width}"
    targets = pv.PSOFTConfig().targets
    try:
        model = built.fresh()
        layers = pv.targets.select(model, targets)
        result.layers = len(layers)
        result.layer_types = Counter(type(model.get_submodule(n)).__name__ for n in layers)
    except pv.PSOFTVisionError:
        pass  # inject raises it again in check, which records it as the reason the family is left out
    for method in methods:
        t = time.perf_counter()
        try:
            outcome = check(built, method)
        except CheckFailed as failure:
            outcome = MethodResult("fail", str(failure))
        except Exception as error:  # noqa: BLE001 - recorded as this family's error
            outcome = MethodResult("error", f"{type(error).__name__}: {error}")
        outcome.seconds = time.perf_counter() - t
        result.methods[method] = outcome
    result.features = check_features(result.entry)
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------------ report
START, END = "<!-- timm-zoo:start -->", "<!-- timm-zoo:end -->"
INTRO = """# Models

Which models psoft_vision adapts with `targets="auto"`, and what was checked on each. The tables below are
written by programs; do not edit them by hand.
"""


def _status(result: FamilyResult, method: str) -> str:
    if result.error:
        return "model error"
    outcome = result.methods[method]
    return "pass" if outcome.status == "pass" else f"**{outcome.status}**"


def _fx_status(result: FamilyResult) -> str:
    states = [r.fx for r in result.methods.values() if r.fx]
    if not states:
        return ""
    if all(s == "pass" for s in states):
        return "pass"
    return "n/a" if all(s.startswith("n/a") for s in states) else "**fail**"


def _features_status(result: FamilyResult) -> str:
    built = [s for s in result.features.values() if not s.startswith("n/a")]
    if not built:
        return "n/a" if result.features else ""
    passed = sum(s == "pass" for s in built)
    return f"{passed} of {len(built)}" if passed == len(built) else f"**{passed} of {len(built)}**"


def _largest(results: list[FamilyResult], check: str) -> str:
    """The largest difference a check measured over every family and method, and where."""
    measured = [(outcome.numbers[check], f"{result.entry.family}, {NAMES[method]}") for result in results
                for method, outcome in result.methods.items() if check in outcome.numbers]
    if not measured:
        return ""
    value, where = max(measured)
    return f"Largest {check} difference measured: {value:.1e} ({where})."


def markdown(results: list[FamilyResult], seconds: float, command: str) -> str:
    """The timm section of docs/models.md."""
    passed = {m: sum(r.methods.get(m) is not None and r.methods[m].status == "pass" for r in results)
              for m in METHODS}
    both = sum(r.passed() for r in results)
    n = len(results)
    date = datetime.date.today().isoformat()
    lines = [
        f"Every timm model family (a module of `timm.list_modules()`, where timm writes one architecture: {n} in "
        f"timm {timm.__version__}), checked on "
        "its smallest model (or a smaller build of it, with the keyword arguments shown), with `pretrained=False`, "
        "exactly-zero parameters given small random values, batch 2, fixed seeds. For PSOFT (`PSOFTConfig()`, rank "
        "46) and OFTv2 (`OFTConfig()`, block size 32), each with `targets=\"auto\"`: identity at init "
        f"(<= {IDENTITY_TOLERANCE:.0e} relative), a non-zero finite gradient in every adapter parameter, merged "
        f"equal to unmerged with randomised adapters (<= {MERGE_TOLERANCE:.0e}, on an fp64 copy: see below), "
        "unmerge bit-exact (outputs and weights), the merged `state_dict` loaded strictly into the model built "
        f"anew, save -> fresh model -> load reproducing the output (<= {LOAD_TOLERANCE:.0e}).",
        "",
        "Two more columns. fx: the adapted model (randomised adapters, both methods) traced by torch.fx as timm's fx "
        "feature extraction traces it (`timm.models.create_feature_extractor`, traced without gradients) gives the "
        f"eager output and every adapter gradient to {FX_TOLERANCE:.0e}; n/a where timm cannot trace the plain "
        "model. The fx and merge checks compare two computations of one function and run on an fp64 copy of the "
        "model: in fp32 these random-weight models' own rounding reaches the tolerances (visformer_tiny's plain "
        "output moves by 4e-5 from fp32 to fp64), so they would judge a model's conditioning, not the adapters. "
        "features_only: of timm's feature wrappers the family builds "
        f"({', '.join(f'`{c}`' for c in FEATURE_CLASSES)}), those on which `targets=\"auto\"` picks exactly the "
        "full model's layers among the ones the wrapper keeps (never the stem); n/a where it builds none.",
        "",
        f"{_largest(results, 'merge')} {_largest(results, 'fx')} In fp32, where it is not checked: "
        f"{_largest(results, 'merge fp32')}",
        "",
        f"PSOFT passes on {passed['psoft']} of {n} families, OFTv2 on {passed['oft']}, both on {both} "
        f"({100 * both / max(n, 1):.0f}%). Run on {date} in {seconds / 60:.1f} minutes (CPU, "
        f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}, torch {torch.__version__}); "
        f"regenerate with `{command}`. The last column is each family's time: build, both methods, every check.",
        "",
        "| family | model | input px | adapted layers | layer types | PSOFT trainable | OFTv2 trainable | PSOFT "
        "| OFTv2 | fx | features_only | seconds |",
        "|---|---|--:|--:|---|--:|--:|---|---|---|---|--:|",
    ]
    for r in results:
        types = ", ".join(f"{t} {c}" for t, c in r.layer_types.most_common())
        trainable = [f"{r.methods[m].trainable:,}" if m in r.methods and r.methods[m].status == "pass" else ""
                     for m in METHODS]
        lines.append(f"| {r.entry.family} | `{r.entry.label()}` | {r.input_side} | {r.layers} | {types} | "
                     f"{' | '.join(trainable)} | "
                     f"{' | '.join(_status(r, m) for m in METHODS)} | {_fx_status(r)} | {_features_status(r)} | "
                     f"{r.seconds:.1f} |")
    notes = [(r.entry.family, r.entry.why) for r in results if r.entry.why]
    if notes:
        lines += ["", "Built smaller or otherwise than their smallest model:", ""]
        lines += [f"- {family}: {why}." for family, why in notes]
    problems = []
    for r in results:
        if r.error:
            problems.append(f"- {r.entry.family}: the model itself does not run: {r.error.splitlines()[0][:300]}")
        problems += [f"- {r.entry.family}, {NAMES[m]}: {o.status}: {o.detail.splitlines()[0][:300]}"
                     for m, o in r.methods.items() if o.status != "pass"]
        problems += [f"- {r.entry.family}, {failure.splitlines()[0][:300]}" for failure in r.contract_failures()]
    if problems:
        lines += ["", "Not passing, and why:", "", *problems]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Put ``body`` between the timm markers of ``path``, keeping everything else (other tables) as it is; a file
    without them gets a timm section at its end."""
    text = path.read_text() if path.exists() else INTRO
    section = f"{START}\n{body}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## timm\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", help="only these families (default: every one)")
    parser.add_argument("--out", type=Path, help="write the table into this markdown file (docs/models.md)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these small models gain little from more, and on "
                             "a busy machine a second thread can make them several times slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.families or families()
    unknown = sorted(set(names) - set(families()))
    if unknown:
        parser.error(f"not timm families: {unknown}")
    if args.out and args.families:
        parser.error("--out writes the table of every family: leave out --families")
    start, results = time.perf_counter(), []
    for family in names:
        result = run_family(family)
        results.append(result)
        status = "  ".join(f"{m} {r.status} {r.seconds:5.1f}s" for m, r in result.methods.items()) or result.error
        print(f"{family:28s} {result.entry.label()[:44]:44s} {result.layers:4d} layers  {status}  fx "
              f"{_fx_status(result)}  features_only {_features_status(result)}", flush=True)
        for m, r in result.methods.items():
            if r.status != "pass":
                print(f"    {m}: {r.detail[:400]}", flush=True)
        for failure in result.contract_failures():
            print(f"    {failure[:400]}", flush=True)
    seconds = time.perf_counter() - start
    if args.out:
        write_section(args.out, markdown(results, seconds, "make zoo"))
    both = sum(r.passed() for r in results)
    contract = sum(not r.contract_failures() for r in results)
    print(f"{both} of {len(results)} families pass with both methods, {contract} the fx and features_only checks, "
          f"in {seconds / 60:.1f} minutes")
    return 0 if both == contract == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
