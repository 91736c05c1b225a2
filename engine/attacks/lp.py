"""L∞ and L2 projected gradient descent (Madry et al., 2018).

Bounds are in ``[0, 1]`` pixel units: the PAT paper's table 4 states ImageNet bounds for
images in ``[0, 255]``, so its L∞ bound 8 is ``bound=8/255`` here and its L2 bound 1200 is
``bound=1200/255``.

Written by hand rather than taken from torchattacks: we need the shared
:class:`~engine.attacks.base.Attack` protocol (generator-seeded starts, targeted/margin
options, best-iterate keeping, specs), and the loop is a dozen lines.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Attack, BestIterate, Model, noise_normal, noise_uniform, per_image_norm
from .registry import register_attack


@dataclass(frozen=True, kw_only=True)
class _LpPGD(Attack):
    """PGD loop shared by the Lp threat models.

    Starts at a random point of the ball (``random_start``) or at the input, takes
    ``num_iterations`` steps of ``step_size`` up the objective, projects onto the ball and
    clamps to ``[0, 1]`` after each. Returns, per image, the iterate with the highest success
    margin among the start and all iterates (so an image that was ever misclassified — or
    classified as the target — stays so); that is the last iterate whenever the margin only
    grew.
    """

    @abstractmethod
    def _random_delta(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """A random perturbation inside the ball."""

    @abstractmethod
    def _step(self, grad: Tensor) -> Tensor:
        """The ascent step for gradient ``grad`` (``step_size`` long in the ball's norm)."""

    @abstractmethod
    def _project(self, delta: Tensor) -> Tensor:
        """Project a perturbation onto the ball of radius ``bound``."""

    def perturb(self, model: Model, images: Tensor, labels: Tensor,
                generator: torch.Generator | None) -> Tensor:
        if self.random_start:
            adversarial = (images + self._random_delta(images, generator)).clamp(0, 1)
        else:
            adversarial = images.clone()
        best = BestIterate(adversarial)
        for _ in range(self.num_iterations):
            grad, logits = self.input_gradient(model, adversarial, labels)
            best.update(adversarial, self.success_margin(logits, labels))
            delta = self._project(adversarial - images + self._step(grad))
            adversarial = (images + delta).clamp(0, 1)
        with torch.no_grad():
            best.update(adversarial, self.success_margin(model(adversarial), labels))
        return best.images


@register_attack("linf", "L∞ PGD (Madry et al. 2018): |x' - x|_∞ <= bound, bound in [0, 1] units")
@dataclass(frozen=True, kw_only=True)
class LinfPGD(_LpPGD):
    """L∞ PGD: sign-gradient steps, clipped to ``[-bound, bound]`` per pixel.

    ``bound`` is in ``[0, 1]`` pixel units (PAT table 4's ImageNet L∞ bound 8 → ``8/255``).
    The random start is uniform in the L∞ ball. Default ``step_size`` is
    ``2.5 * bound / num_iterations``.
    """

    def perturbation_size(self, natural: Tensor, other: Tensor, model: Model | None = None
                          ) -> Tensor:
        """Per-image L∞ distance ``max |other - natural|`` (``[N]``)."""
        return (other - natural).flatten(1).abs().amax(dim=1)

    def _random_delta(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        return (2 * noise_uniform(images.shape, generator, images) - 1) * self.bound

    def _step(self, grad: Tensor) -> Tensor:
        return self.step_size * grad.sign()

    def _project(self, delta: Tensor) -> Tensor:
        return delta.clamp(-self.bound, self.bound)


@register_attack("l2", "L2 PGD (Madry et al. 2018): |x' - x|_2 <= bound per image, [0, 1] units")
@dataclass(frozen=True, kw_only=True)
class L2PGD(_LpPGD):
    """L2 PGD: steps along the per-image L2-normalised gradient, projected onto the L2 ball.

    ``bound`` is the L2 norm of the whole ``[3, H, W]`` perturbation in ``[0, 1]`` pixel
    units (PAT table 4's ImageNet L2 bound 1200 → ``1200/255``). The random start is a
    uniformly random direction with a radius uniform in ``[0, bound]``. Default
    ``step_size`` is ``2.5 * bound / num_iterations``.
    """

    def perturbation_size(self, natural: Tensor, other: Tensor, model: Model | None = None
                          ) -> Tensor:
        """Per-image L2 distance over all ``3 * H * W`` values (``[N]``)."""
        return (other - natural).flatten(1).norm(dim=1)

    def _random_delta(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        direction = noise_normal(images.shape, generator, images)
        direction = direction / per_image_norm(direction).clamp_min(1e-12)
        radius = noise_uniform((images.shape[0], 1, 1, 1), generator, images) * self.bound
        return direction * radius

    def _step(self, grad: Tensor) -> Tensor:
        return self.step_size * grad / per_image_norm(grad).clamp_min(1e-12)

    def _project(self, delta: Tensor) -> Tensor:
        norm = per_image_norm(delta)
        return delta * (self.bound / norm.clamp_min(1e-12)).clamp(max=1.0)
