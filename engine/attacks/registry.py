"""Attack registry and spec strings.

A spec is ``NAME:key=value,key=value,...``, e.g. ``linf:bound=8/255,num_iterations=40`` or
``l2:bound=1.0,num_iterations=10,step_size=0.25,targeted=true,loss=margin``. Values are
integers, floats, fractions ``a/b``, ``true``/``false`` or plain strings, as each parameter
declares (:func:`engine.attacks.base.param`). Parameters left out take their defaults;
``Attack.spec`` writes them all back, and ``parse_attack(a.spec).spec == a.spec``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .base import Attack
from .spec import build_attack

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
    unknown ``loss``), and a named bound of ``ppgd``/``lpa``/``fast_lpa`` with an LPIPS
    network it is not measured in. The grammar, named bounds and labels live in
    :mod:`engine.attacks.spec`.
    """
    return build_attack(spec, ATTACKS)


def as_attack(attack: str | Attack) -> Attack:
    """Return ``attack`` if it already is an :class:`Attack`, else parse it as a spec."""
    return attack if isinstance(attack, Attack) else parse_attack(attack)
