"""The Lagrangian attack of Azizmalayeri & Rohban (Lagrangian-AT, section 3, Algorithm 1).

A training-time attack with no hard bound: it ascends ``margin(f(x + δ), y) − λ'·‖δ‖₂`` for
``num_iterations`` (5) steps, the multiplier rising ``λ' = lam·c^(1 − i/N)`` (from ``lam·c``
towards ``lam``) while the step shrinks ``α' = α·c^(i/N)`` (from ``α`` towards ``α·c``),
``c = decay = 0.1``. Each gradient is divided by its largest absolute entry, so a step moves
every pixel by at most ``α'``.

Bound semantics, as in the authors' code (``Lag_attack.py``, where the step is called
``bound``): ``bound`` is the initial step ``α`` in ``[0, 1]`` pixel units; ``step_size``
defaults to it and, if given, replaces it. The perturbation size is not bounded (only
penalised), so :meth:`perturbation_size` is None; the total L∞ movement is at most
``Σ α·c^(i/N)`` plus the start noise. The authors train CIFAR-10 with ``bound=0.15, lam=2``
(preset ``bound=cifar10``) and ImageNet-100 with ``bound=0.25, lam=0.45``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import EngineError
from .base import LOSSES, Attack, Model, noise_normal, param
from .registry import register_attack

#: Standard deviation of the random start ``δ ~ N(0, σ²)`` (0.01 in the authors' code).
START_NOISE = 0.01


@register_attack("lagrangian",
                 "Lagrangian-AT attack: margin − λ‖δ‖₂, no hard bound; bound = first step α")
@dataclass(frozen=True, kw_only=True)
class LagrangianAttack(Attack):
    """Lagrangian-AT's attack (Azizmalayeri & Rohban, Algorithm 1) — for training.

    Parameters: ``bound`` = initial step ``α`` (``[0, 1]`` pixels, the most any pixel moves
    in the first step); ``num_iterations`` = N (default 5, the paper's minimum); ``lam`` = λ
    (default 2, the authors' CIFAR-10 value); ``decay`` = c (0.1); ``kappa`` clamps the margin
    loss (1, as the authors' code). The start is ``x + N(0, 0.01²)`` (``random_start``).
    Returns the last iterate. Cost: one forward and one backward pass per step, like PGD.
    """

    num_iterations: int = param(5, kind="int", minimum=1,
                                doc="optimisation steps (the paper uses 5)")
    loss: str = param("margin", kind="choice", choices=LOSSES,
                      doc="loss: margin (the paper's, default) or ce")
    lam: float = param(2.0, kind="float", minimum=0.0,
                       doc="Lagrange multiplier λ of the ‖δ‖₂ penalty (ramps from lam·decay)")
    decay: float = param(0.1, kind="float", minimum=0.0,
                         doc="schedule base c in (0, 1]: λ' = lam·c^(1−i/N), α' = α·c^(i/N)")
    kappa: float = param(1.0, kind="float", minimum=0.0,
                         doc="clamp of the margin loss (1 in the authors' code)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.decay <= 1:
            raise EngineError(f"decay must be in (0, 1], got {self.decay!r}")

    def default_step_size(self) -> float:
        """``bound``: the paper's initial step ``α``."""
        return self.bound

    def perturbation_size(self, natural: Tensor, other: Tensor, model: Model | None = None
                          ) -> None:
        """None: the Lagrangian attack penalises ``‖δ‖₂`` but has no bound to compare with."""
        return None

    def perturb(self, model: Model, images: Tensor, labels: Tensor,
                generator: torch.Generator | None) -> Tensor:
        if self.random_start:
            noise = START_NOISE * noise_normal(images.shape, generator, images)
            adversarial = (images + noise).clamp(0, 1)
        else:
            adversarial = images.clone()
        steps = self.num_iterations
        for i in range(steps):
            lam = self.lam * self.decay ** (1 - i / steps)
            size = self.step_size * self.decay ** (i / steps)
            leaf = adversarial.detach().requires_grad_(True)
            value = self.objective(model(leaf), labels)
            if self.loss == "margin":
                value = value.clamp(max=self.kappa)
            penalty = torch.linalg.vector_norm((leaf - images).flatten(1), dim=1)
            (gradient,) = torch.autograd.grad((value - lam * penalty).sum(), leaf)
            peak = gradient.flatten(1).abs().amax(dim=1).clamp_min(1e-12)
            step = size * gradient / peak.view(-1, 1, 1, 1)
            adversarial = (adversarial + step).clamp(0, 1)
        return adversarial


