"""File names and key schemes of every format psoft_vision writes, each spelled once here: the modules that write a
format and the ones that recognise it (loading, errors that say what a file is, model cards) read them from here."""

import json

# ------------------------------------------------------------------------------------------- psoft_vision adapter
# (The name of the file in a folder or hub repository is psoft_vision.hub.DEFAULT_WEIGHT_NAME.)
TRAIN_MODULES_PREFIX = "train_modules."
ANCHOR_INFIX = ".anchor."


def adapter_key(layer: str, param: str) -> str:
    """An adapter parameter (``q``, ``alpha``, ``beta``) or, with ``include_bases``, a basis (``A``, ``B``)."""
    return f"{layer}.{param}"


def anchor_key(layer: str, anchor: str) -> str:
    """An anchor of the adapter on ``layer`` (PSOFT: a sketch of its subspace)."""
    return f"{layer}{ANCHOR_INFIX}{anchor}"


def train_module_key(module: str, param: str) -> str:
    """A weight of one of the config's ``train_modules``."""
    return f"{TRAIN_MODULES_PREFIX}{module}.{param}"


# ---------------------------------------------------------------------------------------------- LoRA exports
#: The metadata entry of every export, ``{"adapter", "layers", ...}``: what psoft_vision wrote into the file.
EXPORT_INFO = "psoft_vision_export"


def export_metadata(info: dict) -> dict[str, str]:
    """The safetensors metadata every exported file carries: torch tensors, and what was exported."""
    return {"format": "pt", EXPORT_INFO: json.dumps(info)}


def lora_keys(module: str) -> tuple[str, str]:
    """``(down, up)`` keys of a LoRA in PEFT's layout (diffusers' too): ``lora_A`` (k, in), ``lora_B`` (out, k)."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


#: PEFT's folder: the config and the weights, whose keys start with :data:`PEFT_PREFIX`.
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def oft_key(layer: str) -> str:
    """The packed skew generators of PEFT's OFT layer on ``layer``."""
    return f"{PEFT_PREFIX}{layer}.oft_R.weight"


#: diffusers: the file ``load_lora_weights(folder)`` looks for by default, and the metadata entry with the
#: LoraConfig arguments of each component (keyed ``<component>.<argument>``).
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = "lora_adapter_metadata"


def kohya_keys(module: str) -> tuple[str, str, str]:
    """``(down, up, alpha)`` keys of a kohya-ss LoRA module (``lora_unet_...``, ``lora_te_...``)."""
    return f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"
