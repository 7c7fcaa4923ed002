"""Building the transforms of many adapters together: one batched computation per forward, not one per layer.

An orthogonal adapter's transform (PSOFT's ``B (C - I)``, OFTv2's block rotations) comes from its small parameters
through some twenty small ops: packing, a Cayley transform, scalings. Run per layer, a GPU step is bound by those
kernel launches, not by arithmetic. So, when a training forward starts, the model's adapters that can share the
work (equal :meth:`~psoft_vision.adapter.Adapter.batch_key`) are built in one call of their method's
``build_batch``, inside the autograd graph, and each layer then takes its part of the result.

The batch is built by a forward pre-hook on the model that ``inject`` was called on, so it sits outside every block
and outside every checkpointed region. A layer takes its part only when that is exactly what it would compute on its
own; otherwise it builds its own transform (``Adapter.built`` decides), always correctly:

- only while gradients are on, outside ``torch.compile``, ``torch.export`` and fx tracing (which trace each layer's
  own computation), and never with sharded (FSDP2) or offloaded parameters, which are gathered or loaded block by
  block after the model's pre-hook has run;
- only while the forward that built it runs: a layer called on its own later (``model.forward_features(x)``) builds
  its own, so two forwards never share one graph;
- only if nothing it reads changed since (an in-place update, a move, the strength): the key of ``Adapter.state_key``;
- in a backward pass (activation checkpointing recomputes a block there), only if the layer took its part in the
  forward too. Non-reentrant checkpointing (timm's and diffusers' default) then recomputes the very same ops, as it
  requires; reentrant checkpointing ran the first forward without gradients, so the layer builds its own transform
  inside the recomputation, whose nested backward must not run through the shared batch.
"""

import weakref

import torch
from torch import nn

from .adapter import fp32
from .layer import AdaptedLayer
from .tracing import tracing

#: model -> its adapted layers, found once (``attach`` and the lifecycle's structural changes refresh it)
_LAYERS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
#: model -> the forward under way
_RUNNING: "weakref.WeakKeyDictionary[nn.Module, _Forward]" = weakref.WeakKeyDictionary()


class _Forward:
    """One forward of a model: the parts handed out for it are valid while it runs."""

    __slots__ = ("running",)

    def __init__(self):
        self.running = True


def _elsewhere(adapter: nn.Module) -> bool:
    """Whether the adapter's parameters are not all here before its own forward: sharded by FSDP2 (gathered when its
    block runs) or offloaded to the meta device (accelerate's hooks load them when the adapter runs)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        DTensor = ()
    return any(isinstance(p, DTensor) or p.is_meta for p in adapter.parameters())


def _groups(model: nn.Module) -> list[list[nn.Module]]:
    """The active, unmerged adapters of ``model`` that train, by batch key; groups of one gain nothing."""
    if model not in _LAYERS:
        _LAYERS[model] = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    groups: dict = {}
    for layer in _LAYERS[model]:
        for name in layer.active[len(layer.merged):]:
            adapter = layer.adapters[name]
            key = adapter.batch_key()
            if key is not None and any(p.requires_grad for p in adapter.parameters()) and not _elsewhere(adapter):
                groups.setdefault(key, []).append(adapter)
    return [group for group in groups.values() if len(group) > 1]


def _build(model: nn.Module, args) -> None:
    """The model's forward pre-hook: build every group's batch for this forward and hand each adapter its part."""
    if not torch.is_grad_enabled() or tracing():
        return
    forward = _RUNNING[model] = _Forward()
    for group in _groups(model):
        with fp32(group[0].device):
            parts = type(group[0]).build_batch(group)
        for adapter, part in zip(group, parts, strict=True):
            adapter.receive(part, forward)


def _end(model: nn.Module, args, output) -> None:
    forward = _RUNNING.pop(model, None)
    if forward is not None:
        forward.running = False


def attach(model: nn.Module) -> None:
    """Build the adapters of ``model`` together at each of its training forwards (``inject`` calls this). A model
    inside it that had its own hooks hands them over, so that one batch covers every layer."""
    for module in model.modules():
        if module is not model:
            detach(module)
    _LAYERS.pop(model, None)
    if _build not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_build)
        model.register_forward_hook(_end, always_call=True)


def detach(model: nn.Module) -> None:
    """Remove what :func:`attach` added to ``model`` (``remove`` calls this once no adapter is left)."""
    for hooks, hook in ((model._forward_pre_hooks, _build), (model._forward_hooks, _end)):
        for handle_id in [i for i, h in hooks.items() if h is hook]:
            del hooks[handle_id]
            model._forward_hooks_always_called.pop(handle_id, None)
    _LAYERS.pop(model, None)


def refresh(model: nn.Module) -> None:
    """Find the adapted layers again after the structure of ``model`` changed (in it, or in a model around it)."""
    for root in list(_LAYERS):
        if root is model or any(m is model for m in root.modules()):
            _LAYERS.pop(root, None)
