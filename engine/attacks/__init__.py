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
    ParametricAttack,
    check_labels,
    margin_loss,
    noise_normal,
    noise_uniform,
    param,
    parse_bound,
)
from .color import ReColorAdv
from .jpeg import JPEGLinf
from .lagrangian import LagrangianAttack
from .lp import L2PGD, LinfPGD
from .perceptual import (
    FastLagrangianPerceptualAttack,
    LagrangianPerceptualAttack,
    LpipsAttack,
    LpipsOracleInvariantAttack,
    PerceptualPGD,
)
from .registry import ATTACKS, as_attack, available_attacks, parse_attack, register_attack
from .spatial import StAdv
from .strong import APGDCE, APGDDLR, Square

__all__ = [
    "APGDCE",
    "APGDDLR",
    "ATTACKS",
    "LOSSES",
    "Attack",
    "AttackResult",
    "BestIterate",
    "ParametricAttack",
    "FastLagrangianPerceptualAttack",
    "JPEGLinf",
    "L2PGD",
    "LagrangianAttack",
    "LagrangianPerceptualAttack",
    "LinfPGD",
    "LpipsAttack",
    "LpipsOracleInvariantAttack",
    "PerceptualPGD",
    "ReColorAdv",
    "Square",
    "StAdv",
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
