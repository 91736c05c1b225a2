"""The attack interface shared by every threat model.

An attack is a frozen dataclass of its parameters (the PAT paper's names: ``bound``,
``num_iterations``, ``step_size``, ...) and is called on a model and a batch::

    attack = LinfPGD(bound=8 / 255, num_iterations=40)
    result = attack(model, images, labels, generator=torch.Generator().manual_seed(0))
    result.adversarial  # [N, 3, H, W] in [0, 1], same device/dtype as ``images``
    result.success      # [N] bool

Parameters are declared with :func:`param`, which records how each one is parsed from and
written to a spec string (see :mod:`engine.attacks.registry`) and what values are valid, so a
new attack only declares its fields and implements :meth:`Attack.perturb`.

Units: every bound is stated in the units of images in ``[0, 1]`` unless the attack's
docstring says otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_images
from ..errors import EngineError

#: Loss names accepted by every attack's ``loss`` parameter.
LOSSES = ("ce", "margin")

#: The modes an attack runs in (:meth:`Attack.for_mode`): ``evaluation`` — its parameters as
#: given (PPGD/LPA stop at an image's first misclassified iterate by default, which is all a
#: robust accuracy needs); ``stimulus`` — study stimuli, which must use their bound (no early
#: exit, margin unclamped; :mod:`engine.stimuli` then scales each perturbation to the bound).
MODES = ("evaluation", "stimulus")
#: ``kappa`` in stimulus mode: a margin clamp no classifier's logits reach, i.e. unclamped (the
#: clamp at PAT's ``kappa=1`` stops the iterate as soon as the margin passes 1, far inside the
#: ball against a trained classifier). A finite number so that the spec stays parseable.
STIMULUS_KAPPA = 1e6

#: Parameter kinds understood by :func:`param` (they decide parsing, checking, formatting).
PARAM_KINDS = ("bound", "float", "int", "bool", "choice", "str")

_FORBIDDEN_IN_STRINGS = frozenset(",=: \t\n")

Model = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Parameter declarations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    """How one attack parameter is parsed, checked and written back into a spec."""

    kind: str
    doc: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None

    def parse(self, name: str, text: str) -> Any:
        """Parse the text of ``name=text``; raise :class:`EngineError` naming the problem."""
        if self.kind == "bound":
            return parse_bound(text)
        if self.kind == "float":
            return parse_number(name, text)
        if self.kind == "int":
            return parse_int(name, text)
        if self.kind == "bool":
            return parse_bool(name, text)
        if self.kind == "choice":
            return text.strip().lower()  # membership is checked by check()
        return text.strip()

    def check(self, name: str, value: Any) -> Any:
        """Validate ``value`` and return it normalised (ints become floats for float kinds)."""
        if self.kind in ("bound", "float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise EngineError(f"{name} must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise EngineError(f"{name} must be a finite number, got {value!r}")
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise EngineError(f"{name} must be an integer, got {value!r}")
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise EngineError(f"{name} must be true or false, got {value!r}")
        else:
            if not isinstance(value, str) or not value:
                raise EngineError(f"{name} must be a non-empty string, got {value!r}")
            if self.kind == "choice" and value not in (self.choices or ()):
                raise EngineError(
                    f"unknown {name} {value!r}; choose one of: {', '.join(self.choices or ())}"
                )
            if _FORBIDDEN_IN_STRINGS & set(value):
                raise EngineError(f"{name} {value!r} must not contain spaces, ',', '=' or ':'")
        if self.minimum is not None and value < self.minimum:
            raise EngineError(f"{name} must be >= {self.minimum:g}, got {value!r}")
        return value

    def format(self, value: Any) -> str:
        """The canonical spec text for ``value`` (floats use the shortest exact repr)."""
        if self.kind == "bool":
            return "true" if value else "false"
        if self.kind in ("bound", "float"):
            return repr(float(value))
        return str(value)


def param(
    default: Any = MISSING,
    *,
    kind: str,
    doc: str,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """Declare an attack parameter (a dataclass field that appears in the spec).

    ``kind`` is one of :data:`PARAM_KINDS`; ``minimum`` bounds numbers from below;
    ``choices`` lists the valid strings of a ``choice`` parameter. Leave ``default`` out for
    a required parameter.
    """
    if kind not in PARAM_KINDS:
        raise ValueError(f"unknown parameter kind {kind!r}; use one of {PARAM_KINDS}")
    info = ParamInfo(kind=kind, doc=doc, minimum=minimum, choices=choices)
    return field(default=default, metadata={"param": info})


def parse_number(name: str, text: str) -> float:
    """Parse a finite float written as ``0.5``, ``1e-3`` or a fraction ``a/b`` (``8/255``)."""
    raw = text.strip()
    numerator, slash, denominator = raw.partition("/")
    try:
        value = float(numerator) / float(denominator) if slash else float(raw)
    except ValueError:
        value = None
    except ZeroDivisionError:
        raise EngineError(f"{name} divides by zero: {raw!r}") from None
    if value is None or not math.isfinite(value):
        raise EngineError(f"{name} must be a number or a fraction like 8/255, got {raw!r}")
    return value


def parse_bound(text: str) -> float:
    """Parse a ``bound`` value: a number or fraction in ``[0, 1]`` image units.

    Named bounds (``small``, ``medium``, ``large``, ``cifar10``) depend on the threat model
    and are resolved by the registry (:mod:`engine.attacks.spec`) before this is called.
    """
    try:
        return parse_number("bound", text)
    except EngineError as exc:
        raise EngineError(f"{exc} (or a named bound: small, medium, large, cifar10)") from None


def parse_int(name: str, text: str) -> int:
    """Parse a base-10 integer (``40``; not ``40.0`` or ``4e1``)."""
    raw = text.strip()
    try:
        return int(raw, 10)
    except ValueError:
        raise EngineError(f"{name} must be an integer, got {raw!r}") from None


def parse_bool(name: str, text: str) -> bool:
    """Parse ``true`` / ``false`` (any case)."""
    raw = text.strip().lower()
    if raw in ("true", "false"):
        return raw == "true"
    raise EngineError(f"{name} must be true or false, got {text.strip()!r}")


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Carlini-Wagner margin ``max_{i != y} Z_i - Z_y`` per example (``[N, C]`` → ``[N]``).

    Positive exactly when some other class outscores ``y`` (the PAT paper's attack loss).
    """
    own = logits.gather(1, labels[:, None]).squeeze(1)
    is_own = F.one_hot(labels, logits.shape[1]).bool()
    others = logits.masked_fill(is_own, float("-inf")).amax(dim=1)
    return others - own


# --------------------------------------------------------------------------------------------
# Results and helpers for implementations
# --------------------------------------------------------------------------------------------


@dataclass
class AttackResult:
    """What an attack returns for a batch of ``N`` images.

    - ``adversarial``: ``[N, 3, H, W]`` in ``[0, 1]``, on the device/dtype of the input images.
    - ``success``: ``[N]`` bool. Untargeted: the model's argmax differs from the label
      (images the model already got wrong count as successes). Targeted: the argmax equals
      the target label.
    - ``logits``: ``[N, C]`` model output on ``adversarial`` (detached).
    - ``clean_logits``: ``[N, C]`` model output on the input images (detached).
    - ``size``: ``[N]`` size of each perturbation in the units of ``bound``, measured where
      the attack optimised it (Lp norm, LPIPS distance, DCT-coefficient / flow / colour-lattice
      L∞), or None where the threat model has no bound (e.g. ``lagrangian``).
    - ``extras``: attack-specific per-image tensors (flow field, lattice, coefficients and
      their sizes), detached; empty for most attacks.
    """

    adversarial: Tensor
    success: Tensor
    logits: Tensor
    clean_logits: Tensor
    size: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        """Fraction of the batch on which the attack succeeded."""
        return float(self.success.float().mean())


#: Reserved keys of :meth:`Attack.perturb_with_extras`'s extras: the logits ``[N, C]`` and the
#: size ``[N]`` of the returned images when the attack already has them (measured on exactly
#: those images); :meth:`Attack.__call__` then uses them instead of recomputing, and drops
#: the keys from :attr:`AttackResult.extras`.
KNOWN_LOGITS = "_logits"
KNOWN_SIZE = "_size"


class BestIterate:
    """Keeps, per image, the iterate with the highest success margin seen so far.

    The success margin is :func:`margin_loss` for untargeted attacks and its negative
    w.r.t. the target for targeted ones: it is positive exactly when the iterate succeeds,
    so any iterate that ever succeeded is kept over later ones that did not.
    """

    def __init__(self, start: Tensor):
        self.images = start.detach().clone()
        self.margin = torch.full(
            (start.shape[0],), float("-inf"), device=start.device, dtype=start.dtype
        )

    def update(self, images: Tensor, margin: Tensor) -> None:
        better = margin.detach() > self.margin
        self.margin = torch.where(better, margin.detach(), self.margin)
        shape = (-1, *([1] * (images.dim() - 1)))  # any [N, ...] tensor (images, parameters)
        self.images = torch.where(better.view(shape), images.detach(), self.images)

    def update_rows(self, rows: Tensor, images: Tensor, margin: Tensor) -> None:
        """:meth:`update` for the images ``rows`` (``[k]`` indices) only."""
        better = margin.detach().to(self.margin.dtype) > self.margin[rows]
        chosen = rows[better]
        self.margin[chosen] = margin.detach().to(self.margin.dtype)[better]
        self.images[chosen] = images.detach()[better].to(self.images.dtype)

    def set_rows(self, rows: Tensor, images: Tensor, margin: Tensor) -> None:
        """Make ``images`` the kept iterate of ``rows`` whatever was kept before."""
        self.margin[rows] = margin.detach().to(self.margin.dtype)
        self.images[rows] = images.detach().to(self.images.dtype)


def noise_uniform(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, like: Tensor
) -> Tensor:
    """Uniform ``[0, 1)`` noise drawn on the generator's device (CPU when None) in float32,
    then moved to ``like``'s device/dtype — so a CPU generator seeds CUDA attacks too and the
    noise does not depend on the input dtype."""
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def noise_normal(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, like: Tensor
) -> Tensor:
    """Standard normal noise; device/dtype handling as :func:`noise_uniform`."""
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def per_image_norm(x: Tensor) -> Tensor:
    """L2 norm of each image of ``[N, ...]``, shaped ``[N, 1, 1, 1]`` for broadcasting."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put ``model`` in eval mode, then restore every submodule's own train/eval flag."""
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def check_labels(labels: Any, images: Tensor, name: str = "labels") -> Tensor:
    """Check that ``labels`` is an int64 tensor ``[N]`` of non-negative class indices on the
    images' device, ``N`` matching the image batch."""
    if not isinstance(labels, Tensor):
        raise EngineError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.long:
        raise EngineError(f"{name} must be a LongTensor (int64 class indices), got {labels.dtype}")
    if labels.dim() != 1:
        raise EngineError(f"{name} must have shape [N], got {list(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise EngineError(
            f"got {labels.shape[0]} {name} for {images.shape[0]} images; they must match"
        )
    if labels.device != images.device:
        raise EngineError(
            f"{name} are on {labels.device} but images are on {images.device}; move them"
        )
    if int(labels.min()) < 0:
        raise EngineError(f"{name} must be non-negative class indices, got {int(labels.min())}")
    return labels


def _check_logits(logits: Any, labels: Tensor, name: str) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise EngineError(
            f"the model must return logits of shape [N, num_classes] = [{labels.shape[0]}, C],"
            f" got {shape}"
        )
    if logits.shape[1] < 2:
        raise EngineError(f"the model must return at least 2 classes, got {logits.shape[1]}")
    top = int(labels.max())
    if top >= logits.shape[1]:
        raise EngineError(
            f"{name} contain class {top} but the model returns only {logits.shape[1]} classes"
        )


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Attack(ABC):
    """Base class of every attack: parameters, validation, spec, and the call protocol.

    Subclasses are ``@dataclass(frozen=True, kw_only=True)``, declare extra parameters with
    :func:`param`, are registered with :func:`engine.attacks.registry.register_attack`, and
    implement :meth:`perturb`. Instances are immutable; their parameters are checked on
    construction (:class:`EngineError`).

    Parameters (paper names):

    - ``bound``: size of the threat model, ``>= 0``, in ``[0, 1]`` image units unless the
      attack says otherwise. ``bound=0`` returns the input images unchanged.
    - ``num_iterations``: optimisation steps, ``>= 1``.
    - ``step_size``: per-step size in the units of ``bound``; ``None`` picks the attack's
      default (:meth:`default_step_size`), which is resolved at construction so that
      :attr:`spec` records the number actually used. (``dataclasses.replace`` keeps that
      resolved number; pass ``step_size=None`` again to re-derive it.)
    - ``random_start``: start from a random point in the threat model, drawn from the
      ``generator`` given to the call.
    - ``targeted``: if true, ``labels`` passed to the call are *target* classes and the
      attack succeeds when the model predicts them; otherwise ``labels`` are the true
      classes and any other prediction is a success.
    - ``loss``: ``ce`` (cross-entropy) or ``margin`` (Carlini-Wagner
      ``max_{i != y} Z_i - Z_y``, the loss of the PAT paper), maximised (untargeted) or
      minimised towards the target (targeted).
    """

    #: Registry name, set by ``register_attack``.
    name: ClassVar[str] = ""
    #: One-line description, set by ``register_attack``.
    summary: ClassVar[str] = ""

    bound: float = param(kind="bound", minimum=0.0, doc="threat-model size (>= 0)")
    num_iterations: int = param(10, kind="int", minimum=1, doc="optimisation steps (>= 1)")
    step_size: float | None = param(
        None, kind="float", minimum=0.0, doc="step size in bound units (default per attack)"
    )
    random_start: bool = param(True, kind="bool", doc="start at a random point in the ball")
    targeted: bool = param(False, kind="bool", doc="labels are target classes")
    loss: str = param("ce", kind="choice", choices=LOSSES, doc="loss: ce or margin")

    # -- parameters ----------------------------------------------------------------------

    def __post_init__(self) -> None:
        for f in self.parameter_fields():
            value = getattr(self, f.name)
            if f.name == "step_size" and value is None:
                continue
            object.__setattr__(self, f.name, f.metadata["param"].check(f.name, value))
        if self.step_size is None:
            object.__setattr__(self, "step_size", float(self.default_step_size()))

    def default_step_size(self) -> float:
        """Step size used when none is given: ``2.5 * bound / num_iterations`` (Madry et al.)."""
        return 2.5 * self.bound / self.num_iterations

    @classmethod
    def parameter_fields(cls) -> tuple[dataclasses.Field, ...]:
        """The dataclass fields that are spec parameters, in spec order."""
        return tuple(f for f in dataclasses.fields(cls) if "param" in f.metadata)

    @classmethod
    def parameters(cls) -> dict[str, str]:
        """``{parameter name: one-line doc}`` in spec order."""
        return {f.name: f.metadata["param"].doc for f in cls.parameter_fields()}

    @property
    def spec(self) -> str:
        """Canonical spec with every parameter explicit, e.g.
        ``linf:bound=0.1,num_iterations=10,step_size=0.025,random_start=true,...``.
        ``parse_attack(a.spec).spec == a.spec``."""
        pieces = [
            f"{f.name}={f.metadata['param'].format(getattr(self, f.name))}"
            for f in self.parameter_fields()
        ]
        return f"{self.name}:{','.join(pieces)}"

    def describe(self) -> dict[str, Any]:
        """``{'attack': name, 'spec': spec, **parameters}`` for manifests (JSON-serialisable)."""
        return {
            "attack": self.name,
            "spec": self.spec,
            **{f.name: getattr(self, f.name) for f in self.parameter_fields()},
        }

    # -- modes ---------------------------------------------------------------------------

    def for_mode(self, mode: str) -> Attack:
        """This attack configured for ``mode`` (:data:`MODES`); :class:`EngineError` for
        another mode.

        ``evaluation`` returns ``self``. ``stimulus`` returns a copy with
        ``early_stop=false`` and ``kappa=`` :data:`STIMULUS_KAPPA` where the attack has those
        parameters (PPGD, LPA; Lagrangian's ``kappa`` too): every iteration runs and the
        margin keeps rewarding iterates further from the decision boundary, so the kept
        iterate (the highest margin inside the ball) lies near the ball's surface. Its
        :attr:`spec` records what ran. Attacks without these parameters are returned as they
        are (their sign / normalised steps already end on the ball's surface).
        """
        if mode not in MODES:
            raise EngineError(f"unknown attack mode {mode!r}; choose one of: {', '.join(MODES)}")
        if mode == "evaluation":
            return self
        names = {f.name for f in self.parameter_fields()}
        overrides: dict[str, Any] = {}
        if "early_stop" in names:
            overrides["early_stop"] = False
        if "kappa" in names:
            overrides["kappa"] = STIMULUS_KAPPA
        return dataclasses.replace(self, **overrides) if overrides else self

    def scale_perturbation(self, natural: Tensor, adversarial: Tensor,
                           extras: dict[str, Tensor], scale: Tensor
                           ) -> tuple[Tensor, Tensor | None]:
        """Images whose perturbation is ``scale`` (``[N]``, ≥ 0) times this attack's, for
        fitting stimuli to the bound (:func:`engine.stimuli.fit_to_bound`).

        ``adversarial`` and ``extras`` are this attack's result on ``natural``. Returns
        ``(images [N, 3, H, W] in [0, 1], size [N] in bound units or None)``; the size is
        given where the bound is on parameters that cannot be measured from the images
        (StAdv's flow, ReColorAdv's lattice), else None (measure the images with
        :meth:`perturbation_size`). Default: ``natural + scale·(adversarial − natural)``,
        clamped to ``[0, 1]`` — the image-space perturbation scaled.
        """
        view = scale.to(natural.dtype).view(-1, *([1] * (natural.dim() - 1)))
        return (natural + view * (adversarial - natural)).clamp(0, 1), None

    #: Key of :meth:`perturb_with_extras`'s extras holding the size in bound units, for
    #: threat models whose bound is on parameters rather than on the images (StAdv's flow).
    size_extra: ClassVar[str | None] = None

    def perturbation_size(self, natural: Tensor, other: Tensor, model: Model | None = None
                          ) -> Tensor | None:
        """Size of ``other - natural`` per image (``[N]``) in the units of ``bound``, or None
        where the threat model has no such closed-form size. Lp attacks return the norm.

        One signature for every attack: ``model`` is the attacked classifier, needed only
        where it defines the size (a self-bounded LPIPS attack); others ignore it."""
        return None

    def perturb_with_extras(
        self, model: Model, images: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`perturb` plus attack-specific per-image tensors (none by default)."""
        return self.perturb(model, images, labels, generator), {}

    # -- losses --------------------------------------------------------------------------

    def objective(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-example quantity the attack *ascends* (``[N]``): the loss for untargeted
        attacks, its negative w.r.t. the target for targeted ones."""
        if self.loss == "margin":
            value = margin_loss(logits, labels)
        else:
            value = F.cross_entropy(logits, labels, reduction="none")
        return -value if self.targeted else value

    def success_margin(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``[N]``, positive where the logits mean success (independent of ``loss``)."""
        margin = margin_loss(logits, labels)
        return -margin if self.targeted else margin

    def is_success(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``[N]`` bool: argmax != label (untargeted) or argmax == target (targeted)."""
        hit = logits.argmax(dim=1) == labels
        return hit if self.targeted else ~hit

    def input_gradient(self, model: Model, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient of ``objective(model(images)).sum()`` w.r.t. ``images`` (never touching
        parameter ``.grad``) and the detached logits of that forward pass."""
        images = images.detach().requires_grad_(True)
        logits = model(images)
        (grad,) = torch.autograd.grad(self.objective(logits, labels).sum(), images)
        return grad, logits.detach()

    # -- the call ------------------------------------------------------------------------

    def clean_logits(self, model: Model, images: Tensor) -> Tensor:
        """The model's logits on the natural ``images`` (called by :meth:`__call__` under
        ``no_grad`` before :meth:`perturb`); an attack that computes more in the same pass
        (a self-bounded LPIPS attack: φ(natural)) overrides it and keeps the rest."""
        return model(images)

    @abstractmethod
    def perturb(
        self, model: Model, images: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """Return adversarial images ``[N, 3, H, W]`` in ``[0, 1]`` within the threat model.

        Called by :meth:`__call__` with validated, detached ``images``, the model in eval
        mode, gradients enabled and ``bound > 0``. Draw all randomness from ``generator``
        through :func:`noise_uniform` / :func:`noise_normal`.
        """

    def __call__(
        self,
        model: Model,
        images: Tensor,
        labels: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> AttackResult:
        """Attack ``model`` on ``images`` (``[N, 3, H, W]`` in ``[0, 1]``).

        ``labels``: int64 ``[N]`` on the images' device — true classes, or target classes
        when ``targeted``. ``generator`` seeds the random start (a CPU generator works for
        inputs on any device; None uses torch's global RNG). The model runs in eval mode
        during the attack and each submodule's train/eval flag is restored afterwards;
        parameter ``.grad`` is never written. Works inside ``torch.no_grad()`` (not inside
        ``torch.inference_mode()``: :class:`EngineError`).
        """
        if torch.is_inference_mode_enabled():
            raise EngineError(
                "attacks need gradients and cannot run inside torch.inference_mode();"
                " call them outside it (torch.no_grad() is fine)"
            )
        check_images(images)
        check_labels(labels, images)
        # Tensors made under inference_mode cannot enter autograd; a clone outside it can.
        images = images.clone() if images.is_inference() else images.detach()
        labels = labels.clone() if labels.is_inference() else labels
        with eval_mode(model):
            with torch.no_grad():
                clean_logits = self.clean_logits(model, images)
            _check_logits(clean_logits, labels, "targets" if self.targeted else "labels")
            extras: dict[str, Tensor] = {}
            if self.bound == 0:
                adversarial = images.clone()
            else:
                with torch.enable_grad():
                    adversarial, extras = self.perturb_with_extras(model, images, labels, generator)
                adversarial = adversarial.detach()
                extras = {k: v.detach() for k, v in extras.items()}
            known_logits = extras.pop(KNOWN_LOGITS, None)
            known_size = extras.pop(KNOWN_SIZE, None)
            with torch.no_grad():
                logits = model(adversarial) if known_logits is None else known_logits
                if self.size_extra is not None:
                    size = extras.get(self.size_extra, torch.zeros_like(labels, dtype=images.dtype))
                elif known_size is not None:
                    size = known_size
                else:
                    size = self.perturbation_size(images, adversarial, model)
        return AttackResult(
            adversarial=adversarial,
            success=self.is_success(logits, labels),
            logits=logits.detach(),
            clean_logits=clean_logits.detach(),
            size=None if size is None else size.detach(),
            extras=extras,
        )

    def __str__(self) -> str:
        return self.spec


#: ``optimizer`` choices of the parametric attacks (StAdv, ReColorAdv).
OPTIMIZERS = ("sign", "adam")
#: Adam's constants (PyTorch's defaults, as PAT's mister_ed/recoloradv optimisers use).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def parametric_ascent(
    attack: Attack,
    model: Model,
    labels: Tensor,
    start: Tensor,
    *,
    project: Callable[[Tensor], tuple[Tensor, Tensor]],
    render: Callable[[Tensor, Tensor], Tensor],
    penalty: Callable[[Tensor], Tensor] | None = None,
    optimizer: str = "sign",
) -> tuple[Tensor, Tensor]:
    """The loop shared by the attacks whose variable is a parameter tensor (StAdv's flow,
    ReColorAdv's lattice, JPEG's coefficients): ascend ``attack.objective − penalty`` for
    ``attack.num_iterations`` steps and keep, per image, the iterate with the highest
    success margin (:class:`BestIterate`).

    - ``start`` ``[N, ...]``: the initial parameters (projected first).
    - ``project(params) → (images, params)``: the parameters mapped into the threat model
      and the images they make (no gradient needed).
    - ``render(params, images) → images``: differentiable in ``params``; its value is the
      ``images`` of the projection (e.g. a straight-through estimate past a clip).
    - ``penalty(params) → [N]``: subtracted from the objective (smoothness), or None.
    - ``optimizer``: ``sign`` (``params + step_size·sign(∇)``) or ``adam`` (Adam ascent with
      learning rate ``step_size``, :data:`ADAM_BETAS`, per-element moments), each followed
      by ``project``.

    Returns ``(best images [N, 3, H, W], best parameters [N, ...])``.
    """
    if optimizer not in OPTIMIZERS:
        raise EngineError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    images, params = project(start)
    best_images, best_params = BestIterate(images), BestIterate(params)
    first = second = None
    beta1, beta2 = ADAM_BETAS
    for step in range(1, attack.num_iterations + 1):
        params = params.detach().requires_grad_(True)
        logits = model(render(params, images))
        objective = attack.objective(logits, labels)
        if penalty is not None:
            objective = objective - penalty(params)
        (grad,) = torch.autograd.grad(objective.sum(), params)
        margin = attack.success_margin(logits.detach(), labels)
        best_images.update(images, margin)
        best_params.update(params, margin)
        with torch.no_grad():
            if optimizer == "sign":
                moved = params + attack.step_size * grad.sign()
            else:
                first = grad * (1 - beta1) if first is None else first.lerp(grad, 1 - beta1)
                squared = grad * grad
                second = squared * (1 - beta2) if second is None else (
                    second.lerp(squared, 1 - beta2))
                corrected = (second / (1 - beta2**step)).sqrt_().add_(ADAM_EPS)
                moved = params + attack.step_size / (1 - beta1**step) * first / corrected
        images, params = project(moved.detach())
    with torch.no_grad():
        margin = attack.success_margin(model(images), labels)
    best_images.update(images, margin)
    best_params.update(params, margin)
    return best_images.images, best_params.images


class ParametricAttack(Attack):
    """An attack whose bound is on parameters (a flow field, a colour lattice, DCT
    coefficients) rather than on the image: it implements :meth:`perturb_with_extras`, which
    also returns those parameters and their size (the extra named by ``size_extra``)."""

    def perturb(
        self, model: Model, images: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        return self.perturb_with_extras(model, images, labels, generator)[0]

    @abstractmethod
    def perturb_with_extras(
        self, model: Model, images: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`perturb` (same contract) plus the parameters and their sizes per image."""
