"""A page that shows what an adapter does: the base model and the adapted one side by side.

    python -m apps.gradio_app                      # the embedded assets; works offline on a fresh machine
    python -m apps.gradio_app --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter someone/sks-dog \\
        --classifier-model vit_base_patch16_224.augreg_in21k --classifier-adapter ./cifar100.safetensors

Models and adapters are local paths or hub ids (downloaded into huggingface_hub's cache; HF_HUB_OFFLINE=1 reads
the cache alone).

"Generate" samples one seed twice, with the adapter off and on at the chosen strength (``set_strength``), and exports
the adapter as a LoRA file that diffusers' ``load_lora_weights`` reads. "Classify" shows the top-5 of the pretrained
classifier and of the adapted one. Each tab has an adapter panel (method, rank, parameters, targets, file size) and
takes another adapter file; a file that does not load is reported in the panel and the previous adapter stays.

The server listens on 127.0.0.1 unless ``--host`` says otherwise and is never shared through Gradio's tunnel.
"""

import os

# Read by gradio when it is imported: set first, and only where the user has not.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import copy
import functools
import math
import tempfile
import threading
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

import psoft_vision as pv
from psoft_vision.card import AdapterSummary
from psoft_vision.formats.native import load_adapter_into_pipeline
from psoft_vision.hub import adapter_file, hub_errors, timm_hub_id
from psoft_vision.model import denoiser

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_PIPELINE = ASSETS / "tiny-t2i"
DEFAULT_ADAPTER = ASSETS / "dreambooth-psoft.safetensors"
DEFAULT_PROMPT = "a photo of sks bag"
DEFAULT_CLASSIFIER = "vit_pico_patch8_32.fmnist"
DEFAULT_CLASSIFIER_ADAPTER = ASSETS / "vtab-photo-crops-psoft.safetensors"
DEFAULT_CLASSIFIER_TASK = "photo-crops"  # the VTAB-offline task the shipped classifier adapter was trained on
DISPLAY_SIZE = 256  # smaller samples are enlarged (nearest neighbour) so that their pixels can be seen
TOP_K = 5


class AppInputError(ValueError):
    """A request holds a value the app cannot use; the message names it and the accepted range."""


# --------------------------------------------------------------------------------------------- adapter panel
@dataclass(frozen=True)
class AdapterCard:
    """What the adapter panel shows about one adapter file."""

    path: Path
    summary: AdapterSummary  # method, size, parameters and targets, as the model cards give them
    file_bytes: int

    @classmethod
    def read(cls, path: str | os.PathLike) -> "AdapterCard":
        return cls(Path(path), AdapterSummary.read(path), Path(path).stat().st_size)

    def markdown(self) -> str:
        modules = "".join(f" + {n:,} in `{name}`" for name, n in self.summary.module_parameters.items())
        return "\n".join([
            f"| adapter file | `{self.path.name}` |", "|---|---|",
            f"| method | {self.summary.title} |",
            f"| trainable parameters | {self.summary.adapter_parameters:,}{modules} |",
            f"| targets | {self.summary.targets()} |",
            f"| file size | {_file_size(self.file_bytes)} |",
        ])


def _file_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


class AdapterSlot:
    """The adapter in use and the model that carries it. A new file is attached beside the current adapter (or on a
    new model), so a file that fails to load leaves the current one in place. ``lock`` serialises every use of the
    model, since an adapter's strength is shared state."""

    def __init__(self, model: torch.nn.Module | None):
        self.model = model
        self.card: AdapterCard | None = None
        self.name: str | None = None
        self.lock = threading.Lock()
        self._loads = 0

    def load(self, path, attach) -> str:
        """``attach(name, card)`` loads the file under ``name`` and returns the model it is on; returns the panel's
        markdown, or the reason the file did not load."""
        if not path:
            return self.markdown()
        try:
            card = AdapterCard.read(path)
            self._loads += 1
            name = f"adapter{self._loads}"
            with self.lock:
                model = attach(name, card)
                if self.name is not None and model is self.model:
                    pv.remove(model, self.name)
                self.model, self.card, self.name = model, card, name
        except Exception as error:  # noqa: BLE001 - whatever is wrong with the file, the app keeps running
            kept = f"Still using `{self.card.path.name}`:\n\n{self.card.markdown()}" if self.card \
                else "No adapter is loaded."
            return f"**Could not load `{Path(path).name}`**: {type(error).__name__}: {error}\n\n{kept}"
        return self.markdown()

    def markdown(self) -> str:
        return self.card.markdown() if self.card else "No adapter is loaded: the adapted output stays empty."


# ------------------------------------------------------------------------------------------------- generation
def _check_number(label: str, value, low: float, high: float, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high or (integer and value != int(value)):
        kind = "an integer" if integer else "a number"
        raise AppInputError(f"{label}={value!r} must be {kind} in [{low:g}, {high:g}].")
    return int(value) if integer else float(value)


def _for_display(image: Image.Image) -> Image.Image:
    factor = DISPLAY_SIZE // max(image.size)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


class Generation:
    """A diffusers pipeline and the adapter on its denoiser."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.adapter = AdapterSlot(denoiser(pipe)[0])
        self.export_dir = Path(tempfile.mkdtemp(prefix="psoft-vision-app-"))

    @classmethod
    def from_pretrained(cls, pipeline: str | os.PathLike, device: str, dtype: torch.dtype,
                        **hub_kwargs) -> "Generation":
        """A pipeline folder or hub id; ``hub_kwargs``: diffusers' ``revision``, ``variant``, ``cache_dir``."""
        import diffusers

        with hub_errors(str(pipeline), hub_kwargs.get("revision"), cache_dir=hub_kwargs.get("cache_dir")):
            pipe = diffusers.DiffusionPipeline.from_pretrained(pipeline, dtype=dtype, **hub_kwargs).to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe)

    def load_adapter(self, path) -> str:
        def attach(name, card):
            load_adapter_into_pipeline(self.pipe, path, name=name)
            return self.adapter.model

        return self.adapter.load(path, attach)

    def generate(self, prompt: str, seed, steps, guidance, strength, on_step=None):
        """Base and adapted samples of one seed (the adapted one is None without an adapter), enlarged for display.
        ``on_step(done, total)`` follows the denoising steps of both."""
        if not isinstance(prompt, str):
            raise AppInputError(f"prompt={prompt!r} must be a string.")
        seed = _check_number("seed", seed, 0, 2**32 - 1, integer=True)
        steps = _check_number("steps", steps, 1, 200, integer=True)
        guidance = _check_number("guidance", guidance, 0, 30)
        strength = _check_number("strength", strength, -2, 3)
        runs = 2 if self.adapter.name else 1
        with self.adapter.lock:
            base = self._sample(prompt, seed, steps, guidance, pv.disabled(self.adapter.model), on_step, 0, runs)
            if runs == 1:
                return base, None
            pv.set_strength(self.adapter.model, strength, self.adapter.name)
            return base, self._sample(prompt, seed, steps, guidance, nullcontext(), on_step, steps, runs)

    def _sample(self, prompt, seed, steps, guidance, context, on_step, offset, runs) -> Image.Image:
        def step_end(pipe, step, timestep, tensors):
            if on_step:
                on_step(offset + step + 1, runs * steps)
            return tensors

        generator = torch.Generator(self.pipe.device).manual_seed(seed)
        with context, torch.inference_mode():
            image = self.pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                              callback_on_step_end=step_end).images[0]
        return _for_display(image)

    def export_lora(self, strength) -> Path:
        """The adapter at ``strength`` as a diffusers LoRA file (OFTv2 as exact full-rank deltas)."""
        if self.adapter.name is None:
            raise AppInputError("there is no adapter to export; load a psoft_vision adapter file first.")
        strength = _check_number("strength", strength, -2, 3)
        card = self.adapter.card
        path = self.export_dir / f"{card.path.stem}-lora-strength{strength:g}.safetensors"
        with self.adapter.lock:
            pv.set_strength(self.adapter.model, strength, self.adapter.name)
            return pv.export_lora(self.adapter.model, path, format="diffusers", name=self.adapter.name,
                                  full_deltas=not pv.get_method(card.summary.method).low_rank)


# --------------------------------------------------------------------------------------------- classification
def _label_names(model, count: int) -> list[str]:
    """Class names from the model's pretrained_cfg or timm's ImageNet tables, else "class i"; a name that repeats
    (ImageNet has two "crane") gets its index, so that every class keeps its own line in the top-5."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    names = model.pretrained_cfg.get("label_names")
    subset = infer_imagenet_subset(model)
    if not (names and len(names) == count) and subset:
        info = ImageNetInfo(subset)
        names = [info.index_to_description(i) for i in range(count)] if info.num_classes() == count else None
    if not (names and len(names) == count):
        return [f"class {i}" for i in range(count)]
    repeated = {name for name, n in Counter(names).items() if n > 1}
    return [f"{name} ({i})" if name in repeated else name for i, name in enumerate(names)]


class Classification:
    """A timm classifier with its pretrained head (the base) and an adapted copy with the adapter's own head."""

    def __init__(self, model: torch.nn.Module, class_names: list[str] | None = None):
        from timm.data import create_transform, resolve_data_config

        self.base = model.eval()
        self.base_labels = _label_names(model, model.num_classes)
        self.transform = create_transform(**resolve_data_config({}, model=model))
        self.adapter = AdapterSlot(None)
        self.class_names = class_names  # of the adapted classes, used when their count fits the adapted head
        self.labels: list[str] = []

    @classmethod
    def from_pretrained(cls, name: str, device: str, class_names: list[str] | None = None,
                        cache_dir: str | None = None) -> "Classification":
        """A timm model name with tag, or ``hf-hub:org/name``, with its pretrained weights (through the hub's cache)."""
        import timm

        if name == DEFAULT_CLASSIFIER:
            import train.offline.backbone  # noqa: F401 - registers the project's offline backbone with timm
        with hub_errors(timm_hub_id(name) or name, cache_dir=cache_dir):
            model = timm.create_model(name, pretrained=True, cache_dir=cache_dir)
        return cls(model.to(device), class_names)

    def load_adapter(self, path) -> str:
        """The adapter goes on a fresh copy of the base, with a new head when the file carries one of another size."""
        previous = self.adapter.model

        def attach(name, card):
            model = copy.deepcopy(self.base)
            head = model.pretrained_cfg.get("classifier")
            head_shape = card.summary.module_shapes.get(f"{head}.weight") if isinstance(head, str) else None
            if head_shape is not None and head_shape[0] != model.num_classes:
                model.reset_classifier(head_shape[0])
            pv.load_adapter(model, path, name=name)
            return model.eval()

        message = self.adapter.load(path, attach)
        if self.adapter.model is not previous:
            count = self.adapter.model.num_classes
            if self.class_names and len(self.class_names) == count:
                self.labels = list(self.class_names)
            else:
                self.labels = _label_names(self.adapter.model, count)
                if self.class_names:
                    message += (f"\n\n{len(self.class_names)} class names were given, but this head has {count} "
                                f"classes: they are shown as {', '.join(map(repr, self.labels[:2]))}, ...")
        return message

    def classify(self, image) -> tuple[dict[str, float], dict[str, float] | None]:
        """Top-5 probabilities ``{label: p}`` of the base and of the adapted classifier (None without an adapter)."""
        if image is None:
            raise AppInputError("no image: upload one or pick an example.")
        image = Image.fromarray(image) if not isinstance(image, Image.Image) else image
        x = self.transform(image.convert("RGB")).unsqueeze(0).to(next(self.base.parameters()).device)
        with self.adapter.lock, torch.inference_mode():
            base = _top(self.base(x), self.base_labels)
            adapted = _top(self.adapter.model(x), self.labels) if self.adapter.name else None
        return base, adapted


def _top(logits: torch.Tensor, labels: list[str]) -> dict[str, float]:
    p, index = logits.float().softmax(-1)[0].topk(min(TOP_K, logits.shape[-1]))
    return {labels[i]: round(v, 4) for v, i in zip(p.tolist(), index.tolist(), strict=True)}


# ---------------------------------------------------------------------------------------------------- the page
# System fonts: the default theme would ask Google Fonts for its typeface, which an offline machine cannot reach.
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# Small inputs (the shipped classifier's are 32x32) fill their box, with sharp pixels.
CSS = "#classify-image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"


def _user_errors(handler):
    """A bad request shows its message in the page instead of a bare "Error"."""
    @functools.wraps(handler)
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except (AppInputError, pv.PSOFTVisionError) as error:
            raise gr.Error(str(error)) from error
    return wrapped


def example_images(directory: Path) -> list[Path]:
    """One test image per class of the shipped classifier adapter's task, as PNG files."""
    from train.offline.data import TASKS, task_split

    images, labels = task_split(DEFAULT_CLASSIFIER_TASK, "test")
    paths = []
    for label, name in enumerate(TASKS[DEFAULT_CLASSIFIER_TASK].classes):
        path = directory / f"{name}.png"
        Image.fromarray(images[labels.tolist().index(label)]).save(path)
        paths.append(path)
    return paths


def build_app(generation: Generation | None, classification: Classification | None,
              examples: list[Path] = (), default_prompt: str = DEFAULT_PROMPT) -> gr.Blocks:
    with gr.Blocks(title="psoft-vision: base vs adapted") as app:
        gr.Markdown("# psoft-vision: what does the adapter do?\nThe same input through the pretrained model "
                    "(adapter off) and the adapted one.")
        with gr.Tabs():
            if generation:
                with gr.Tab("Generate"):
                    _generate_tab(generation, default_prompt)
            if classification:
                with gr.Tab("Classify"):
                    _classify_tab(classification, examples)
    return app


def _adapter_panel(slot: AdapterSlot, load, label: str):
    with gr.Accordion("Adapter", open=True):
        card = gr.Markdown(slot.markdown(), elem_id=f"{label}-adapter-card")
        upload = gr.File(label="Load another psoft_vision adapter (.safetensors)", file_types=[".safetensors"],
                         elem_id=f"{label}-adapter-upload")
    upload.upload(load, upload, card, api_name=f"load_{label}_adapter")


def _generate_tab(generation: Generation, default_prompt: str):
    def generate(prompt, seed, steps, guidance, strength, progress=gr.Progress()):  # noqa: B008 - gradio's way to ask for a progress bar
        def on_step(done, total):
            progress(done / total, desc=f"step {done}/{total}")
        return generation.generate(prompt, seed, steps, guidance, strength, on_step)

    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(default_prompt, label="Prompt", elem_id="prompt")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                steps = gr.Slider(1, 100, 25, step=1, label="Steps")
            guidance = gr.Slider(0, 15, 3, step=0.5, label="Guidance")
            strength = gr.Slider(0, 2, 1, step=0.05, label="Adapter strength (0 = base model, 1 = as trained)")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            with gr.Row():
                base = gr.Image(label="Base model", type="pil", format="png", interactive=False,
                                buttons=["download", "fullscreen"], elem_id="base-image")
                adapted = gr.Image(label="Adapted", type="pil", format="png", interactive=False,
                                   buttons=["download", "fullscreen"], elem_id="adapted-image")
            export = gr.Button("Export LoRA at this strength", elem_id="export")
            lora = gr.File(label="LoRA file for diffusers' load_lora_weights", interactive=False, height=90,
                           elem_id="lora-file")
    _adapter_panel(generation.adapter, generation.load_adapter, "generation")
    inputs = [prompt, seed, steps, guidance, strength]
    button.click(_user_errors(generate), inputs, [base, adapted], api_name="generate")
    prompt.submit(_user_errors(generate), inputs, [base, adapted], api_name=False)
    export.click(_user_errors(lambda t: str(generation.export_lora(t))), strength, lora, api_name="export_lora")


def _classify_tab(classification: Classification, examples: list[Path]):
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image", type="pil", sources=["upload", "clipboard"], height=256,
                             elem_id="classify-image")
            if examples:
                gr.Examples([[str(p)] for p in examples], image, label="Examples (VTAB-offline photo-crops test)")
            button = gr.Button("Classify", variant="primary", elem_id="classify")
        base = gr.Label(num_top_classes=TOP_K, label="Base classifier (pretrained head)", elem_id="base-top5")
        adapted = gr.Label(num_top_classes=TOP_K, label="Adapted classifier", elem_id="adapted-top5")
    _adapter_panel(classification.adapter, classification.load_adapter, "classifier")
    button.click(_user_errors(classification.classify), image, [base, adapted], api_name="classify")


# ------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apps.gradio_app", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="With no model arguments the page uses the embedded assets: assets/tiny-t2i with "
               "assets/dreambooth-psoft.safetensors, and vit_pico_patch8_32.fmnist with "
               "assets/vtab-photo-crops-psoft.safetensors. Hub ids download into huggingface_hub's cache; with "
               "HF_HUB_OFFLINE=1 they load from the cache alone.")
    parser.add_argument("--pipeline", help="diffusers pipeline folder or hub id (default: the embedded tiny-t2i)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of --pipeline")
    parser.add_argument("--variant", help="weights variant of --pipeline, e.g. fp16")
    parser.add_argument("--adapter", help="psoft_vision adapter for the pipeline's denoiser: a file, or a folder or "
                        "hub id holding --adapter-weight-name (default: the embedded DreamBooth adapter when "
                        "--pipeline is not given)")
    parser.add_argument("--adapter-weight-name", help="the adapter file in the --adapter folder or repository "
                        "(default adapter.safetensors, what the trainers write)")
    parser.add_argument("--adapter-revision", help="hub revision of --adapter")
    parser.add_argument("--cache-dir", help="the hub cache (default: huggingface_hub's, HF_HUB_CACHE or HF_HOME)")
    parser.add_argument("--classifier-model", help="timm model name with tag (default: the embedded "
                        f"{DEFAULT_CLASSIFIER})")
    parser.add_argument("--classifier-adapter", help="psoft_vision adapter for the classifier, with its head: a file, "
                        "or a folder or hub id holding adapter.safetensors (default: the embedded photo-crops adapter "
                        "when --classifier-model is not given)")
    parser.add_argument("--classifier-labels", type=Path, help="text file with the adapted classifier's class "
                        "names, one per line in label order (default: the model's own names, else 'class i')")
    parser.add_argument("--no-generate", action="store_true", help="leave out the Generate tab")
    parser.add_argument("--no-classify", action="store_true", help="leave out the Classify tab")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt the page opens with")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="dtype of the pipeline")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network")
    parser.add_argument("--port", type=int, default=7860)
    return parser


def _read_labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise SystemExit(f"--classifier-labels {str(path)!r} has no class names; write one per line.")
    return names


def _adapter_file(flag: str, adapter, weight_name: str | None = None, revision: str | None = None,
                  cache_dir: str | None = None) -> Path | None:
    """The local file of an adapter given as a file, a folder or a hub id (fetched into the hub's cache)."""
    if adapter is None:
        return None
    try:
        return adapter_file(adapter, weight_name, revision, cache_dir)
    except pv.PSOFTVisionError as error:
        raise SystemExit(f"{flag} {str(adapter)!r} did not load ({type(error).__name__}: {error})") from error


def load_models(args) -> tuple[Generation | None, Classification | None, list[Path]]:
    generation = classification = None
    examples = []
    if not args.no_generate:
        pipeline = args.pipeline or DEFAULT_PIPELINE
        adapter = args.adapter or (DEFAULT_ADAPTER if args.pipeline is None else None)
        print(f"loading pipeline {pipeline} ...", flush=True)
        try:
            generation = Generation.from_pretrained(pipeline, args.device, getattr(torch, args.dtype),
                                                    revision=args.revision, variant=args.variant,
                                                    cache_dir=args.cache_dir)
        except (OSError, ValueError) as error:
            raise SystemExit(f"--pipeline {str(pipeline)!r} did not load ({type(error).__name__}: {error}); pass a "
                             "folder written by a diffusers pipeline's save_pretrained, or a hub id.") from error
        adapter = _adapter_file("--adapter", adapter, args.adapter_weight_name, args.adapter_revision, args.cache_dir)
        print(generation.load_adapter(adapter).split("\n\n")[0], flush=True)
    if not args.no_classify:
        name = args.classifier_model or DEFAULT_CLASSIFIER
        print(f"loading classifier {name} ...", flush=True)
        class_names = _read_labels(args.classifier_labels)
        if args.classifier_model is None:
            from train.offline.data import TASKS

            class_names = class_names or list(TASKS[DEFAULT_CLASSIFIER_TASK].classes)
            examples = example_images(Path(tempfile.mkdtemp(prefix="psoft-vision-examples-")))
        try:
            classification = Classification.from_pretrained(name, args.device, class_names, args.cache_dir)
        except (OSError, RuntimeError, ValueError) as error:
            raise SystemExit(f"--classifier-model {name!r} did not load ({type(error).__name__}: {error}); pass a "
                             "timm model name with tag, or hf-hub:org/name.") from error
        adapter = args.classifier_adapter or (DEFAULT_CLASSIFIER_ADAPTER if args.classifier_model is None else None)
        adapter = _adapter_file("--classifier-adapter", adapter, cache_dir=args.cache_dir)
        print(classification.load_adapter(adapter).split("\n\n")[0], flush=True)
    return generation, classification, examples


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.no_generate and args.no_classify:
        raise SystemExit("--no-generate and --no-classify leave nothing to show; drop one of them.")
    generation, classification, examples = load_models(args)
    app = build_app(generation, classification, examples, args.prompt)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, show_error=True,
                       theme=THEME, css=CSS)


if __name__ == "__main__":
    main()
