"""Strong Lp attacks from torchattacks behind our interface: APGD-CE, APGD-DLR and Square.

These are the attacks of AutoAttack (Croce & Hein 2020), used by PAT (and everyone since) to
evaluate L∞/L2 robustness: APGD is PGD with an adaptive step size and momentum, started at
``2 · bound`` and halved when progress stalls; DLR is a scale-invariant margin loss; Square is a
gradient-free random search over square-shaped updates. ``bound`` is in ``[0, 1]`` pixel units
for both norms, as in :mod:`engine.attacks.lp` (``norm=linf``: per-pixel bound, ``norm=l2``:
L2 norm of the whole ``[3, H, W]`` perturbation).

The optimisation loops are torchattacks' own; what this module adds, and why:

- Randomness: torchattacks seeds torch's *global* RNG with its ``seed`` argument (and draws its
  noise from it). We derive that seed from the call's ``generator`` (one ``randint`` draw,
  so the same generator state gives the same attack), and run torchattacks inside
  :func:`torch.random.fork_rng` so the caller's global RNG state is left as it was.
- The model: torchattacks calls ``model.eval()`` / ``model.train()`` on what it is given, and
  ``train()`` would flip every submodule. It gets an adapter module that holds the model
  without registering it, so only the adapter's flag changes; our
  :class:`~engine.attacks.base.Attack` already runs the real model in eval mode and restores
  each submodule's flag. torchattacks only takes gradients w.r.t. the input
  (``torch.autograd.grad``), so parameter ``.grad`` stays untouched. The adapter also makes a
  plain callable work (torchattacks reads ``model.training`` and ``model.parameters()``) and
  casts inputs to the images' dtype (torchattacks draws float32 noise).
- Failures: torchattacks' public ``perturb``/``__call__`` returns the *clean* image wherever
  the attack fails. For stimulus generation that is wrong (the pair would be identical), so we
  call its per-restart ``attack_single_run`` (torchattacks 3.5.1, pinned in constraints.txt)
  and keep, per image, the candidate with the highest success margin
  (:class:`~engine.attacks.base.BestIterate`): a successful iterate when there is one, else
  the best-loss iterate.
- Device: torchattacks takes its device from the model's first parameter; the adapter puts
  an empty marker parameter on the images' device, so device follows the inputs.

Named bounds (``bound=large``) resolve in the Lp threat model named by ``norm``:
``apgd_ce:bound=large,norm=l2`` is PAT's large L2 bound, ``2400/255``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import EngineError
from .base import LOSSES, Attack, BestIterate, Model, param
from .registry import register_attack

#: Norm names of the ``norm`` parameter, and torchattacks' spelling of each.
NORMS = {"linf": "Linf", "l2": "L2"}


def derive_seed(generator: torch.Generator | None) -> int:
    """A seed for torchattacks drawn from ``generator`` (torch's global RNG when None)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device))


@contextlib.contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """Run with torch's global RNG state saved and restored afterwards (CPU, and the CUDA
    devices torchattacks may reseed: the images' device and the current one). A CUDA seed
    queued before CUDA is initialised cannot be undone; it only sets the default seed."""
    devices: set[int] = set()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    if device.type == "cuda":
        devices.add(device.index if device.index is not None else torch.cuda.current_device())
    with torch.random.fork_rng(devices=sorted(devices)):
        yield


class TorchattacksModel(nn.Module):
    """What torchattacks is given: calls ``model`` without registering it as a submodule
    (so torchattacks' ``eval()``/``train()`` calls stay on this adapter), has one empty
    parameter on ``device`` (torchattacks' device detection), and casts inputs to ``dtype``."""

    def __init__(self, model: Model, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.__dict__["wrapped"] = model  # plain attribute, not a submodule
        self.device_marker = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.wrapped(x.to(self.dtype))


@dataclass(frozen=True, kw_only=True)
class _TorchattacksLp(Attack):
    """Shared parameters and checks of the torchattacks wrappers."""

    norm: str = param("linf", kind="choice", choices=tuple(NORMS), doc="threat model: linf or l2")
    n_restarts: int = param(1, kind="int", minimum=1, doc="random restarts (>= 1)")

    #: Whether the wrapped attack supports ``targeted=true``.
    supports_targeted = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.random_start:
            raise EngineError(
                f"{self.name} always starts from a random point; random_start must be true"
            )
        if self.targeted and not self.supports_targeted:
            raise EngineError(
                f"{self.name} does not support targeted=true (torchattacks' untargeted"
                " attack); use linf/l2 PGD or square for targeted attacks"
            )
        if not math.isclose(self.step_size, self.default_step_size(), rel_tol=1e-12,
                            abs_tol=1e-15):
            raise EngineError(
                f"{self.name} chooses its own step size (2 * bound = {self.default_step_size()!r},"
                f" then adapted); leave step_size out, got {self.step_size!r}"
            )

    def default_step_size(self) -> float:
        """``2 · bound``: APGD's initial step (Square flips ``±bound``, a change of 2·bound)."""
        return 2 * self.bound

    def perturbation_size(self, natural: Tensor, other: Tensor, model: Model | None = None
                          ) -> Tensor:
        """Per-image L∞ or L2 distance (per ``norm``) in ``[0, 1]`` units (``[N]``)."""
        difference = (other - natural).flatten(1)
        if self.norm == "linf":
            return difference.abs().amax(dim=1)
        return difference.norm(dim=1)

    def _make(self, module: Any, model: Model, images: Tensor, seed: int) -> Any:
        """Build the torchattacks attack object (subclasses)."""
        raise NotImplementedError

    def _single_run(self, attack: Any, images: Tensor, labels: Tensor) -> list[Tensor]:
        """One torchattacks restart on a sub-batch; returns candidate adversarial batches."""
        raise NotImplementedError

    def perturb(self, model: Model, images: Tensor, labels: Tensor,
                generator: torch.Generator | None) -> Tensor:
        import torchattacks  # ~0.5 s to import; only needed here

        seed = derive_seed(generator)
        adapter = TorchattacksModel(model, images.device, images.dtype)
        attack = self._make(torchattacks, adapter, images, seed)
        best = BestIterate(images)
        todo = torch.arange(images.shape[0], device=images.device)
        with isolated_rng(images.device):
            torch.manual_seed(seed)  # what torchattacks' own perturb() does before restarts
            for restart in range(self.n_restarts):
                if restart > 0:  # later restarts only where no success yet, as torchattacks
                    todo = (best.margin <= 0).nonzero().squeeze(1)
                    if todo.numel() == 0:
                        break
                for found in self._single_run(attack, images[todo], labels[todo]):
                    candidate = best.images.clone()
                    candidate[todo] = found.detach().to(images.dtype).clamp(0, 1)
                    with torch.no_grad():
                        margin = torch.full_like(best.margin, float("-inf"))
                        margin[todo] = self.success_margin(model(candidate[todo]), labels[todo])
                    best.update(candidate, margin)
        return best.images


@dataclass(frozen=True, kw_only=True)
class _APGD(_TorchattacksLp):
    num_iterations: int = param(100, kind="int", minimum=1,
                                doc="APGD iterations per restart (>= 1; AutoAttack: 100)")
    rho: float = param(0.75, kind="float", minimum=0.0,
                       doc="APGD step-size halving threshold rho (AutoAttack: 0.75)")

    def _make(self, module: Any, model: Model, images: Tensor, seed: int) -> Any:
        if self.loss == "dlr":
            with torch.no_grad():
                classes = model(images[:1]).shape[1]
            if classes < 3:
                raise EngineError(f"apgd_dlr needs at least 3 classes, the model has {classes}")
        return module.APGD(model, norm=NORMS[self.norm], eps=self.bound,
                           steps=self.num_iterations, n_restarts=1, seed=seed, loss=self.loss,
                           rho=self.rho)

    def _single_run(self, attack: Any, images: Tensor, labels: Tensor) -> list[Tensor]:
        # (best-loss iterate, accuracy, best loss, last misclassified iterate or the start)
        x_best, _, _, x_best_adv = attack.attack_single_run(images, labels)
        return [x_best, x_best_adv]


@register_attack(
    "apgd_ce",
    "APGD-CE (Croce & Hein 2020, torchattacks): adaptive-step PGD on cross-entropy, L∞ or L2"
    " bound in [0, 1] units",
)
@dataclass(frozen=True, kw_only=True)
class APGDCE(_APGD):
    """APGD with the cross-entropy loss (AutoAttack's first attack), wrapping torchattacks.

    ``bound`` in ``[0, 1]`` pixel units, ``norm`` ``linf`` or ``l2``, ``num_iterations``
    APGD steps per restart (default 100), ``n_restarts`` restarts on the images not yet
    misclassified, ``rho`` the step-size schedule threshold. Untargeted only; always a
    random start; the step size is APGD's own (``step_size`` must stay at ``2 · bound``).
    Seeding and model-mode handling: see the module docstring.
    """

    loss: str = param("ce", kind="choice", choices=("ce",), doc="loss: ce (fixed)")


@register_attack(
    "apgd_dlr",
    "APGD-DLR (Croce & Hein 2020, torchattacks): adaptive-step PGD on the DLR margin loss, L∞"
    " or L2 bound in [0, 1] units",
)
@dataclass(frozen=True, kw_only=True)
class APGDDLR(_APGD):
    """APGD with the scale-invariant DLR loss, wrapping torchattacks; needs >= 3 classes.

    Parameters and handling as :class:`APGDCE`.
    """

    loss: str = param("dlr", kind="choice", choices=("dlr",), doc="loss: dlr (fixed)")


@register_attack(
    "square",
    "Square attack (Andriushchenko et al. 2020, torchattacks): gradient-free random search,"
    " L∞ or L2 bound in [0, 1] units",
)
@dataclass(frozen=True, kw_only=True)
class Square(_TorchattacksLp):
    """Square attack (query-based, no gradients), wrapping torchattacks.

    ``bound`` in ``[0, 1]`` pixel units, ``norm`` ``linf`` or ``l2``, ``num_iterations`` is
    the query budget per restart (default 5000, AutoAttack's), ``p_init`` the initial
    fraction of pixels a square covers, ``loss`` ``margin`` (default) or ``ce``. Supports
    ``targeted=true``. A restart stops early on the images it has already fooled.
    """

    num_iterations: int = param(5000, kind="int", minimum=1,
                                doc="queries per restart (>= 1; AutoAttack: 5000)")
    loss: str = param("margin", kind="choice", choices=LOSSES, doc="loss: margin or ce")
    p_init: float = param(0.8, kind="float", minimum=0.0,
                          doc="initial fraction of the image a square covers (0.8)")
    supports_targeted = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.p_init <= 1:
            raise EngineError(f"p_init must be in (0, 1], got {self.p_init!r}")

    def _make(self, module: Any, model: Model, images: Tensor, seed: int) -> Any:
        attack = module.Square(model, norm=NORMS[self.norm], eps=self.bound,
                               n_queries=self.num_iterations, n_restarts=1,
                               p_init=self.p_init, loss=self.loss, seed=seed)
        if self.targeted:
            attack.set_mode_targeted_by_label(quiet=True)
        attack.init_hyperparam(images)
        return attack

    def _single_run(self, attack: Any, images: Tensor, labels: Tensor) -> list[Tensor]:
        _, x_best = attack.attack_single_run(images, labels)  # best-margin iterate
        return [x_best]
