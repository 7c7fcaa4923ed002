"""The contract every adapter keeps, whatever its method (see :mod:`psoft_vision.registry` to add one).

An adapter is a transform of one frozen layer's weight, ``W -> T(W)``. It is built from that layer (a
:class:`~psoft_vision.bases.Base`) and the config of its method, and it provides:

- ``forward(x, inner)``: the output of the layer with weight ``T(W_inner)``, where ``inner`` is the layer with the
  adapters below this one (an :class:`Inner`: call it); the adapter never needs to form ``T(W)`` here;
- ``merge_into(W)``: ``T(W)`` itself, with maths in fp32 and the result in ``W``'s dtype; ``forward`` and
  ``merge_into`` agree, so merging never changes the output beyond rounding;
- ``describe()``: the JSON-able facts of this adapter on this layer that an adapter file records (its shapes);
- ``lora_factors()``: ``(up, down)`` with ``up @ down.flatten(1) == T(W) - W`` when the update has a small exact
  low-rank form (fp32), else ``None``;
- ``anchors()`` / ``realign(anchors, saved, weight)``: small tensors an adapter file keeps, and their use when the
  file is loaded onto a copy of the base in another precision, so that the adapter rebuilds what it was trained
  with (an adapter that derives nothing from the weight needs neither);
- ``config``: the config it was built from, and ``strength``: 0 is the identity exactly, 1 the trained transform;
- optionally ``batch_key()`` and ``build_batch(adapters)``: adapters with equal keys have their transforms built
  together, once per training forward (:mod:`psoft_vision.batching`); ``built(compute)`` gives an adapter its part,
  or ``compute()`` where it cannot have one.

Every adapter is the identity when it is created and at strength 0. What else holds (orthogonality, kept norms) is
the method's own promise, stated in its module.
"""

import contextlib
import itertools
import weakref

import torch
from torch import nn

from .tracing import fx_tracing, tracing

#: adapter -> (its state key when handed, its part of a batch, the forward it was built for); see ``receive``
_HANDED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
#: adapter -> the forward whose part it last took outside a backward pass
_TAKEN: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


class Inner:
    """What ``Adapter.forward`` gets as ``inner``: the layer with the adapters below it, called as ``inner(x)``, and
    ``module``, the frozen layer itself when no adapter is below (else None), for adapters that can fuse their work
    with it. Not a module: hooks that move every argument of a call to a device (accelerate's offloading) would move,
    or fail on, the layer's weights."""

    __slots__ = ("call", "module")

    def __init__(self, call, module: nn.Module | None = None):
        self.call, self.module = call, module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in on input ``x``: autocast's where it is on for ``x``'s device, else ``x``'s own
    (a torch.fx Proxy has no device to ask: its own)."""
    if fx_tracing():
        return x.dtype
    return autocast_dtype(x.device) or x.dtype


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` now, or None where it is off (or has no autocast: ``meta``)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def merge_precision(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the dtype a merge computes in: fp32, or the weight's own where it is wider (an fp64 base would
    otherwise lose its own precision to the merge, not only the update's)."""
    return weight.to(torch.promote_types(weight.dtype, torch.float32))


def fp32(device: torch.device):
    """A context where autocast is off on ``device``: adapters build their transforms in fp32, whatever the autocast
    of the forward that asks for them (a merge or an export then gives the same weights under autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class Adapter(nn.Module):
    """Base class of the adapters; subclasses implement ``forward``, ``merge_into`` and ``describe``."""

    method: str = ""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.strength = 1.0
        #: ``{setting: (asked, used, why)}`` where the layer could not take the config's value (a clamped rank, say);
        #: inject reports them in one warning.
        self.adjusted: dict[str, tuple] = {}

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        raise NotImplementedError

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def anchors(self) -> dict[str, torch.Tensor]:
        return {}

    def realign(self, anchors: dict[str, torch.Tensor], saved: dict, weight: torch.Tensor) -> None:
        """Called by ``load_adapter`` with the file's anchors, this layer's ``describe()`` as saved and the base's
        pretrained weight."""

    @property
    def device(self) -> torch.device:
        """Where the adapter's tensors are (the CPU for an adapter without any)."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def state_key(self) -> tuple:
        """Everything a transform computed from this adapter depends on: the strength, and each parameter's and
        buffer's storage, in-place version, dtype and device."""
        tensors = [*self.parameters(), *self.buffers()]
        return (self.strength, *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))

    def cached(self, compute):
        """``compute()``, kept between calls while gradients are off and nothing it reads has changed: an eval-mode
        forward then costs no solve. Parameters' in-place updates, moves, casts, the strength and the autocast state
        all invalidate it. Not while tracing: the traced graph holds the computation."""
        if torch.is_grad_enabled() or tracing():
            self._cache = None
            return compute()
        key = (*self.state_key(), autocast_dtype(self.device))
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            cache = self._cache = (key, compute())
        return cache[1]

    def batch_key(self):
        """Adapters with equal keys (not None) can have their transforms built by one ``build_batch`` call."""
        return None

    @classmethod
    def build_batch(cls, adapters: list["Adapter"]) -> list[torch.Tensor]:
        """What ``built`` computes for each of ``adapters`` (equal batch keys), computed together."""
        raise NotImplementedError

    def receive(self, part: torch.Tensor, forward) -> None:
        """Hand this adapter its part of a batch built for ``forward`` (an object whose ``running`` says whether that
        forward is under way); see :mod:`psoft_vision.batching` for when ``built`` takes it."""
        _HANDED[self] = (self.state_key(), part, forward)

    def built(self, compute):
        """This adapter's transform: its part of the batch built for the forward under way where that is exactly
        what ``compute()`` gives, else ``compute()`` with autocast off (cached while gradients are off)."""
        def own():
            with fp32(self.device):
                return compute()

        if tracing() or not torch.is_grad_enabled():
            return self.cached(own)
        handed = _HANDED.get(self)
        if handed is None or handed[0] != self.state_key():
            return own()
        _, part, forward = handed
        if torch._C._current_graph_task_id() != -1:  # recomputed in a backward pass: do what the forward did
            return part if _TAKEN.get(self) is forward else own()
        if not forward.running:
            return own()
        _TAKEN[self] = forward
        return part

    def at_strength(self, p: torch.Tensor, neutral: float) -> torch.Tensor:
        """``p`` moved toward ``neutral`` (its value at the identity) by the strength:
        ``neutral + strength * (p - neutral)``."""
        if self.strength == 1.0:
            return p
        return neutral + self.strength * (p - neutral)
