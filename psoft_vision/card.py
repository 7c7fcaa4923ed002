"""Model cards: the README.md of a folder that holds adapters (a trainer's output folder, or a file saved with
``save_adapter(..., model_card=True)``), as the Hugging Face hub reads it.

The YAML front matter gives the hub its facts (``base_model``, ``library_name``, ``tags``, ``pipeline_tag``, the
instance prompt, sample images as the widget); the body says what was trained, the run's metrics, and how each file
loads. Every path the card names is relative to the folder, so the folder uploaded as it is is the repository. The
YAML is written by hand (JSON strings are YAML strings): cards need no dependency beyond the package's own.
"""

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .files import atomic_write
from .formats.names import ANCHOR_INFIX, TRAIN_MODULES_PREFIX, adapter_key
from .formats.native import read_adapter

CARD_NAME = "README.md"
#: What each kind of file is, in the card's file table.
KINDS = {
    "adapter": "psoft_vision adapter",
    "lora": "diffusers LoRA (every trained model, one file)",
    "kohya": "kohya-format LoRA (ComfyUI, AUTOMATIC1111)",
    "peft": "PEFT adapter folder",
    "trainable": "the trained tensors (full fine-tuning or linear probing)",
}
TASKS = {"text-to-image": "dreambooth", "image-classification": "vtab"}


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter file holds, from its metadata and tensors."""

    method: str
    title: str  # "PSOFT, rank 16": the method and its size setting
    adapter_parameters: int
    module_shapes: dict[str, tuple[int, ...]]  # "head.weight": (8, 128), of the train_modules saved with it
    layer_kinds: Counter  # "attn1.to_q": 4, the kinds of layer adapted

    @classmethod
    def read(cls, path: str | os.PathLike) -> "AdapterSummary":
        from .registry import get_method

        header, tensors = read_adapter(path)
        bases = {adapter_key(layer, basis) for layer in header["layers"] for basis in ("A", "B")} \
            if header["include_bases"] else set()
        module_shapes = {key.removeprefix(TRAIN_MODULES_PREFIX): tuple(tensor.shape)
                         for key, tensor in tensors.items() if key.startswith(TRAIN_MODULES_PREFIX)}
        adapter_parameters = sum(tensor.numel() for key, tensor in tensors.items()
                                 if not key.startswith(TRAIN_MODULES_PREFIX) and ANCHOR_INFIX not in key
                                 and key not in bases)
        # "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" -> "attn1.to_q": the kind of layer
        kinds = Counter(re.split(r"\.\d+\.", layer)[-1] for layer in header["layers"])
        return cls(header["method"], get_method(header["method"]).describe_config(header["config"]),
                   adapter_parameters, module_shapes, kinds)

    @property
    def module_parameters(self) -> Counter:
        """Numbers trained in full per ``train_modules`` module (a new classifier head, say)."""
        counts = Counter()
        for key, shape in self.module_shapes.items():
            counts[key.rsplit(".", 1)[0]] += math.prod(shape)
        return counts

    def targets(self) -> str:
        kinds = ", ".join(f"`{kind}` x{n}" for kind, n in sorted(self.layer_kinds.items()))
        count = sum(self.layer_kinds.values())
        return f"{count} layer{'s' if count != 1 else ''}: {kinds}"


def _yaml(metadata: dict) -> str:
    """Block YAML of strings, numbers, lists and mappings (JSON scalars are YAML scalars)."""
    def lines(value, indent: str) -> list[str]:
        out = []
        items = value.items() if isinstance(value, dict) else [(None, v) for v in value]
        for key, item in items:
            lead = f"{indent}{key}:" if key is not None else f"{indent}-"
            if isinstance(item, dict | list):
                nested = lines(item, indent + "  ")
                if key is None and isinstance(item, dict):  # "- key: value" for a mapping in a list
                    out.append(f"{indent}- {nested[0].strip()}")
                    out += nested[1:]
                else:
                    out += [lead, *nested]
            else:
                out.append(f"{lead} {json.dumps(item)}")
        return out
    return "\n".join(lines(metadata, ""))


def _load_code(kind: str, file: str, library: str | None, repo: str, base: str, num_classes: int | None) -> str:
    """How to load one file, as a Python block (or words for ComfyUI)."""
    folder, _, name = file.rpartition("/")
    where = f'"{repo}", weight_name="{file}"'
    if kind == "adapter" and library == "diffusers":
        role = name.removesuffix(".safetensors").removeprefix("adapter").lstrip("_")  # a text encoder's file
        load = f"pv.load_adapter(pipe.{role}, {where})" if role else f"pv.load_adapter_into_pipeline(pipe, {where})"
        return ("```python\nfrom diffusers import DiffusionPipeline\n\nimport psoft_vision as pv\n\n"
                f'pipe = DiffusionPipeline.from_pretrained("{base}")\n{load}\n```')
    if kind == "adapter":
        create = (f'model = timm.create_model("{base}", pretrained=True, num_classes={num_classes})\n'
                  if library == "timm" else "model = ...  # the base model it was trained on\n")
        return (f"```python\n{'import timm' + chr(10) * 2 if library == 'timm' else ''}import psoft_vision as pv\n\n"
                f"{create}pv.load_adapter(model, {where})\n```")
    if kind == "lora":
        subfolder = f'subfolder="{folder}", ' if folder else ""
        return ("```python\nfrom diffusers import DiffusionPipeline\n\n"
                f'pipe = DiffusionPipeline.from_pretrained("{base}")\n'
                f'pipe.load_lora_weights("{repo}", {subfolder}weight_name="{name}")\n```')
    if kind == "kohya":
        return (f"Download `{file}` into ComfyUI's `models/loras` folder and pick it in a *Load LoRA* node between "
                "the checkpoint loader and the sampler (AUTOMATIC1111: `models/Lora`, then `<lora:kohya:1>` in the "
                "prompt).")
    if kind == "peft":
        return (f'```python\nfrom peft import PeftModel\n\nmodel = PeftModel.from_pretrained(model, "{repo}", '
                f'subfolder="{file}")\n```')
    return ("```python\nfrom huggingface_hub import hf_hub_download\nfrom safetensors.torch import load_file\n\n"
            f'model.load_state_dict(load_file(hf_hub_download("{repo}", "{file}")), strict=False)\n```')


def model_card(files: dict[str, str], *, library: str | None = None, task: str | None = None,
               base_model: str | None = None, base_name: str | None = None, repo_id: str | None = None,
               folder: str | os.PathLike = ".", trained: str | None = None, trainable: int | None = None,
               metrics: dict | None = None, instance_prompt: str | None = None, samples: list[tuple[str, str]] = (),
               num_classes: int | None = None) -> str:
    """The text of a model card for the files of ``folder`` (``{path in the folder: kind}``, kinds of
    :data:`KINDS`). ``base_model``: the hub id of the base (the front matter's); ``base_name``: how the snippets
    load the base, when that differs (a timm name with its tag); ``repo_id``: the repository the folder goes to (else
    the snippets load from the folder); ``trained``: the method in words where no psoft_vision adapter file tells
    it; ``samples``: ``(prompt, image path)`` pairs, the widget; ``metrics``: ``{label: value}`` of the run."""
    from .hub import is_hub_id

    folder = Path(folder)
    summaries = {file: AdapterSummary.read(folder / file) for file, kind in files.items() if kind == "adapter"}
    methods = sorted({s.method for s in summaries.values()})
    tags = ["psoft-vision", *methods, *(["lora"] if {"lora", "kohya"} & set(files.values()) else []),
            *([TASKS[task], task] if task in TASKS else []), *([library] if library else [])]
    metadata = {"base_model": base_model if base_model and is_hub_id(base_model) else None,
                "library_name": library, "pipeline_tag": task, "tags": tags, "instance_prompt": instance_prompt,
                "widget": [{"text": prompt, "output": {"url": image}} for prompt, image in samples] or None}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    base = base_name or base_model or "the base model"
    title = (summaries[next(iter(summaries))].title if summaries else trained) or "Adapter"
    repo = repo_id or str(folder)
    parts = [f"---\n{_yaml(metadata)}\n---", f"# {title} on {base}",
             f"Fine-tuned from `{base}`{' for ' + task if task else ''} with psoft-vision (`pip install "
             "psoft-vision`)."]
    parts += _trained_section(summaries, trained, trainable, instance_prompt)
    if metrics:
        parts.append("## Metrics\n\n| metric | value |\n|---|---|\n" + "\n".join(
            f"| {label} | {value:.4g} |" if isinstance(value, float) else f"| {label} | {value} |"
            for label, value in metrics.items()))
    parts.append("## Files\n\n| file | what it is |\n|---|---|\n" + "\n".join(
        f"| `{file}` | {KINDS[kind]} |" for file, kind in files.items()))
    parts.append("## How to load")
    for file, kind in files.items():
        parts.append(f"### `{file}`\n\n{_load_code(kind, file, library, repo, base, num_classes)}")
    if samples:
        parts.append("## Samples\n\n" + "\n\n".join(f"`{prompt}`\n\n![{prompt}]({image})" for prompt, image in samples))
    return "\n\n".join(parts) + "\n"


def _trained_section(summaries: dict, trained: str | None, trainable: int | None, prompt: str | None) -> list[str]:
    rows = [f"| `{file}` | {s.title} | {s.targets()} | {s.adapter_parameters:,}"
            + "".join(f" + {n:,} in `{m}`" for m, n in s.module_parameters.items()) + " |"
            for file, s in summaries.items()]
    text = "## What was trained\n\n"
    if rows:
        text += "| file | method | targets | trainable parameters |\n|---|---|---|---|\n" + "\n".join(rows)
    else:
        text += f"{trained}" + (f", {trainable:,} trainable parameters." if trainable is not None else ".")
    if prompt:
        text += f"\n\nInstance prompt: `{prompt}`."
    return [text]


def write_model_card(folder: str | os.PathLike, files: dict[str, str], **card) -> Path:
    """Write :func:`model_card` to ``folder/README.md`` (atomically); returns its path."""
    path = Path(folder) / CARD_NAME
    text = model_card(files, folder=folder, **card)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def describe_base(model: nn.Module) -> tuple[str | None, str | None]:
    """``(library, base model name)`` of a model: timm's hub id (or architecture), or the hub id a diffusers model
    was loaded from (not a local folder, which means nothing elsewhere)."""
    from .hub import is_hub_id
    from .targets.structure import is_diffusers_model

    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        name = cfg.get("hf_hub_id") or cfg.get("architecture")
        return "timm", name.split("@")[0] if name else None
    if is_diffusers_model(model):
        name = model.config.get("_name_or_path")
        return "diffusers", name if name and is_hub_id(name) else None
    return None, None


def write_adapter_card(model: nn.Module, path: str | os.PathLike, repo_id: str | None = None,
                       base_model: str | None = None) -> Path:
    """The model card of one adapter file (:func:`psoft_vision.save_adapter` with ``model_card=True``), beside
    it."""
    path = Path(path)
    library, found = describe_base(model)
    head = next((shape[0] for key, shape in AdapterSummary.read(path).module_shapes.items()
                 if key == f"{getattr(model, 'pretrained_cfg', {}).get('classifier')}.weight"), None)
    return write_model_card(path.parent, {path.name: "adapter"}, library=library, base_model=base_model or found,
                            repo_id=repo_id, num_classes=head or getattr(model, "num_classes", None))
