"""What every method's config shares: where to go, what else to train, and checked arguments."""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError, UnsupportedLayerError

#: ``"auto"`` or a preset name, a regex (string or compiled, full match), module names (exact or dotted suffix),
#: or a callable ``(name, module) -> bool``.
TargetSpec = str | re.Pattern | Sequence[str] | Callable[[str, nn.Module], bool]


@dataclass(kw_only=True)
class AdapterConfig:
    targets: TargetSpec = "auto"
    exclude: TargetSpec | None = None
    dropout: float = 0.0
    train_modules: Sequence[str] = field(default_factory=tuple)

    method = "base"

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1); use 0.0 to switch it off.")
        if isinstance(self.train_modules, str):
            self.train_modules = (self.train_modules,)
        self.train_modules = tuple(self.train_modules)

    def make_adapter(self, layer: nn.Module, layer_name: str) -> nn.Module:
        raise NotImplementedError


def check_neumann_terms(terms: int | None) -> None:
    if terms is not None and (not isinstance(terms, int) or isinstance(terms, bool) or terms < 1):
        raise ConfigError(
            f"neumann_terms={terms!r} must be None (exact Cayley) or an integer >= 1; even values are the "
            "most orthogonal for their cost (see psoft_vision.orthogonal)."
        )


def conv_geometry(layer: nn.Module, layer_name: str) -> dict | None:
    """``None`` for a Linear; the keyword arguments of ``F.conv2d`` for a supported Conv2d."""
    if isinstance(layer, nn.Linear):
        return None
    if not isinstance(layer, nn.Conv2d):
        raise UnsupportedLayerError(
            f"{layer_name!r} is a {type(layer).__name__}; adapters support nn.Linear and nn.Conv2d. "
            "Leave it out of `targets` (or add it to `exclude`)."
        )
    if layer.groups != 1:
        raise UnsupportedLayerError(
            f"{layer_name!r} is a grouped Conv2d (groups={layer.groups}); only groups=1 is supported. "
            "Add it to `exclude`."
        )
    if layer.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"{layer_name!r} uses padding_mode={layer.padding_mode!r}; only 'zeros' is supported. "
            "Add it to `exclude`."
        )
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)

