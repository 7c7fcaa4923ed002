"""Counting what a training step dispatches: the compute ops (each one a kernel launch on a GPU) and the waits for
the device (device-to-host syncs), on any device, the CPU included.

A GPU step of small adapters is bound by kernel launches, not arithmetic, so the number of ops predicts its time
where a CPU timing cannot; unlike a timing, it is deterministic. Views (``view``, ``select``, ``t``, ...) and bare
allocations (``empty``, ``empty_strided``) launch nothing and are not counted; ``_local_scalar_dense`` (what
``.item()``, ``bool(t)`` and ``if t:`` dispatch) is counted as a sync, since on a GPU it waits for the device,
except on the tensors that live on the host even in a GPU run (an optimizer's step counters, read with ``.item()``).
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}
_SYNC = torch.ops.aten._local_scalar_dense


class OpCounter(TorchDispatchMode):
    """Counts the compute ops and syncs dispatched while it is active (forward, backward and optimizer alike)."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self.ops = self.syncs = 0
        self.host = {id(t) for t in host_tensors}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is _SYNC:
            self.syncs += id(args[0]) not in self.host
        elif not func.is_view and func.overloadpacket not in _ALLOCATIONS:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_step(step, optimizer=None) -> dict:
    """``{"ops": ..., "syncs": ...}`` of one call of ``step`` (a whole training step; ``optimizer``'s step counters
    are host tensors)."""
    states = optimizer.state.values() if optimizer is not None else ()
    with OpCounter([s["step"] for s in states if isinstance(s.get("step"), torch.Tensor)]) as counter:
        step()
    return {"ops": counter.ops, "syncs": counter.syncs}
