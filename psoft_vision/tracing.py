"""Whether torch.fx is recording a forward rather than running it.

``torch.fx.symbolic_trace``, timm's fx feature extraction (``features_only=True, feature_cls="fx"``,
``timm.models.create_feature_extractor``) and torchvision's ``create_feature_extractor`` run the forward once with
``Proxy`` objects in place of tensors and keep the operations they see. An adapter's forward then has to compute its
rotation from its parameters with plain differentiable torch ops: a value cached from an earlier call, or one built
from the real parameters, would enter the graph as a constant (training the traced module would not train the
adapter), and a Proxy has no value to branch on (autocast state, ``requires_grad``, a norm, its shape's length).
"""

from torch.fx._symbolic_trace import is_fx_symbolic_tracing


def is_tracing() -> bool:
    """True while torch.fx symbolically traces (not under torch.compile or torch.export, which see real values)."""
    return is_fx_symbolic_tracing()
