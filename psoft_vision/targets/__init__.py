"""Where adapters go: presets read from a model's structure, and matching of target specs to module names."""

from .presets import ALIASES, PRESETS, Preset
from .select import auto_preset, chosen_by_preset, excluder, select
from .structure import candidate_modules, diffusers_targets, timm_targets

__all__ = ["ALIASES", "PRESETS", "Preset", "auto_preset", "candidate_modules", "chosen_by_preset",
           "diffusers_targets", "excluder", "select", "timm_targets"]
