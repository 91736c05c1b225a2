"""Attack registry and spec strings.

A spec is ``NAME:key=value,key=value,...``, e.g. ``linf:bound=8/255,num_iterations=40`` or
``l2:bound=1.0,num_iterations=10,step_size=0.25,targeted=true,loss=margin``. Values are
integers, floats, fractions ``a/b``, ``true``/``false`` or plain strings, as each parameter
declares (:func:`engine.attacks.base.param`). Parameters left out take their defaults;
``Attack.spec`` writes them all back, and ``parse_attack(a.spec).spec == a.spec``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING
from typing import TypeVar

from ..errors import EngineError
from .base import Attack
from .presets import is_preset, resolve_preset

#: ``{name: attack class}``; filled by :func:`register_attack`.
ATTACKS: dict[str, type[Attack]] = {}

A = TypeVar("A", bound=type[Attack])


def register_attack(name: str, summary: str | None = None) -> Callable[[A], A]:
    """Class decorator registering an :class:`Attack` subclass under ``name``.

    ``summary`` is the one-line description shown by :func:`available_attacks`; by default
    the first line of the class docstring.
    """
    if not name or not name.isidentifier() or name != name.lower():
        raise ValueError(f"attack names must be lowercase identifiers, got {name!r}")

    def decorate(cls: A) -> A:
        if name in ATTACKS and ATTACKS[name] is not cls:
            raise ValueError(f"attack {name!r} is already registered to {ATTACKS[name]!r}")
        cls.name = name
        cls.summary = summary or (cls.__doc__ or "").strip().splitlines()[0]
        ATTACKS[name] = cls
        return cls

    return decorate


def available_attacks() -> dict[str, str]:
    """``{name: one-line description}`` of every registered attack, sorted by name."""
    return {name: ATTACKS[name].summary for name in sorted(ATTACKS)}


def _names() -> str:
    return ", ".join(sorted(ATTACKS))


def parse_attack(spec: str) -> Attack:
    """Build an attack from a spec string such as ``linf:bound=8/255,num_iterations=40``.

    Raises :class:`EngineError` naming the offending piece for: an unknown attack name, an
    unknown parameter (listing the valid ones), a piece without ``=`` or with an empty
    value, a repeated parameter, a missing required parameter, and invalid values (e.g. a
    non-numeric or negative bound, ``num_iterations < 1``, a negative ``step_size``, an
    unknown ``loss``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EngineError(
            f"attack spec must be a non-empty string like 'linf:bound=8/255', got {spec!r};"
            f" attacks: {_names()}"
        )
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    cls = ATTACKS.get(name)
    if cls is None:
        raise EngineError(f"unknown attack {name!r} in spec {spec!r}; attacks: {_names()}")
    fields = {f.name: f for f in cls.parameter_fields()}
    valid = ", ".join(fields)

    values: dict[str, object] = {}
    presets: dict[str, str] = {}
    if rest.strip():
        for raw_piece in rest.split(","):
            piece = raw_piece.strip()
            where = f"in attack spec {spec!r}"
            if not piece:
                raise EngineError(f"empty parameter (stray ',') {where}; write key=value pairs")
            key, eq, text = piece.partition("=")
            key, text = key.strip(), text.strip()
            if not eq:
                raise EngineError(f"parameter {piece!r} {where} has no '='; write key=value")
            if not key:
                raise EngineError(f"parameter {piece!r} {where} has no name before '='")
            if key not in fields:
                raise EngineError(
                    f"unknown parameter {key!r} ({piece!r}) for attack {name!r} {where};"
                    f" valid parameters: {valid}"
                )
            if not text:
                raise EngineError(f"parameter {piece!r} {where} has an empty value")
            if key in values:
                raise EngineError(f"parameter {key!r} is given twice {where} ({piece!r})")
            info = fields[key].metadata["param"]
            try:
                if info.kind == "bound" and is_preset(text):
                    presets[key] = text  # resolved below, once ``norm`` is known
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
            raise EngineError(
                f"bad value in '{key}={text}' in attack spec {spec!r}: {exc}"
            ) from None

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


def as_attack(attack: str | Attack) -> Attack:
    """Return ``attack`` if it already is an :class:`Attack`, else parse it as a spec."""
    return attack if isinstance(attack, Attack) else parse_attack(attack)
