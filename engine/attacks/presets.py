"""Named bounds — kept for imports; they are declared in :mod:`engine.attacks.spec`."""

from .spec import BOUND_PRESETS, PRESET_NAMES, bound_presets, is_preset, resolve_preset

__all__ = ["BOUND_PRESETS", "PRESET_NAMES", "bound_presets", "is_preset", "resolve_preset"]
