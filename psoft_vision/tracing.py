"""Whether a forward is being traced (torch.fx, torch.compile, torch.export) rather than run.

``torch.fx.symbolic_trace``, timm's fx feature extraction (``features_only=True, feature_cls="fx"``,
``timm.models.create_feature_extractor``) and torchvision's ``create_feature_extractor`` run the forward once with
``Proxy`` objects in place of tensors and keep the operations they see; torch.compile and torch.export trace with
fake tensors. Either way an adapter must compute its transform from its parameters with plain differentiable ops: a
value cached from an earlier call, or one built from the real parameters, would enter the graph as a constant
(training the traced module would not train the adapter). A Proxy also has no value to branch on (autocast state
of its device, a norm, its shape's length).
"""

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing


def fx_tracing() -> bool:
    """True while torch.fx symbolically traces: tensors are Proxies."""
    return is_fx_symbolic_tracing()


def tracing() -> bool:
    """True under torch.compile, torch.export or torch.fx: the traced graph must hold the whole computation."""
    return torch.compiler.is_compiling() or is_fx_symbolic_tracing()
