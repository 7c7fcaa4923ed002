"""Adapters under PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): sharding an adapted model, and saving its
adapters without gathering the model.

Inject first, shard second: PSOFT computes each layer's principal subspace (the SVD) from the whole weight, which a
shard does not hold, so :func:`shard` refuses a model with no adapters. ``fully_shard`` flattens every parameter of
the module it wraps into one group, frozen or not; a block that holds frozen base weights and trainable adapter
parameters is one such group, and that works: FSDP2 all-gathers the group for the forward and reduce-scatters only
the gradients that exist (tests/test_fsdp.py trains two processes to the single-process result). The adapters'
frozen buffers (PSOFT's subspace ``A``, ``B``) are not parameters, so every rank keeps them whole.

Saving gathers the trainable tensors alone (:func:`adapter_state_dict`): a few thousand numbers per layer instead of
the model. An adapter file also records per-layer facts and a fingerprint of every base weight, which training never
changes, so :class:`AdapterSaver` takes them from the whole model before it is sharded, and writes files from the
gathered tensors afterwards::

    pv.inject(model, pv.PSOFTConfig(rank=32))
    saver = AdapterSaver(model)                  # before sharding: the file's constant part
    shard(model)                                 # fully_shard per block, then the root
    ... train ...
    saver.save(model, "adapter.safetensors")     # every rank calls it (a collective); rank 0 writes
"""

import os
from pathlib import Path

import torch
from torch import nn

from .errors import PSOFTVisionError
from .formats.names import adapter_key, train_module_key
from .formats.native import adapter_contents, write_contents
from .model import adapted_layers, one_adapter_name, plain_name, train_modules_of
from .targets.structure import repeated_blocks, transformer_blocks


class ShardingError(PSOFTVisionError):
    """A model sharded in an order that cannot work: adapters must be injected before FSDP shards the weights."""


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def default_blocks(model: nn.Module) -> list[str]:
    """The modules :func:`shard` wraps one by one: a diffusers model's transformer blocks (modules holding an
    attention), else any repeated blocks (a ModuleList or Sequential of one class)."""
    return transformer_blocks(model) or repeated_blocks(model)


def shard(model: nn.Module, blocks: list[str] | None = None, **fully_shard_kwargs) -> nn.Module:
    """``fully_shard`` each of ``blocks`` (default :func:`default_blocks`), then the model: one FSDP group per block,
    frozen bases and adapters together. ``fully_shard_kwargs`` go to every call (``mesh``, ``reshard_after_forward``,
    ``mp_policy``, ...). Refuses a model without adapters or with sharded weights already."""
    from torch.distributed.fsdp import fully_shard

    if not list(adapted_layers(model)):
        raise ShardingError(f"{type(model).__name__} has no adapters: inject them before sharding (PSOFT's subspace "
                            "is the SVD of the whole weight, which a shard does not hold).")
    if any(is_sharded(p) for p in model.parameters()):
        raise ShardingError(f"{type(model).__name__} is sharded already; shard it once, after injecting.")
    for name in blocks if blocks is not None else default_blocks(model):
        fully_shard(model.get_submodule(name), **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


def adapter_state_dict(model: nn.Module, cpu: bool = True) -> dict[str, torch.Tensor]:
    """``{parameter name: whole tensor}`` for every trainable parameter (the adapters and any ``train_modules``),
    gathered from the shards: a collective that every rank must call, in the same order (it is: the model's
    parameter order). Unsharded models give their tensors as they are."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = p.full_tensor() if is_sharded(p) else p
            out[name] = whole.detach().to("cpu") if cpu else whole.detach()
    return out


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0


class AdapterSaver:
    """Writes :func:`psoft_vision.save_adapter`'s files for a sharded model (see the module docstring). Made from the
    whole model (before sharding), it keeps the file's header and its constant tensors (anchors), and maps each
    trained tensor of the file to the model parameter it comes from."""

    def __init__(self, model: nn.Module, name: str | None = None):
        if any(is_sharded(p) for p in model.parameters()):
            raise ShardingError("AdapterSaver needs the whole model: make it before sharding.")
        self.name = one_adapter_name(model, name)
        self.header, tensors = adapter_contents(model, self.name)
        self.sources = self._sources(model)
        self.constants = {k: t.to("cpu", copy=True) for k, t in tensors.items() if k not in self.sources}

    def _sources(self, model: nn.Module) -> dict[str, str]:
        """``{file key: parameter name}`` for the trained tensors: the adapter's parameters and the weights of the
        config's ``train_modules``."""
        sources = {}
        for layer_name, layer in adapted_layers(model):
            if self.name in layer.adapters:
                for key, _ in layer.adapters[self.name].named_parameters():
                    sources[adapter_key(plain_name(layer_name), key)] = f"{layer_name}.adapters.{self.name}.{key}"
        for module in train_modules_of(model, self.name):
            for key, _ in model.get_submodule(module).named_parameters():
                sources[train_module_key(module, key)] = f"{module}.{key}"
        return sources

    def save(self, model: nn.Module, path: str | os.PathLike) -> Path | None:
        """Gather the trained tensors (every rank), and write the file on rank 0; returns its path there."""
        gathered = adapter_state_dict(model)
        missing = sorted(set(self.sources.values()) - set(gathered))
        if missing:
            raise ShardingError(f"{missing[:3]} are not trainable parameters of {type(model).__name__}: was it "
                                "modified since the saver was made?")
        if _rank() != 0:
            return None
        tensors = dict(self.constants, **{key: gathered[param] for key, param in self.sources.items()})
        return write_contents(Path(path), self.header, tensors)
