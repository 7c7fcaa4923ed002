"""The contract every adapter keeps, whatever its method (see :mod:`psoft_vision.registry` to add one).

An adapter is a transform of one frozen layer's weight, ``W -> T(W)``. It is built from that layer (a
:class:`~psoft_vision.bases.Base`) and the config of its method, and it provides:

- ``forward(x, inner)``: the output of the layer with weight ``T(W_inner)``, where ``inner`` is the layer with the
  adapters below this one (a callable); the adapter never needs to form ``T(W)`` here;
- ``merge_into(W)``: ``T(W)`` itself, with maths in fp32 and the result in ``W``'s dtype; ``forward`` and
  ``merge_into`` agree, so merging never changes the output beyond rounding;
- ``describe()``: the JSON-able facts of this adapter on this layer that an adapter file records (its shapes);
- ``lora_factors()``: ``(up, down)`` with ``up @ down.flatten(1) == T(W) - W`` when the update has a small exact
  low-rank form (fp32), else ``None``;
- ``anchors()`` / ``realign(anchors, saved, weight)``: small tensors an adapter file keeps, and their use when the
  file is loaded onto a copy of the base in another precision, so that the adapter rebuilds what it was trained
  with (an adapter that derives nothing from the weight needs neither);
- ``config``: the config it was built from, and ``strength``: 0 is the identity exactly, 1 the trained transform.

Every adapter is the identity when it is created and at strength 0. What else holds (orthogonality, kept norms) is
the method's own promise, stated in its module.
"""

import torch
from torch import nn

from .tracing import is_tracing


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

    def cached(self, compute):
        """``compute()``, kept between calls while gradients are off and nothing it reads has changed: an eval-mode
        forward then costs no solve. Parameters' in-place updates, moves and the strength all invalidate it. Not
        while torch.compile or torch.fx traces: its graph holds the computation (a cached value would be a constant
        there), and the key's data pointers would break it."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or is_tracing():
            self._cache = None
            return compute()
        tensors = [*self.parameters(), *self.buffers()]
        key = (self.strength, *((t.data_ptr(), t._version) for t in tensors))
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != key:
            cache = self._cache = (key, compute())
        return cache[1]

    def at_strength(self, p: torch.Tensor, neutral: float) -> torch.Tensor:
        """``p`` moved toward ``neutral`` (its value at the identity) by the strength:
        ``neutral + strength * (p - neutral)``."""
        if self.strength == 1.0:
            return p
        return neutral + self.strength * (p - neutral)
