"""Training objectives (defenses) by name, with the seed papers' parameters.

A method is built by :func:`build_method` from a name and ``{parameter: value}`` (values may
be strings from the command line, ``--set bound=8/255``) and gives, per batch, the loss to
minimise::

    method = build_method("pgd_linf", {"bound": 8 / 255})
    method.bind(net, bundle)                     # once, before training
    loss, metrics = method.loss(model, images, labels, ctx)

``model`` is what the loss forward passes go through (a DistributedDataParallel wrapper under
torchrun); ``ctx.net`` is the bare classifier, which the attacks use (their input gradients
must not go through DDP's gradient reducer). Attacks come from :mod:`engine.attacks`; bounds
are in ``[0, 1]`` image units except the perceptual (LPIPS, unitless) ones.

Methods (``available_methods()``): ``standard``; ``pgd_linf`` and ``pgd_l2`` (Madry et al.);
``trades`` (Zhang et al. 2019); ``pat_self`` and ``pat_alexnet`` (PAT, Fast-LPA);
``multi_random`` / ``multi_average`` / ``multi_max`` (multiple-attack baselines, Tramèr &
Boneh 2019, as in PAT table 2); ``lagrangian`` (Lagrangian-AT); ``perceptual_prior``
(logit pairing of perceptually similar images); ``pag`` (perceptually aligned gradients);
``oaat`` (Oracle-Aligned AT with AWP).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import (
    FastLagrangianPerceptualAttack,
    LagrangianAttack,
    LinfPGD,
    LpipsOracleInvariantAttack,
    parse_attack,
)
from .attacks.base import eval_mode, noise_normal, noise_uniform, parse_bool, parse_number
from .attacks.spec import join_spec
from .errors import EngineError


@dataclass
class StepContext:
    """What a method may use besides the batch.

    ``net``: the bare classifier (attacks run on it); ``generator``: CPU generator seeded per
    step (all of a method's randomness comes from it); ``progress``: fraction of training done
    in ``[0, 1)``; ``step``: global optimiser step.
    """

    net: nn.Module
    generator: torch.Generator
    progress: float = 0.0
    step: int = 0


def _lpips_layers(net: nn.Module) -> str:
    spec = getattr(net, "lpips_layers_spec", None)
    if not spec:
        raise EngineError(
            f"a self-bounded perceptual method needs a classifier that names its LPIPS layers"
            f" (engine.architectures.Classifier), got {type(net).__name__}"
        )
    return spec


class LpipsFrom(nn.Module):
    """A classifier whose LPIPS features come from another network: ``forward`` runs
    ``lpips_net`` (so its LPIPS-layer hooks fire) and returns ``classifier``'s logits.

    Used with a self-bounded perceptual attack (``lpips_model=self``,
    ``lpips_layers=lpips_net.<layers>``) to bound by a network the attack registry cannot name:
    PAT's CIFAR AlexNet from a checkpoint, or OA-AT's weight-averaged (EMA) model.
    """

    def __init__(self, classifier: nn.Module, lpips_net: nn.Module, layers: tuple[str, ...]):
        super().__init__()
        self.classifier = classifier
        self.lpips_net = lpips_net
        self.layers_spec = "+".join(f"lpips_net.{name}" for name in layers)

    def forward(self, x: Tensor) -> Tensor:
        network = getattr(self.lpips_net, "network", None)
        if hasattr(network, "features") and hasattr(self.lpips_net, "normalize"):
            network.features(self.lpips_net.normalize(x))  # the LPIPS layers only
        else:
            self.lpips_net(x)
        return self.classifier(x)


def build_lpips_network(spec: str, num_classes: int = 10) -> tuple[nn.Module, tuple[str, ...]]:
    """A frozen LPIPS network and its layer names, from ``spec``:

    - ``alexnet_cifar:PATH``: PAT's CIFAR AlexNet (:class:`AlexNetCIFAR`) from a run folder or
      checkpoint made by ``python -m engine train --arch alexnet_cifar``;
    - ``alexnet_cifar:untrained``: the same layout, initialised from seed 0 (tests only);
    - anything :func:`engine.distances.build_lpips` takes (``alexnet``, ``alexnet:untrained``).
    """
    from .architectures import build_architecture
    from .distances import build_lpips

    name, _, rest = spec.partition(":")
    if name == "alexnet_cifar":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = build_architecture("alexnet_cifar", num_classes)
        if rest and rest != "untrained":
            from .train import load_model_weights

            load_model_weights(net, rest)
        layers = net.lpips_layers
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            lp = build_lpips(spec)
        net, layers = lp.network, lp.layers
    net.requires_grad_(False).eval()
    return net, tuple(layers)


# --------------------------------------------------------------------------------------------
# Base class and registry
# --------------------------------------------------------------------------------------------


class Method:
    """Base class: parameters (``defaults``) and the per-batch loss.

    Subclasses set ``name``, ``defaults`` (``{parameter: default}``; the default's type says
    how a string value is parsed) and ``doc`` (``{parameter: meaning with units}``), and
    implement :meth:`loss`. Optional hooks: :meth:`bind` (once, before training),
    :meth:`before_optimizer_step` (after backward), :meth:`after_step` (after the update),
    :meth:`state_dict` / :meth:`load_state_dict` (for exact resume).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    doc: ClassVar[dict[str, str]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise EngineError(
                f"unknown parameter(s) {', '.join(unknown)} for method {self.name!r}; valid:"
                f" {', '.join(self.defaults) or '(none)'}"
            )
        self.params = {k: _coerce(self.name, k, params.get(k, v), v)
                       for k, v in self.defaults.items()}
        self.check()

    def check(self) -> None:
        """Validate ``self.params`` (raise :class:`EngineError`)."""

    def __getattr__(self, key: str) -> Any:
        params = self.__dict__.get("params", {})
        if key in params:
            return params[key]
        raise AttributeError(key)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **self.params}

    def bind(self, net: nn.Module, bundle: Any = None) -> None:
        """Called once with the bare classifier and the dataset before training."""

    def loss(self, model: nn.Module, images: Tensor, labels: Tensor, ctx: StepContext
             ) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def before_optimizer_step(self, net: nn.Module) -> None:
        """After ``backward``, before ``optimizer.step`` (AWP restores the weights here)."""

    def after_step(self, net: nn.Module) -> None:
        """After ``optimizer.step`` (EMA updates here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def available_methods() -> dict[str, str]:
    """``{name: one-line summary}``."""
    return {name: METHODS[name].summary for name in sorted(METHODS)}


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """A method by name with parameters (strings are parsed); :class:`EngineError` for an
    unknown name or parameter, listing the valid ones."""
    cls = METHODS.get(name)
    if cls is None:
        raise EngineError(f"unknown method {name!r}; methods: {', '.join(sorted(METHODS))}")
    return cls(**(params or {}))


def parse_settings(pairs: list[str] | None) -> dict[str, str]:
    """``["bound=8/255", "beta=6"]`` → ``{"bound": "8/255", "beta": "6"}``."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise EngineError(f"method setting {pair!r} must look like key=value")
        out[key.strip()] = value.strip()
    return out


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    try:
        if isinstance(default, bool):
            return parse_bool(key, value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float) or default is None:
            return parse_number(key, value)
        if isinstance(default, tuple | list):
            return tuple(s.strip() for s in value.split("|") if s.strip())
    except (EngineError, ValueError) as exc:
        raise EngineError(f"bad value {value!r} for {method} parameter {key!r}: {exc}") from None
    return value


def _ce(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(images)
    return F.cross_entropy(logits, labels), logits


def _acc(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def _kl(student_logits: Tensor, target_probs: Tensor) -> Tensor:
    """``KL(target ‖ softmax(student))`` summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits, 1), target_probs, reduction="batchmean")


# --------------------------------------------------------------------------------------------
# Standard, PGD-AT, TRADES
# --------------------------------------------------------------------------------------------


@register_method
class Standard(Method):
    name = "standard"
    summary = "cross-entropy on natural images"

    def loss(self, model, images, labels, ctx):
        loss, logits = _ce(model, images, labels)
        return loss, {"train_acc": _acc(logits, labels)}


class _AttackTraining(Method):
    """Cross-entropy on the adversarial examples of one attack spec (Madry et al. 2018)."""

    threat = "linf"

    def attack(self):
        params = [("bound", repr(self.bound)), ("num_iterations", str(self.num_iterations))]
        if self.step_size is not None:
            params.append(("step_size", repr(self.step_size)))
        return parse_attack(join_spec(self.threat, params))

    def check(self):
        self._attack = self.attack()

    def loss(self, model, images, labels, ctx):
        adversarial = self._attack(ctx.net, images, labels, generator=ctx.generator).adversarial
        loss, logits = _ce(model, adversarial, labels)
        return loss, {"train_adv_acc": _acc(logits, labels)}


@register_method
class PGDLinf(_AttackTraining):
    name = "pgd_linf"
    summary = "PGD-AT, L∞ (Madry et al.): CE on L∞ PGD examples, bound 8/255 (CIFAR)"
    threat = "linf"
    defaults = {"bound": 8 / 255, "num_iterations": 10, "step_size": 2 / 255}
    doc = {"bound": "L∞ radius, [0, 1] pixels", "num_iterations": "PGD steps (PAT table 12: 10)",
           "step_size": "per-step L∞ size, [0, 1] pixels"}


@register_method
class PGDL2(_AttackTraining):
    name = "pgd_l2"
    summary = "PGD-AT, L2 (Madry et al.): CE on L2 PGD examples, bound 1.0 (CIFAR, PAT table 2)"
    threat = "l2"
    defaults = {"bound": 1.0, "num_iterations": 10, "step_size": None}
    doc = {"bound": "L2 radius of the whole image, [0, 1] pixels",
           "num_iterations": "PGD steps", "step_size": "per-step L2 size (default 2.5·bound/N)"}


@register_method
class Trades(Method):
    name = "trades"
    summary = "TRADES (Zhang et al. 2019): CE(x) + beta·KL(f(x) ‖ f(x')), KL-PGD inner max"
    defaults = {"bound": 8 / 255, "num_iterations": 10, "step_size": 2 / 255, "beta": 6.0}
    doc = {"bound": "L∞ radius, [0, 1] pixels", "num_iterations": "inner KL-ascent steps",
           "step_size": "L∞ step", "beta": "weight of the KL term (TRADES: 6)"}

    def loss(self, model, images, labels, ctx):
        adversarial = trades_attack(ctx.net, images, self.bound, self.num_iterations,
                                    self.step_size, ctx.generator)
        logits = model(images)
        adv_logits = model(adversarial)
        robust = _kl(adv_logits, F.softmax(logits, 1))
        loss = F.cross_entropy(logits, labels) + self.beta * robust
        return loss, {"train_acc": _acc(logits, labels), "train_adv_acc": _acc(adv_logits, labels),
                      "kl": float(robust.detach())}


def trades_attack(net: nn.Module, images: Tensor, bound: float, num_iterations: int,
                  step_size: float, generator: torch.Generator) -> Tensor:
    """TRADES' inner maximisation: L∞ PGD ascending ``KL(f(x) ‖ f(x'))`` from
    ``x + 0.001·N(0, 1)`` (the authors' code). Bounds in ``[0, 1]`` pixels."""
    with eval_mode(net), torch.enable_grad():
        with torch.no_grad():
            natural = F.softmax(net(images), 1)
        adversarial = (images + 0.001 * noise_normal(images.shape, generator, images)).clamp(0, 1)
        for _ in range(num_iterations):
            leaf = adversarial.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(_kl(net(leaf), natural), leaf)
            moved = adversarial + step_size * grad.sign()
            adversarial = (images + (moved - images).clamp(-bound, bound)).clamp(0, 1)
    return adversarial.detach()


# --------------------------------------------------------------------------------------------
# PAT
# --------------------------------------------------------------------------------------------


class _PAT(Method):
    """Perceptual Adversarial Training (PAT section 5): CE on Fast-LPA examples."""

    def _fast_lpa(self, layers: str) -> FastLagrangianPerceptualAttack:
        return FastLagrangianPerceptualAttack(
            bound=self.bound, num_iterations=self.num_iterations, lpips_model="self",
            lpips_layers=layers, lam=self.lam)

    def _attack_model(self, net: nn.Module) -> nn.Module:
        return net

    def loss(self, model, images, labels, ctx):
        net = self._attack_model(ctx.net)
        adversarial = images
        attacked = torch.ones_like(labels, dtype=torch.bool)
        if self.only_correct:
            with torch.no_grad(), eval_mode(ctx.net):
                attacked = ctx.net(images).argmax(1) == labels
        if attacked.any():
            rows = attacked.nonzero().squeeze(1)
            result = self.attack(net, images[rows], labels[rows], generator=ctx.generator)
            adversarial = images.clone()
            adversarial[rows] = result.adversarial
        loss, logits = _ce(model, adversarial, labels)
        return loss, {"train_adv_acc": _acc(logits, labels),
                      "attacked_fraction": float(attacked.float().mean())}


@register_method
class PATSelf(_PAT):
    name = "pat_self"
    summary = "PAT self-bounded (Fast-LPA with the trained classifier as LPIPS), bound 0.5"
    defaults = {"bound": 0.5, "num_iterations": 10, "lam": 10.0, "only_correct": True}
    doc = {"bound": "LPIPS bound (unitless; PAT: 0.5 CIFAR-10, 0.25 ImageNet-100)",
           "num_iterations": "Fast-LPA steps (PAT table 12: 10)",
           "lam": "final Lagrange multiplier of Fast-LPA (PAT: 10)",
           "only_correct": "attack only inputs the model classifies correctly (PAT app. F)"}

    def bind(self, net, bundle=None):
        self.attack = self._fast_lpa(_lpips_layers(net))


@register_method
class PATAlexNet(_PAT):
    name = "pat_alexnet"
    summary = "PAT AlexNet-bounded (Fast-LPA, LPIPS from a fixed AlexNet), bound 0.5"
    defaults = {"bound": 0.5, "num_iterations": 10, "lam": 10.0, "only_correct": True,
                "lpips_model": "alexnet_cifar:untrained"}
    doc = {**PATSelf.doc,
           "bound": "LPIPS bound (unitless; PAT: 0.5 CIFAR-10 and ImageNet-100)",
           "lpips_model": "alexnet_cifar:RUN_OR_CHECKPOINT (PAT's CIFAR AlexNet, trained by"
                          " `python -m engine train --arch alexnet_cifar`), alexnet (ImageNet),"
                          " or alexnet_cifar:untrained (tests only)"}

    def bind(self, net, bundle=None):
        num_classes = getattr(bundle, "num_classes", 10)
        lpips_net, layers = build_lpips_network(self.lpips_model, num_classes)
        self._pair = LpipsFrom(net, lpips_net, layers)
        self.attack = self._fast_lpa(self._pair.layers_spec)

    def _attack_model(self, net):
        device = next(net.parameters()).device
        self._pair.lpips_net.to(device)
        return self._pair


# --------------------------------------------------------------------------------------------
# Multiple-attack baselines and Lagrangian AT
# --------------------------------------------------------------------------------------------


DEFAULT_UNION = ("linf:bound=8/255,num_iterations=10,step_size=2/255",
                 "l2:bound=1.0,num_iterations=10",
                 "stadv:bound=0.05,num_iterations=10",
                 "recoloradv:bound=0.06,num_iterations=10")


class _MultiAttack(Method):
    """Training against several threat models (Tramèr & Boneh 2019; PAT table 2 baselines).

    ``attacks``: ``|``-separated attack specs (default: PAT's CIFAR-10 L∞ 8/255, L2 1,
    StAdv 0.05, ReColorAdv 0.06, 10 iterations each).
    """

    defaults = {"attacks": DEFAULT_UNION}
    doc = {"attacks": "'|'-separated engine.attacks specs"}

    def check(self):
        if not self.attacks:
            raise EngineError(f"{self.name} needs at least one attack spec in attacks=")
        self._attacks = [parse_attack(s) for s in self.attacks]

    def _adversarials(self, ctx, images, labels, attacks):
        return [a(ctx.net, images, labels, generator=ctx.generator).adversarial for a in attacks]


@register_method
class MultiRandom(_MultiAttack):
    name = "multi_random"
    summary = "multiple-attack AT, random: one attack from the list per batch"

    def loss(self, model, images, labels, ctx):
        index = int(torch.randint(len(self._attacks), (1,), generator=ctx.generator))
        (adversarial,) = self._adversarials(ctx, images, labels, [self._attacks[index]])
        loss, logits = _ce(model, adversarial, labels)
        return loss, {"train_adv_acc": _acc(logits, labels), "attack_index": index}


@register_method
class MultiAverage(_MultiAttack):
    name = "multi_average"
    summary = "multiple-attack AT, average: mean CE over every attack's examples"

    def loss(self, model, images, labels, ctx):
        adversarials = self._adversarials(ctx, images, labels, self._attacks)
        logits = model(torch.cat(adversarials))
        loss = F.cross_entropy(logits, labels.repeat(len(adversarials)))
        return loss, {"train_adv_acc": _acc(logits, labels.repeat(len(adversarials)))}


@register_method
class MultiMax(_MultiAttack):
    name = "multi_max"
    summary = "multiple-attack AT, maximum: per image the attack with the highest CE"

    def loss(self, model, images, labels, ctx):
        adversarials = torch.stack(self._adversarials(ctx, images, labels, self._attacks))
        with torch.no_grad(), eval_mode(ctx.net):
            losses = torch.stack([F.cross_entropy(ctx.net(a), labels, reduction="none")
                                  for a in adversarials])
        worst = losses.argmax(0)
        chosen = adversarials[worst, torch.arange(len(labels), device=labels.device)]
        loss, logits = _ce(model, chosen, labels)
        return loss, {"train_adv_acc": _acc(logits, labels)}


@register_method
class Lagrangian(Method):
    name = "lagrangian"
    summary = "Lagrangian AT (Azizmalayeri & Rohban): CE on margin − λ‖δ‖₂ examples"
    defaults = {"bound": 0.15, "num_iterations": 5, "lam": 2.0, "decay": 0.1}
    doc = {"bound": "initial step α, [0, 1] pixels (CIFAR-10 0.15, ImageNet-100 0.25)",
           "num_iterations": "attack steps (paper: 5)",
           "lam": "Lagrange multiplier λ (CIFAR-10 2, ImageNet-100 0.45)",
           "decay": "schedule base c (0.1)"}

    def check(self):
        self._attack = LagrangianAttack(bound=self.bound, num_iterations=self.num_iterations,
                                        lam=self.lam, decay=self.decay)

    def loss(self, model, images, labels, ctx):
        adversarial = self._attack(ctx.net, images, labels, generator=ctx.generator).adversarial
        loss, logits = _ce(model, adversarial, labels)
        return loss, {"train_adv_acc": _acc(logits, labels)}


# --------------------------------------------------------------------------------------------
# Perceptual-prior logit pairing
# --------------------------------------------------------------------------------------------


def sign_noise(images: Tensor, xi: float, generator: torch.Generator) -> Tensor:
    """``clamp(x + ξ·sign(N(0, I)))`` — the perceptual prior's Eq. 2 (ξ in [0, 1] pixels)."""
    return (images + xi * noise_normal(images.shape, generator, images).sign()).clamp(0, 1)


def random_spatial(images: Tensor, generator: torch.Generator, *, max_rotation: float = 3.0,
                   max_translation: float = 1 / 32) -> Tensor:
    """A small random rotation (± ``max_rotation`` degrees) and translation (± fraction of the
    image side) per image: perceptually similar spatially transformed pairs (section 4.3)."""
    n = images.shape[0]
    u = 2 * noise_uniform((n, 3), generator, images) - 1
    theta = u[:, 0] * math.radians(max_rotation)
    cos, sin = theta.cos(), theta.sin()
    tx, ty = 2 * max_translation * u[:, 1], 2 * max_translation * u[:, 2]
    matrix = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


@register_method
class PerceptualPrior(Method):
    name = "perceptual_prior"
    summary = "perceptual-prior logit pairing: CE on clean+noisy, + λ‖f(x) − f(x̃)‖² (Eq. 1–2)"
    defaults = {"xi": 8 / 255, "lam": 50.0, "spatial": True}
    doc = {"xi": "L∞ size of the sign noise, [0, 1] pixels (CIFAR: 8/255; MNIST: 0.3)",
           "lam": "weight of the logit-distance penalty (CIFAR: 50; MNIST: 10)",
           "spatial": "also pair each image with a small random rotation/translation of it"}

    def loss(self, model, images, labels, ctx):
        noisy = sign_noise(images, self.xi, ctx.generator)
        batches = [images, noisy]
        if self.spatial:
            batches.append(random_spatial(images, ctx.generator))
        logits = model(torch.cat(batches)).chunk(len(batches))
        ce = F.cross_entropy(torch.cat(logits[:2]), labels.repeat(2))
        # Eq. 1: (1/2m)·[Σ_s Σ_i CE + λ Σ_i ‖f_clean − f_noisy‖²], i.e. the mean CE over the
        # 2m images plus λ/2 times the mean squared logit distance per pair
        penalty = sum(((logits[0] - other) ** 2).sum(1).mean() for other in logits[1:]) / 2
        loss = ce + self.lam * penalty
        return loss, {"train_acc": _acc(logits[0], labels),
                      "logit_penalty": float(penalty.detach())}


@torch.no_grad()
def logit_distances(net: nn.Module, images: Tensor, labels: Tensor, *, xi: float = 8 / 255,
                    generator: torch.Generator | None = None) -> dict[str, float]:
    """The perceptual prior paper's measurement (section 3.1), mean L2 logit distances:

    - ``d_per``: between each image and its noisy copy ``x + ξ·sign(N(0, I))`` (ξ in
      ``[0, 1]`` pixels) — perceptually identical pairs;
    - ``d_intra``: between different images of the same class;
    - ``d_inter``: between images of different classes.

    The prior says a good model has ``d_per`` ≪ ``d_intra`` < ``d_inter``; normal training
    gives ``d_per`` comparable to ``d_intra``. Also returns the ratio ``d_per / d_intra``.
    """
    generator = generator or torch.Generator().manual_seed(0)
    with eval_mode(net):
        clean = net(images).float()
        noisy = net(sign_noise(images, xi, generator)).float()
    d_per = (clean - noisy).norm(dim=1).mean()
    pairwise = torch.cdist(clean, clean)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    d_intra = pairwise[same & off_diagonal].mean()
    d_inter = pairwise[~same].mean()
    return {"d_per": float(d_per), "d_intra": float(d_intra), "d_inter": float(d_inter),
            "d_per_over_d_intra": float(d_per / d_intra)}


# --------------------------------------------------------------------------------------------
# PAG: perceptually aligned gradients
# --------------------------------------------------------------------------------------------


PAG_TARGETS = ("one_image", "class_mean", "nearest_neighbour", "rigd")


@register_method
class PAG(Method):
    name = "pag"
    summary = "PAG (Ganz et al.): CE + λ·Σ_t (1 − cos(∇ₓ f_t(x), r_t(x) − x))"
    defaults = {"target": "class_mean", "lam": 0.4, "nn_pool": 100, "teacher": "",
                "seed": 0}
    doc = {"target": "one_image | class_mean | nearest_neighbour | rigd",
           "lam": "weight of the cosine term (CIFAR table 3: one image 0.5, class mean 0.4,"
                  " NN 0.4)",
           "nn_pool": "training images per class searched by nearest_neighbour",
           "teacher": "rigd: run folder or checkpoint of a robust classifier whose input"
                      " gradients are the targets (same architecture/dataset)",
           "seed": "which training images one_image / nearest_neighbour use"}

    def check(self):
        if self.target not in PAG_TARGETS:
            raise EngineError(f"unknown PAG target {self.target!r}; use one of {PAG_TARGETS}")
        if self.target == "rigd" and not self.teacher:
            raise EngineError("PAG target rigd needs teacher=RUN_FOLDER_OR_CHECKPOINT of a"
                              " robust classifier")

    def bind(self, net, bundle=None):
        if self.target == "rigd":
            from .train import load_model

            self._teacher = load_model(self.teacher).eval().requires_grad_(False)
            return
        if bundle is None:
            raise EngineError("PAG needs the training set to build class representatives")
        data = bundle.train
        gen = torch.Generator().manual_seed(self.seed)
        per_class: dict[int, list[int]] = {}
        order = torch.randperm(len(data), generator=gen).tolist()
        limit = self.nn_pool if self.target == "nearest_neighbour" else (
            1 if self.target == "one_image" else len(data))
        for i in order:
            label = int(data[i][1])
            bucket = per_class.setdefault(label, [])
            if len(bucket) < limit:
                bucket.append(i)
        classes = getattr(bundle, "num_classes", len(per_class))
        if len(per_class) < classes:
            raise EngineError(f"PAG: only {len(per_class)} of {classes} classes in the data")
        images = [torch.stack([data[i][0] for i in per_class[c]]) for c in range(classes)]
        if self.target == "nearest_neighbour":
            self._pool = images  # list of [k, 3, H, W]
        else:
            self._representatives = torch.stack([im.mean(0) for im in images])  # [C, 3, H, W]

    def targets(self, images: Tensor) -> Tensor:
        """``[C, N, 3, H, W]``: the direction each class's gradient should follow."""
        if self.target == "nearest_neighbour":
            out = []
            for pool in self._pool:
                pool = pool.to(images)
                nearest = torch.cdist(images.flatten(1), pool.flatten(1)).argmin(1)
                out.append(pool[nearest] - images)
            return torch.stack(out)
        reps = self._representatives.to(images)
        return reps[:, None] - images[None]

    def _teacher_gradients(self, images: Tensor, classes: int) -> Tensor:
        teacher = self._teacher.to(images.device)
        grads = []
        for c in range(classes):
            leaf = images.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(teacher(leaf)[:, c].sum(), leaf)
            grads.append(g)
        return torch.stack(grads)

    def loss(self, model, images, labels, ctx):
        leaf = images.detach().requires_grad_(True)
        logits = model(leaf)
        classes = logits.shape[1]
        goals = (self._teacher_gradients(images, classes) if self.target == "rigd"
                 else self.targets(images))
        cos_terms = []
        for c in range(classes):
            (grad,) = torch.autograd.grad(logits[:, c].sum(), leaf, create_graph=True)
            cos = F.cosine_similarity(grad.flatten(1), goals[c].flatten(1), dim=1, eps=1e-12)
            cos_terms.append((1 - cos).mean())
        alignment = torch.stack(cos_terms).sum()
        loss = F.cross_entropy(logits, labels) + self.lam * alignment
        return loss, {"train_acc": _acc(logits, labels),
                      "cosine": 1 - float(alignment.detach()) / classes}


# --------------------------------------------------------------------------------------------
# OA-AT
# --------------------------------------------------------------------------------------------


@register_method
class OAAT(Method):
    """Oracle-Aligned Adversarial Training (Addepalli et al., section 4, Algorithm A1).

    TRADES-AWP base with a CE attack. ε ramps from ``bound_start`` (held for the first
    quarter of training) linearly to ``bound``; 5 attack steps while ε = ``bound_start``, 10
    after. Up to ``bound_switch`` it is TRADES-AWP; beyond, alternate steps train on
    Oracle-Sensitive samples (CE PGD at ε, KL towards ``α f(x) + (1 − α) f(x + δ̂)`` with δ̂
    a PGD perturbation at ``1.5·bound``) and on Oracle-Invariant samples (the ``lpips_oa``
    attack, CE − λ·LPIPS, LPIPS measured by an exponential moving average of the model).
    α and λ rise linearly over the OA phase to ``alpha`` and ``lpips_weight``. AWP
    (Wu et al. 2020) perturbs the weights by ``awp_gamma``·‖w‖ per layer, maximising the loss
    at ``x + 2δ`` (OA-AT), before the gradient step.
    """

    name = "oaat"
    summary = "OA-AT (Addepalli et al.): ε ramp, Oracle-Invariant LPIPS (EMA) + Oracle-Sensitive"
    defaults = {"bound": 16 / 255, "bound_start": 4 / 255, "bound_switch": 12 / 255,
                "beta": 6.0, "alpha": 0.8, "lpips_weight": 1.0, "ema_decay": 0.995,
                "awp_gamma": 5e-3, "awp_warmup": 0.1}
    doc = {"bound": "final L∞ ε, [0, 1] pixels (OA-AT CIFAR: 16/255)",
           "bound_start": "initial ε (4/255), held for the first quarter",
           "bound_switch": "ε beyond which OI/OS samples alternate (12/255)",
           "beta": "TRADES weight of the KL term", "alpha": "final α of the OS target",
           "lpips_weight": "final λ of the OI attack", "ema_decay": "EMA of weights for LPIPS",
           "awp_gamma": "AWP relative weight-perturbation size (0 disables AWP)",
           "awp_warmup": "fraction of training before AWP starts"}

    def bind(self, net, bundle=None):
        self._ema = copy.deepcopy(net).requires_grad_(False).eval()
        self._layers = tuple(name for name in _lpips_layers(net).split("+"))
        self._awp_backup: list[Tensor] | None = None

    def epsilon(self, progress: float) -> float:
        """ε at ``progress`` ∈ [0, 1]: ``bound_start`` for the first quarter, then linear."""
        if progress < 0.25:
            return self.bound_start
        return self.bound_start + (self.bound - self.bound_start) * (progress - 0.25) / 0.75

    def _oa_fraction(self, progress: float) -> float:
        """0 at the switch ε, 1 at the end (α and λ ramp over this)."""
        start = 0.25 + 0.75 * (self.bound_switch - self.bound_start) / max(
            self.bound - self.bound_start, 1e-12)
        return min(1.0, max(0.0, (progress - start) / max(1 - start, 1e-12)))

    def loss(self, model, images, labels, ctx):
        eps = self.epsilon(ctx.progress)
        steps = 5 if ctx.progress < 0.25 else 10
        pgd = LinfPGD(bound=eps, num_iterations=steps, step_size=eps / 4)
        kind = "trades"
        if eps > self.bound_switch:
            kind = "oracle_sensitive" if ctx.step % 2 == 0 else "oracle_invariant"
        ramp = self._oa_fraction(ctx.progress)
        if kind == "oracle_invariant":
            ema = self._ema.to(images.device)
            pair = LpipsFrom(ctx.net, ema, self._layers)
            attack = LpipsOracleInvariantAttack(
                bound=eps, num_iterations=steps, lpips_model="self",
                lpips_layers=pair.layers_spec, lam=self.lpips_weight * ramp)
            adversarial = attack(pair, images, labels, generator=ctx.generator).adversarial
        else:
            adversarial = pgd(ctx.net, images, labels, generator=ctx.generator).adversarial
        target = None
        if kind == "oracle_sensitive":
            alpha = self.alpha * ramp
            far = LinfPGD(bound=1.5 * self.bound, num_iterations=steps,
                          step_size=1.5 * self.bound / 4)
            far_adv = far(ctx.net, images, labels, generator=ctx.generator).adversarial
            with torch.no_grad():
                target = (alpha * F.softmax(ctx.net(images), 1)
                          + (1 - alpha) * F.softmax(ctx.net(far_adv), 1))
        if self.awp_gamma > 0 and ctx.progress >= self.awp_warmup:
            self._perturb_weights(ctx.net, images, adversarial, labels)

        logits = model(images)
        adv_logits = model(adversarial)
        goal = F.softmax(logits, 1) if target is None else target
        robust = _kl(adv_logits, goal)
        loss = F.cross_entropy(logits, labels) + self.beta * robust
        return loss, {"train_acc": _acc(logits, labels), "train_adv_acc": _acc(adv_logits, labels),
                      "epsilon": eps, "oracle_phase": {"trades": 0, "oracle_sensitive": 1,
                                                       "oracle_invariant": 2}[kind]}

    def _perturb_weights(self, net: nn.Module, images: Tensor, adversarial: Tensor,
                         labels: Tensor) -> None:
        """AWP: one normalised ascent step on the weights (loss at ``x + 2δ``), undone in
        :meth:`before_optimizer_step`. Only multi-dimensional weights are perturbed."""
        weights = [p for p in net.parameters() if p.requires_grad and p.dim() > 1]
        far = (images + 2 * (adversarial - images)).clamp(0, 1)
        with torch.enable_grad():
            logits = net(images)
            loss = F.cross_entropy(logits, labels) + self.beta * _kl(
                net(far), F.softmax(logits, 1).detach())
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        backup = []
        with torch.no_grad():
            for w, g in zip(weights, grads, strict=True):
                step = torch.zeros_like(w) if g is None else (
                    self.awp_gamma * w.norm() * g / g.norm().clamp_min(1e-12))
                w.add_(step)
                backup.append(step)
        self._awp_backup = backup
        self._awp_weights = weights

    def before_optimizer_step(self, net):
        if self._awp_backup is not None:
            with torch.no_grad():
                for w, step in zip(self._awp_weights, self._awp_backup, strict=True):
                    w.sub_(step)
            self._awp_backup = None

    def after_step(self, net):
        with torch.no_grad():
            for e, p in zip(self._ema.parameters(), net.parameters(), strict=True):
                e.mul_(self.ema_decay).add_(p.detach().to(e.device), alpha=1 - self.ema_decay)
            for e, b in zip(self._ema.buffers(), net.buffers(), strict=True):
                e.copy_(b)

    def state_dict(self):
        return {"ema": self._ema.state_dict()}

    def load_state_dict(self, state):
        self._ema.load_state_dict(state["ema"])


def method_names() -> list[str]:
    return sorted(METHODS)


LossFn = Callable[[nn.Module, Tensor, Tensor, StepContext], tuple[Tensor, dict[str, float]]]
