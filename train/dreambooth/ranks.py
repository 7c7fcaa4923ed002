"""``--rank_pattern`` / ``--block_size_pattern``: a size per module type or per module, on top of ``--rank``; and
``--lora_layers``: only some of the --targets layers, by type or name.

    --rank 16 --rank_pattern attn=32,ff=8               # attention projections r=32, feed-forward r=8, the rest 16
    --rank_pattern attn=32,attn2.to_k=4                 # a module-name suffix beats a type
    --method oft --block_size 8 --block_size_pattern ff=16

Each ``KEY=SIZE`` is either a module type or a module name (exact, or a dotted suffix of one, as PSOFTConfig's
``rank_pattern`` and OFTConfig's ``block_size_pattern`` read them). The types are read from the model's structure:

- ``attn``: a layer inside an attention module (diffusers' ``Attention``, CLIP's ``CLIPAttention``, T5's
  ``T5Attention``, ...: any module whose class name has "Attention" in it or is "Attn");
- ``ff``: a layer inside a feed-forward module (``FeedForward``, an ``...MLP`` or ``...Mlp`` class, T5's
  ``DenseReluDense``), or named for one (``ff``, ``ff_context``, ``mlp``, ``proj_mlp`` of Flux's single blocks);
- ``proj``: any other adapted layer (``proj_in`` / ``proj_out`` of a UNet's transformers, Flux's ``proj_out``).

The trainer resolves the pattern on the layers it adapts into one size per layer name, the longest matching module
name first and a type otherwise, and passes that to the config: what a file records is exactly what was trained. The
PEFT LoRA baseline takes the same pattern as its ``rank_pattern`` (alpha equal to the rank).

``--lora_layers attn`` (diffusers' flag, which takes ends of layer names such as ``to_k,to_q,to_v,to_out.0``) keeps
the preset's layers of those types or names, for every method: an ablation by layer type is one flag.
"""

from torch import nn

from .errors import DreamBoothError

TYPES = ("attn", "ff", "proj")
_FF_NAMES = ("ff", "ff_context", "mlp", "proj_mlp", "feed_forward")


def parse_pattern(text: str | None, flag: str) -> dict[str, int]:
    """``"attn=32,ff=8"`` -> ``{"attn": 32, "ff": 8}``; a named error for anything else."""
    if not text:
        return {}
    pattern = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value.strip().isdigit() or int(value) < 1:
            raise DreamBoothError(f"{flag} {text!r}: {item.strip()!r} is not KEY=SIZE with a whole SIZE >= 1; write "
                                  f"e.g. {flag} attn=32,ff=8 (types: {', '.join(TYPES)}, or a module name or a "
                                  "dotted suffix of one).")
        pattern[key.strip()] = int(value)
    return pattern


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Attention" in name or name.endswith("Attn")


def _is_feed_forward(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__
    return any(k in cls for k in ("FeedForward", "MLP", "Mlp", "DenseReluDense", "DenseGated")) \
        or name.rsplit(".", 1)[-1] in _FF_NAMES


def module_type(model: nn.Module, layer: str) -> str:
    """``attn``, ``ff`` or ``proj`` for an adapted layer, by its ancestors (and its own name, for ``proj_mlp``)."""
    parts = layer.split(".")
    chain = [(".".join(parts[:i]), model.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts) + 1)]
    if any(_is_attention(m) for _, m in chain[:-1]):
        return "attn"
    if any(_is_feed_forward(n, m) for n, m in chain):
        return "ff"
    return "proj"


def layer_sizes(models: dict[str, tuple[nn.Module, list[str]]], pattern: dict[str, int], flag: str
                ) -> dict[str, dict[str, int]]:
    """Per model, ``{layer: size}`` for the layers a pattern sets. ``models`` maps a role (``unet``,
    ``text_encoder``) to the model and the layers adapted on it. Every key must set some layer of some model."""
    sizes, used = {}, set()
    for role, (model, layers) in models.items():
        sizes[role] = {}
        for layer in layers:
            names = [k for k in pattern if k not in TYPES and (layer == k or layer.endswith("." + k))]
            key = max(names, key=len) if names else module_type(model, layer)
            if key in pattern:
                sizes[role][layer] = pattern[key]
                used.add(key)
    unused = [k for k in pattern if k not in used]
    if unused:
        shown = ", ".join(f"{role}: {layers[0]}" for role, (_, layers) in models.items() if layers)
        raise DreamBoothError(f"{flag} keys {unused} set no adapted layer; use a type ({', '.join(TYPES)}) or the end "
                              f"of a layer name (e.g. {shown}).")
    return sizes


def _matches(model: nn.Module, layer: str, key: str) -> bool:
    return module_type(model, layer) == key if key in TYPES else layer == key or layer.endswith("." + key)


def only_layers(model: nn.Module, layers: list[str], text: str, flag: str) -> list[str]:
    """The ``layers`` that a key of ``text`` (comma-separated types or ends of layer names) picks; every key must
    pick one."""
    keys = [key.strip() for key in text.split(",") if key.strip()]
    unused = [key for key in keys if not any(_matches(model, layer, key) for layer in layers)]
    if not keys or unused:
        raise DreamBoothError(f"{flag} {text!r}: {unused or 'nothing'} picks none of the {len(layers)} target layers; "
                              f"give types ({', '.join(TYPES)}) or ends of layer names (e.g. {layers[0]}).")
    return [layer for layer in layers if any(_matches(model, layer, key) for key in keys)]
