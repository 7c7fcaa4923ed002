"""Recognising adapter files that are not psoft_vision's, so that an error can say what a file is and what loads it."""

import json
from pathlib import Path

PEFT_CONFIG = "adapter_config.json"
_LOADERS = {
    "peft": "peft.PeftModel.from_pretrained(model, folder)",
    "diffusers": "pipe.load_lora_weights(folder, weight_name=file) (or the model's load_lora_adapter)",
    "kohya": "pipe.load_lora_weights(file) (diffusers converts kohya keys), ComfyUI or A1111/Forge",
}


def _peft_folder(folder: Path) -> str | None:
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, ValueError):
        return f"a folder with an unreadable {PEFT_CONFIG}"
    return f"a PEFT {config.get('peft_type', 'unknown')} adapter folder; load it with {_LOADERS['peft']}"


def describe_foreign(path: Path, keys: list[str] | None = None, metadata: dict | None = None) -> str:
    """What ``path`` appears to be and what loads it, in a phrase for an error message."""
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return _peft_folder(path)
        if (path / "pytorch_lora_weights.safetensors").is_file():
            return f"a folder with a diffusers LoRA; load it with {_LOADERS['diffusers']}"
        return "a folder, not an adapter file"
    keys = keys or []
    if (path.parent / PEFT_CONFIG).is_file() and any(k.startswith("base_model.model.") for k in keys):
        return "the weights of " + _peft_folder(path.parent)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        kind = "OFT" if any(".oft_" in k or "oft_blocks" in k for k in keys) else "LoRA"
        return f"a kohya-style {kind} file (ComfyUI, A1111/Forge, sd-scripts); load it with {_LOADERS['kohya']}"
    if any(".lora_A." in k or ".lora_down." in k for k in keys):
        if any(k.startswith(("unet.", "transformer.", "text_encoder", "prior.")) for k in keys):
            return f"a diffusers LoRA file; load it with {_LOADERS['diffusers']}"
        return f"a PEFT LoRA weights file; put it in its folder with its {PEFT_CONFIG} and use {_LOADERS['peft']}"
    for marker, kind in ((".oft_", "OFT"), (".psoft_", "PSOFT")):
        if any(marker in k for k in keys):
            return f"a PEFT {kind} weights file; load its folder with {_LOADERS['peft']}"
    if metadata and "lora_adapter_metadata" in metadata:
        return f"a diffusers LoRA file; load it with {_LOADERS['diffusers']}"
    return f"a safetensors file of another kind (metadata keys {sorted(metadata or {})})"
