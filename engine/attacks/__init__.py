"""Adversarial attacks (threat models) behind one interface.

Every attack is an :class:`Attack` (a frozen dataclass of the PAT paper's parameter names)
called as ``attack(model, images, labels, generator=g) -> AttackResult``; specs such as
``linf:bound=8/255,num_iterations=40`` are parsed by :func:`parse_attack`. Bounds are in
``[0, 1]`` image units unless an attack's docstring says otherwise.
"""

from .base import (
    LOSSES,
    Attack,
    AttackResult,
    BestIterate,
    check_labels,
    margin_loss,
    noise_normal,
    noise_uniform,
    param,
    parse_bound,
)
from .lp import L2PGD, LinfPGD
from .registry import ATTACKS, as_attack, available_attacks, parse_attack, register_attack

__all__ = [
    "ATTACKS",
    "LOSSES",
    "Attack",
    "AttackResult",
    "BestIterate",
    "L2PGD",
    "LinfPGD",
    "as_attack",
    "available_attacks",
    "check_labels",
    "margin_loss",
    "noise_normal",
    "noise_uniform",
    "param",
    "parse_attack",
    "parse_bound",
    "register_attack",
]
