"""Named bounds: ``bound=small|medium|large`` (ImageNet) and ``bound=cifar10``.

``small`` / ``medium`` / ``large`` are the PAT paper's perceptual-study bounds (table 4,
ImageNet-100 at 224 px): bounds with the same name were about equally perceptible to people
across threat models. The paper gives the L∞ and L2 rows for images in [0, 255]; here they are
divided by 255 because our images are in [0, 1]. ``cifar10`` is the single evaluation bound of
the paper's table 2 (L∞ 8/255, L2 1, StAdv 0.05, ReColorAdv 0.06, PPGD/LPA 0.5 with AlexNet).

Human-calibrated bounds from a study of one's own will override these (a later issue); until
then :func:`bound_presets` is the one table every spec and ``generate_pairs`` reads.
"""

from __future__ import annotations

from ..errors import EngineError

PRESET_NAMES = ("small", "medium", "large", "cifar10")

_PERCEPTUAL = {"small": 0.25, "medium": 0.5, "large": 1.0, "cifar10": 0.5}

#: ``{threat model: {preset: bound}}``, bounds in each threat model's own units.
BOUND_PRESETS: dict[str, dict[str, float]] = {
    "linf": {"small": 2 / 255, "medium": 4 / 255, "large": 8 / 255, "cifar10": 8 / 255},
    "l2": {"small": 600 / 255, "medium": 1200 / 255, "large": 2400 / 255, "cifar10": 1.0},
    "jpeg": {"small": 0.0625, "medium": 0.125, "large": 0.25},
    "stadv": {"small": 0.025, "medium": 0.05, "large": 0.1, "cifar10": 0.05},
    "recoloradv": {"small": 0.03, "medium": 0.06, "large": 0.12, "cifar10": 0.06},
    "ppgd": dict(_PERCEPTUAL),
    "lpa": dict(_PERCEPTUAL),
    "fast_lpa": dict(_PERCEPTUAL),
}


def register_presets(threat_model: str, table: dict[str, float]) -> None:
    """Give ``threat_model`` named bounds (used by attacks that share another's bounds)."""
    BOUND_PRESETS[threat_model] = dict(table)


def bound_presets() -> dict[str, dict[str, float]]:
    """A copy of the preset table (``{threat model: {name: bound}}``)."""
    return {name: dict(table) for name, table in BOUND_PRESETS.items()}


def is_preset(text: str) -> bool:
    return text.strip().lower() in PRESET_NAMES


def resolve_preset(threat_model: str, text: str) -> float:
    """The bound named ``text`` for ``threat_model``; :class:`EngineError` if there is none."""
    name = text.strip().lower()
    table = BOUND_PRESETS.get(threat_model)
    if table is None:
        raise EngineError(
            f"threat model {threat_model!r} has no named bounds; give a number"
            f" (named bounds exist for: {', '.join(sorted(BOUND_PRESETS))})"
        )
    if name not in table:
        raise EngineError(
            f"threat model {threat_model!r} has no bound named {name!r};"
            f" its named bounds: {', '.join(f'{k}={v:.6g}' for k, v in table.items())}"
        )
    return table[name]
