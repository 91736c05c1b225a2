"""Attack specs: the grammar, the named bounds, bound labels and expansion by bounds.

A spec is ``NAME:key=value,key=value,...`` (``linf:bound=8/255,num_iterations=40``). This
module is the only place that reads spec text; :func:`engine.attacks.parse_attack`,
``engine.stimuli`` and ``studyapp`` call it.

Bounds in a spec (``bound=...``):

- a number or fraction in the threat model's units: ``bound=0.5``, ``bound=8/255``;
- a named bound (:data:`PRESET_NAMES`): ``small`` / ``medium`` / ``large`` are the PAT
  paper's perceptual-study bounds (table 4, ImageNet-100 at 224 px; L∞/L2 rows divided by 255
  for ``[0, 1]`` images), ``cifar10`` the evaluation bound of its table 2;
- a labelled number ``VALUE@LABEL`` (``bound=0.31@human_medium``): the number is the bound,
  the label is recorded with the condition (:func:`bound_label`) — for bounds calibrated by a
  study of one's own. The label is not part of the attack (``Attack.spec`` drops it).

Named bounds of the perceptual attacks ``ppgd``, ``lpa`` and ``fast_lpa`` are table 4's,
which are measured with an AlexNet LPIPS network (table 2's ``cifar10`` with PAT's CIFAR-10
AlexNet). So with a named bound (:data:`NAMED_BOUND_LPIPS`):

- no ``lpips_model`` means ``alexnet`` (pretrained; ``alexnet_cifar`` has no default, its
  weights file must be named: ``lpips_model=alexnet_cifar:/path/to/weights.pt``);
- ``alexnet:untrained`` / ``alexnet_cifar:untrained`` are accepted only when written, and are
  recorded in the spec;
- ``lpips_model=self`` or another network is an error: a bound named after table 4 would
  then mean a different perceptual size (self-bounded distances are about half AlexNet's).

Give a number to bound any other LPIPS network.

Iteration profiles: ``iterations=pat`` sets ``num_iterations`` to PAT's evaluation count
(200; PPGD and LPA 40), ``iterations=pat_train`` to its training count (10) — see
:data:`ITERATION_PROFILES`. ``Attack.spec`` records the resulting ``num_iterations``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import MISSING
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import EngineError
from .base import parse_number

if TYPE_CHECKING:
    from .base import Attack

PRESET_NAMES = ("small", "medium", "large", "cifar10")
#: Separator of a labelled numeric bound, ``bound=0.31@human_medium``.
LABEL_SEPARATOR = "@"

_LINF = MappingProxyType(
    {"small": 2 / 255, "medium": 4 / 255, "large": 8 / 255, "cifar10": 8 / 255})
_PERCEPTUAL = MappingProxyType({"small": 0.25, "medium": 0.5, "large": 1.0, "cifar10": 0.5})

#: ``{threat model: {name: bound}}`` in each threat model's own units (read-only, declared
#: here and nowhere else). ``lpips_oa`` bounds are L∞ radii (OA-AT); ``lagrangian``'s
#: ``cifar10`` is the Lagrangian-AT authors' initial step α.
BOUND_PRESETS: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "linf": _LINF,
    "l2": MappingProxyType(
        {"small": 600 / 255, "medium": 1200 / 255, "large": 2400 / 255, "cifar10": 1.0}),
    "jpeg": MappingProxyType({"small": 0.0625, "medium": 0.125, "large": 0.25}),
    "stadv": MappingProxyType({"small": 0.025, "medium": 0.05, "large": 0.1, "cifar10": 0.05}),
    "recoloradv": MappingProxyType(
        {"small": 0.03, "medium": 0.06, "large": 0.12, "cifar10": 0.06}),
    "ppgd": _PERCEPTUAL,
    "lpa": _PERCEPTUAL,
    "fast_lpa": _PERCEPTUAL,
    "lpips_oa": _LINF,
    "lagrangian": MappingProxyType({"cifar10": 0.15}),
})

#: LPIPS architecture that the named bounds of the perceptual attacks are measured with
#: (``{preset name: architecture}``; PAT table 4 / table 2).
NAMED_BOUND_LPIPS: Mapping[str, str] = MappingProxyType(
    {"small": "alexnet", "medium": "alexnet", "large": "alexnet", "cifar10": "alexnet_cifar"})
#: Attacks whose named bounds are LPIPS distances in the :data:`NAMED_BOUND_LPIPS` network.
AUTO_LPIPS_ATTACKS = ("ppgd", "lpa", "fast_lpa")


#: Named iteration profiles, ``iterations=NAME`` in a spec (sets ``num_iterations``): PAT
#: appendix H, "10 attack iterations for training and 200 for testing, except for PPGD and
#: LPA, where we use 40 for testing". ``fast_lpa`` is a training attack: 10 in both.
ITERATION_PROFILES: Mapping[str, Mapping[str, int]] = MappingProxyType({
    "pat": MappingProxyType({
        **{name: 200 for name in ("linf", "l2", "jpeg", "stadv", "recoloradv", "apgd_ce",
                                  "apgd_dlr", "lpips_oa")},
        "ppgd": 40, "lpa": 40, "fast_lpa": 10,
    }),
    "pat_train": MappingProxyType({
        name: 10 for name in ("linf", "l2", "jpeg", "stadv", "recoloradv", "apgd_ce",
                              "apgd_dlr", "lpips_oa", "ppgd", "lpa", "fast_lpa")
    }),
})
#: The spec key of :data:`ITERATION_PROFILES` (not an attack parameter).
PROFILE_KEY = "iterations"


def bound_presets() -> dict[str, dict[str, float]]:
    """A mutable copy of :data:`BOUND_PRESETS`."""
    return {name: dict(table) for name, table in BOUND_PRESETS.items()}


def is_preset(text: str) -> bool:
    """Is ``text`` a named bound (``small``, ``medium``, ``large``, ``cifar10``)?"""
    return isinstance(text, str) and text.strip().lower() in PRESET_NAMES


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


# --------------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------------


def split_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """``'NAME:k=v,...'`` → ``(name, [(key, text), ...])`` (lower-case name, stripped pieces).

    Checks only the grammar: :class:`EngineError` for an empty spec, an empty piece (stray
    ``,``), a piece without ``=``, an empty key or value, or a key given twice.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EngineError(f"attack spec must be a non-empty string like 'linf:bound=8/255',"
                          f" got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise EngineError(f"attack spec {spec!r} has no attack name before ':'")
    pieces: list[tuple[str, str]] = []
    if rest.strip():
        where = f"in attack spec {spec!r}"
        for raw in rest.split(","):
            piece = raw.strip()
            if not piece:
                raise EngineError(f"empty parameter (stray ',') {where}; write key=value pairs")
            key, eq, text = piece.partition("=")
            key, text = key.strip(), text.strip()
            if not eq:
                raise EngineError(f"parameter {piece!r} {where} has no '='; write key=value")
            if not key:
                raise EngineError(f"parameter {piece!r} {where} has no name before '='")
            if not text:
                raise EngineError(f"parameter {piece!r} {where} has an empty value")
            if any(k == key for k, _ in pieces):
                raise EngineError(f"parameter {key!r} is given twice {where} ({piece!r})")
            pieces.append((key, text))
    return name, pieces


def join_spec(name: str, pieces: Iterable[tuple[str, str]]) -> str:
    """The inverse of :func:`split_spec`."""
    body = ",".join(f"{k}={v}" for k, v in pieces)
    return f"{name}:{body}" if body else name


def split_bound(text: str) -> tuple[str, str]:
    """A ``bound`` value → ``(value text, label)``: ``'0.31@human'`` → ``('0.31', 'human')``,
    ``'medium'`` → ``('medium', 'medium')``, ``'0.5'`` → ``('0.5', '')``."""
    value, sep, label = text.strip().partition(LABEL_SEPARATOR)
    value, label = value.strip(), label.strip()
    if sep:
        if not label or any(c in label for c in ",=:@ \t"):
            raise EngineError(
                f"bound {text!r}: a label after '@' must be a non-empty word"
                " (letters, digits, '_', '-', '.'), e.g. bound=0.31@human_medium"
            )
        if is_preset(value):
            raise EngineError(f"bound {text!r}: a named bound takes no label; write"
                              f" bound={value} or a number with a label")
        parse_number("bound", value)
        return value, label
    return value, value.lower() if is_preset(value) else ""


def bound_label(spec: str) -> str:
    """The label of a spec's bound: its name (``linf:bound=small`` → ``small``), its
    ``@label`` (``ppgd:bound=0.31@human_medium`` → ``human_medium``), else ``""``."""
    _, pieces = split_spec(spec)
    for key, text in pieces:
        if key == "bound":
            return split_bound(text)[1]
    return ""


def expand_specs(specs: Iterable[str], bounds: Iterable[str | float | tuple[str, float]] | None
                 ) -> tuple[str, ...]:
    """Each spec once per bound of ``bounds`` (the specs must then omit ``bound``).

    A bound is a name (``'medium'``), a number (``0.5``, ``'8/255'``), a labelled number
    (``'0.31@human_medium'``) or a pair ``(label, number)`` (``('human_medium', 0.31)``).
    ``expand_specs(['linf', 'l2:num_iterations=20'], ['small', 'large'])`` gives four specs;
    ``expand_specs(['ppgd'], [('human_medium', 0.31)])`` gives
    ``('ppgd:bound=0.31@human_medium',)``. Without ``bounds`` the specs are returned
    unchanged. Every resulting spec is checked with :func:`engine.attacks.parse_attack`.
    """
    from .registry import parse_attack

    specs = list(specs)
    if not bounds:
        for spec in specs:
            parse_attack(spec)
        return tuple(specs)
    texts = []
    for bound in bounds:
        if isinstance(bound, tuple):
            label, value = bound
            texts.append(f"{float(value)!r}{LABEL_SEPARATOR}{label}")
        elif isinstance(bound, int | float) and not isinstance(bound, bool):
            texts.append(repr(float(bound)))
        else:
            texts.append(str(bound).strip())
        split_bound(texts[-1])  # label syntax
    out = []
    for spec in specs:
        name, pieces = split_spec(spec)
        if any(key == "bound" for key, _ in pieces):
            raise EngineError(f"spec {spec!r} sets bound itself; drop it or drop the bounds")
        for text in texts:
            expanded = join_spec(name, [("bound", text), *pieces])
            parse_attack(expanded)
            out.append(expanded)
    return tuple(out)


def threat_model_of(spec: str) -> str:
    """The attack name of a spec (``'linf:bound=0.1'`` → ``'linf'``); grammar checked."""
    return split_spec(spec)[0]


def check_label(label: str) -> str:
    """A condition label as written after ``@`` (:func:`split_bound`'s rule); returns it."""
    if not isinstance(label, str):
        raise EngineError(f"condition label must be a string, got {label!r}")
    if label == "":
        return label
    if any(c in label for c in ",=:@ \t\n"):
        raise EngineError(f"condition label {label!r} must be one word (letters, digits, '_',"
                          " '-', '.')")
    return label


def with_params(spec: str, **params: object) -> str:
    """``spec`` with parameters set (replaced where given, else added after the name's
    ``bound``): ``with_params('linf:bound=0.1,num_iterations=5', bound=0.2)`` →
    ``'linf:bound=0.2,num_iterations=5'``. Floats are written with ``repr`` (exact)."""
    name, pieces = split_spec(spec)

    def text(value: object) -> str:
        return repr(float(value)) if isinstance(value, float) else str(value)

    given = dict(pieces)
    out = [(k, text(params[k]) if k in params else v) for k, v in pieces]
    out += [(k, text(v)) for k, v in params.items() if k not in given]
    return join_spec(name, out)


def join_params(name: str, params: str) -> str:
    """A spec from an attack name and a parameter list ``"k=v,k=v"`` (grammar checked):
    ``join_params('linf', 'num_iterations=40')`` → ``'linf:num_iterations=40'``."""
    return join_spec(*split_spec(f"{name}:{params}" if params.strip() else name))


def has_param(spec: str, key: str) -> bool:
    """Does ``spec`` set parameter ``key`` itself?"""
    return any(k == key for k, _ in split_spec(spec)[1])


def ladder_specs(specs: Iterable[str], bounds: Iterable[str] | None, n: int
                 ) -> tuple[tuple[str, ...], dict[str, int]]:
    """An adaptive ladder: ``n`` log-spaced bounds per spec, labelled ``L0``…``L{n-1}``.

    ``bounds`` gives ``(low, high)`` (named or numeric, in each threat model's units);
    without it the ladder spans half the ``small`` to twice the ``large`` named bound.
    Returns ``(specs, levels)``: the expanded specs (``linf:bound=0.0039…@L0,...``) and
    ``{expanded spec: level}``. The specs must omit ``bound``.
    """
    from ..adaptive import ladder
    from .registry import parse_attack

    if n < 2:
        raise EngineError(f"a ladder needs at least 2 levels, got {n}")
    bounds = None if bounds is None else list(bounds)
    if bounds is not None and len(bounds) != 2:
        raise EngineError(f"a ladder takes two bounds LOW,HIGH, got {bounds}")
    out: list[str] = []
    levels: dict[str, int] = {}
    for spec in specs:
        name, pieces = split_spec(spec)
        if any(key == "bound" for key, _ in pieces):
            raise EngineError(f"spec {spec!r} sets bound itself; drop it or drop the bounds")

        def resolve(text: str, name: str = name, pieces: list = pieces) -> float:
            return float(parse_attack(join_spec(name, [("bound", str(text)), *pieces])).bound)

        low, high = ((resolve("small") / 2, resolve("large") * 2) if bounds is None
                     else (resolve(bounds[0]), resolve(bounds[1])))
        if not 0 < low < high:
            raise EngineError(f"ladder for {spec!r} needs 0 < low < high, got {low}, {high}")
        for i, value in enumerate(ladder(low, high, n)):
            expanded = join_spec(name, [("bound", f"{float(value)!r}{LABEL_SEPARATOR}L{i}"),
                                        *pieces])
            parse_attack(expanded)
            out.append(expanded)
            levels[expanded] = i
    return tuple(out), levels


# --------------------------------------------------------------------------------------------
# Spec → attack
# --------------------------------------------------------------------------------------------


def build_attack(spec: str, attacks: Mapping[str, type[Attack]]) -> Attack:
    """Build an attack from ``spec`` with the classes of the registry ``attacks``.

    Used by :func:`engine.attacks.parse_attack` (which documents the errors).
    """
    names = ", ".join(sorted(attacks))
    try:
        name, pieces = split_spec(spec)
    except EngineError as exc:
        raise EngineError(f"{exc}; attacks: {names}") from None
    cls = attacks.get(name)
    if cls is None:
        raise EngineError(f"unknown attack {name!r} in spec {spec!r}; attacks: {names}")
    fields = {f.name: f for f in cls.parameter_fields()}
    where = f"in attack spec {spec!r}"
    values: dict[str, object] = {}
    presets: dict[str, str] = {}
    for key, text in pieces:
        piece = f"{key}={text}"
        if (key == PROFILE_KEY and key not in fields
                and text.strip().lower() in ITERATION_PROFILES):
            values["num_iterations"] = _profile_iterations(name, text, pieces, spec)
            continue
        if key not in fields:
            hint = (f" ({PROFILE_KEY}= takes a profile: {', '.join(ITERATION_PROFILES)})"
                    if key == PROFILE_KEY else "")
            raise EngineError(
                f"unknown parameter {key!r} ({piece!r}) for attack {name!r} {where};"
                f" valid parameters: {', '.join(fields)}{hint}"
            )
        info = fields[key].metadata["param"]
        try:
            if info.kind == "bound":
                text, _label = split_bound(text)
                if is_preset(text):
                    presets[key] = text.lower()  # resolved below, once ``norm`` is known
                    continue
            values[key] = info.check(key, info.parse(key, text))
        except EngineError as exc:
            raise EngineError(f"bad value in {piece!r} {where}: {exc}") from None

    # Named bounds belong to a threat model: the attack's own, or for attacks with a ``norm``
    # parameter (APGD, Square) the Lp threat model that norm names.
    table = str(values.get("norm", fields["norm"].default)) if "norm" in fields else name
    for key, text in presets.items():
        info = fields[key].metadata["param"]
        try:
            values[key] = info.check(key, resolve_preset(table, text))
        except EngineError as exc:
            raise EngineError(f"bad value in '{key}={text}' {where}: {exc}") from None
    if "bound" in presets and name in AUTO_LPIPS_ATTACKS:
        _table4_lpips(name, presets["bound"], values, spec)

    missing = [
        n for n, f in fields.items()
        if n not in values and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        example = ",".join(f"{n}=..." for n in missing)
        raise EngineError(
            f"attack spec {spec!r} is missing required parameter(s) {', '.join(missing)};"
            f" e.g. '{name}:{example}'"
        )
    try:
        return cls(**values)
    except EngineError as exc:
        raise EngineError(f"invalid attack spec {spec!r}: {exc}") from None


def _profile_iterations(name: str, text: str, pieces: list[tuple[str, str]], spec: str) -> int:
    """``num_iterations`` of the profile ``iterations=text`` for attack ``name``."""
    profile = ITERATION_PROFILES[text.strip().lower()]
    if any(key == "num_iterations" for key, _ in pieces):
        raise EngineError(f"attack spec {spec!r} gives both iterations={text} and"
                          " num_iterations; keep one")
    if name not in profile:
        raise EngineError(f"iteration profile {text!r} has no count for {name!r} (it covers"
                          f" {', '.join(sorted(profile))}); give num_iterations instead")
    return profile[name]


def _table4_lpips(name: str, preset: str, values: dict[str, object], spec: str) -> None:
    """Give a perceptual attack with a named bound the LPIPS network the bound is measured
    with, or explain why its ``lpips_model`` cannot have that bound."""
    from ..models import parse_network

    arch = NAMED_BOUND_LPIPS[preset]
    given = values.get("lpips_model")
    if given is None:
        if arch == "alexnet_cifar":
            raise EngineError(
                f"{name}:bound={preset} is PAT's CIFAR-10 bound (table 2), measured with PAT's"
                " CIFAR-10 AlexNet LPIPS network; name its weights file with"
                " lpips_model=alexnet_cifar:/path/to/weights.pt (or give a numeric bound)"
                f" — in spec {spec!r}"
            )
        values["lpips_model"] = str(parse_network(arch))
        return
    chosen = "self" if given == "self" else parse_network(str(given)).arch
    if chosen != arch:
        why = ("a self-bounded LPIPS distance (the classifier's own features) is about half"
               " of AlexNet's for the same images" if chosen == "self" else
               f"LPIPS in {chosen} is a different scale from LPIPS in {arch}")
        raise EngineError(
            f"bound={preset} of {name} is PAT's table-{'2' if preset == 'cifar10' else '4'}"
            f" bound, measured with an {arch} LPIPS network, but lpips_model={given}: {why},"
            f" so the named bound would not mean the paper's perceptual size. Use"
            f" lpips_model={arch}{':/path/to/weights.pt' if arch == 'alexnet_cifar' else ''}"
            f" (or leave it out), or give a numeric bound — in spec {spec!r}"
        )


# --------------------------------------------------------------------------------------------
# Display: short condition labels from the structured fields (threat model, bound, label)
# --------------------------------------------------------------------------------------------

#: How people write each threat model (PAT's names); unknown ones are shown as registered.
THREAT_MODEL_TITLES: Mapping[str, str] = MappingProxyType({
    "linf": "L∞", "l2": "L2", "jpeg": "JPEG", "stadv": "StAdv", "recoloradv": "ReColorAdv",
    "ppgd": "PPGD", "lpa": "LPA", "fast_lpa": "Fast-LPA", "lpips_oa": "LPIPS-OA",
    "lagrangian": "Lagrangian", "apgd_ce": "APGD-CE", "apgd_dlr": "APGD-DLR",
    "square": "Square",
})

#: Units of each threat model's ``bound`` (see the attack modules' docstrings).
BOUND_UNITS: Mapping[str, str] = MappingProxyType({
    "linf": "L∞ norm, pixels in [0, 1]",
    "l2": "L2 norm, pixels in [0, 1]",
    "lpips_oa": "L∞ norm, pixels in [0, 1]",
    "apgd_ce": "Lp norm, pixels in [0, 1]",
    "apgd_dlr": "Lp norm, pixels in [0, 1]",
    "square": "Lp norm, pixels in [0, 1]",
    "jpeg": "JPEG DCT coefficients (Kang et al.)",
    "stadv": "flow, grid_sample coordinates ([-1, 1] across the image)",
    "recoloradv": "normalised CIELUV units",
    "ppgd": "LPIPS distance",
    "lpa": "LPIPS distance",
    "fast_lpa": "LPIPS distance",
    "lagrangian": "Lagrangian-AT units",
})


def threat_model_title(threat_model: str) -> str:
    """``'linf'`` → ``'L∞'``, ``'l2'`` → ``'L2'``; an unknown name as it is."""
    return THREAT_MODEL_TITLES.get(threat_model, threat_model)


def bound_units(threat_model: str) -> str:
    """The units of ``threat_model``'s bound, e.g. ``'L2 norm, pixels in [0, 1]'``."""
    return BOUND_UNITS.get(threat_model, "the threat model's own units")


def condition_title(threat_model: str, bound: float | None, label: str = "") -> str:
    """A short label for a condition from its structured fields (never its spec text):
    ``condition_title('l2', 1200/255, 'medium')`` → ``'L2 · medium (ε = 4.71)'``;
    without a label ``'L2 (ε = 4.71)'``; without a bound ``'L2 · medium'``. ``ε`` is the
    bound in :func:`bound_units`, to 3 significant figures."""
    text = threat_model_title(threat_model)
    if label:
        text += f" · {label}"
    if bound is not None:
        text += f" (ε = {bound:.3g})"
    return text
