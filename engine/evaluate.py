"""Evaluate trained defenses: accuracy under attack specs, AutoAttack, union accuracy, sanity
checks and robustness at human-calibrated (perceptibility-matched) bounds.

- :func:`evaluate_model`: per-image correctness of one classifier on the first ``limit``
  test images under each threat model (attack specs of :mod:`engine.attacks`, bounds named
  (``bound=cifar10``) or numeric, in each threat model's units), plus clean accuracy, union
  accuracy (an image counts only if it is classified correctly under EVERY threat model) and
  the unseen mean (mean accuracy over threat models the model was not trained against).
- ``autoattack=("linf:8/255", "l2:1.0")``: AutoAttack's standard Lp ensemble through
  torchattacks (APGD-CE, APGD-T, FAB-T, Square; each run on the images still classified
  correctly, so an image is robust only if all four fail).
- :func:`sanity_checks`: the gradient-masking checks of the perceptual-prior paper
  (section 4.4): accuracy falls as the bound grows; an unbounded attack reaches about 0 %;
  black-box Square is not stronger than white-box PGD/APGD.
- :func:`perceptibility_matched`: with calibrated bounds ``{threat_model: {label: bound}}``
  (e.g. ``{"linf": {"p10": 0.01, "p25": 0.02, "p50": 0.04}}``: the bounds at which people see
  the perturbation 10 / 25 / 50 % of the time, from the calibration), robust accuracy per
  threat model at each level — a table and a curve, threat models compared at equal
  perceptibility.

Tables are shaped like PAT tables 2–3 (rows: models; columns: clean, each threat model,
unseen mean, union) and written as CSV and Markdown. Every output names the dataset (digits
results say so) and whether the model is untrained.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .attacks import Attack, parse_attack
from .attacks.base import parse_number
from .attacks.perceptual import LpipsAttack
from .attacks.spec import (
    bound_label,
    expand_specs,
    has_param,
    join_params,
    join_spec,
    with_params,
)
from .errors import EngineError
from .provenance import untrained_in_params

#: AutoAttack's standard ensemble, in the order it runs.
AUTOATTACK_PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass
class ModelEvaluation:
    """Per-image results of one model: ``correct[threat label]`` is a ``[N]`` bool tensor."""

    name: str
    dataset_label: str
    n_images: int
    clean: Tensor
    correct: dict[str, Tensor] = field(default_factory=dict)
    specs: dict[str, str] = field(default_factory=dict)
    seen: tuple[str, ...] = ()
    #: ``{column: {kind, threat_model, bound, label, spec}}``: what each column of
    #: :meth:`row` measures, so that readers never parse column names or spec text.
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def column_info(self) -> dict[str, dict[str, Any]]:
        """Structured description of every column of :meth:`row` that holds an accuracy."""
        plain = {"threat_model": None, "bound": None, "label": "", "spec": ""}
        return {"clean": {"kind": "clean", **plain},
                **{label: self.info.get(label, {"kind": "attack", **plain})
                   for label in self.correct},
                "unseen_mean": {"kind": "unseen_mean", **plain},
                "union": {"kind": "union", **plain}}

    def accuracy(self, label: str) -> float:
        return float(self.correct[label].float().mean())

    @property
    def union_accuracy(self) -> float:
        """Fraction of images classified correctly under every threat model (and clean)."""
        if not self.correct:
            return float(self.clean.float().mean())
        together = self.clean.clone()
        for mask in self.correct.values():
            together &= mask
        return float(together.float().mean())

    @property
    def unseen_mean(self) -> float | None:
        """Mean accuracy over threat models not named in ``seen`` (None if all were seen)."""
        unseen = [label for label in self.correct if label not in self.seen]
        if not unseen:
            return None
        return sum(self.accuracy(label) for label in unseen) / len(unseen)

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"model": self.name, "dataset": self.dataset_label,
                               "images": self.n_images,
                               "clean": float(self.clean.float().mean())}
        for label in self.correct:
            row[label] = self.accuracy(label)
        row["unseen_mean"] = self.unseen_mean
        row["union"] = self.union_accuracy
        return row


def threat_label(attack: Attack) -> str:
    """Column name for an attack: ``linf 0.03137`` (name and bound)."""
    return f"{attack.name} {attack.bound:.4g}"


def prepare_attack(spec: str, model: nn.Module) -> Attack:
    """Parse ``spec``; a self-bounded perceptual spec without ``lpips_layers`` gets the
    classifier's own LPIPS layers (:class:`engine.architectures.Classifier`)."""
    attack = parse_attack(spec)
    if (isinstance(attack, LpipsAttack) and attack.self_bounded
            and not has_param(spec, "lpips_layers")
            and getattr(model, "lpips_layers_spec", None)):
        attack = parse_attack(with_params(spec, lpips_layers=model.lpips_layers_spec))
    return attack


def attack_info(spec: str, attack: Attack) -> dict[str, Any]:
    """The structured columns of an attack column: threat model, bound (its units), the
    bound's label (``small``, ``p50``, ``human_medium`` or ``""``) and the canonical spec."""
    return {"kind": "attack", "threat_model": attack.name, "bound": float(attack.bound),
            "label": bound_label(spec), "spec": attack.spec,
            "untrained": untrained_in_params(attack.describe())}


def _batches(data, limit: int | None, batch_size: int, device: torch.device):
    n = len(data) if limit is None else min(limit, len(data))
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([x for x, _ in items]).to(device)
        labels = torch.tensor([int(y) for _, y in items], dtype=torch.long, device=device)
        yield start, images, labels


def evaluate_model(model: nn.Module, data, specs: list[str] | dict[str, str], *,
                   name: str = "model", dataset_label: str = "", limit: int | None = 500,
                   batch_size: int = 100, seed: int = 0, device: str | torch.device = "cpu",
                   autoattack: list[str] | tuple[str, ...] = (), autoattack_version: str =
                   "standard", seen: tuple[str, ...] = (), progress: bool = True
                   ) -> ModelEvaluation:
    """Evaluate ``model`` on the first ``limit`` images of ``data`` (a dataset of
    ``(image [3, H, W] in [0, 1], label)``) under each attack spec.

    ``specs``: a list of specs (columns named by :func:`threat_label`) or ``{column: spec}``.
    ``autoattack``: ``NORM:EPS`` strings (``linf:8/255``, ``l2:1.0``; eps in ``[0, 1]``
    pixel units) for AutoAttack's standard ensemble (``autoattack_version="fast"`` runs it
    with 20 steps and 500 Square queries, for CPU demos; say so when reporting).
    ``seen``: column names (or threat names such as ``linf``) the model was trained against
    (left out of the unseen mean).
    """
    device = torch.device(device)
    model = model.to(device).eval()
    named = specs if isinstance(specs, dict) else None
    attacks: dict[str, Attack] = {}
    info: dict[str, dict[str, Any]] = {}
    for key, spec in (named.items() if named else ((None, s) for s in specs)):
        attack = prepare_attack(spec, model)
        column = key or threat_label(attack)
        attacks[column] = attack
        info[column] = attack_info(spec, attack)
    aa = {}
    for text in autoattack:
        norm, _, eps = text.partition(":")
        norm = norm.strip().lower()
        if norm not in ("linf", "l2") or not eps:
            raise EngineError(f"autoattack takes NORM:EPS with NORM linf or l2, got {text!r}")
        from .attacks.base import parse_number

        column = f"autoattack-{norm} {parse_number('eps', eps):.4g}"
        aa[column] = (norm, parse_number("eps", eps))
        info[column] = {"kind": "autoattack", "threat_model": f"autoattack-{norm}",
                        "bound": aa[column][1], "label": "",
                        "spec": f"autoattack {autoattack_version} {norm}:{aa[column][1]!r}"}
    if autoattack_version not in ("standard", "fast"):
        raise EngineError(f"autoattack_version must be standard or fast, got "
                          f"{autoattack_version!r}")

    clean_parts: list[Tensor] = []
    parts: dict[str, list[Tensor]] = {label: [] for label in [*attacks, *aa]}
    total = len(data) if limit is None else min(limit, len(data))
    batches = list(range(0, total, batch_size))
    for start, images, labels in tqdm(_batches(data, limit, batch_size, device),
                                      total=len(batches), desc=f"evaluate {name}",
                                      disable=not progress, leave=False):
        with torch.no_grad():
            clean_parts.append((model(images).argmax(1) == labels).cpu())
        for i, (label, attack) in enumerate(attacks.items()):
            generator = torch.Generator().manual_seed(seed * 7919 + start * 31 + i)
            result = attack(model, images, labels, generator=generator)
            parts[label].append((~result.success).cpu())
        for label, (norm, eps) in aa.items():
            parts[label].append(autoattack_correct(model, images, labels, norm, eps, seed=seed,
                                                   version=autoattack_version).cpu())
    seen_labels = tuple(label for label in parts
                        if label in seen or label.split(" ")[0] in seen)
    return ModelEvaluation(
        name=name, dataset_label=dataset_label, n_images=total,
        clean=torch.cat(clean_parts), correct={k: torch.cat(v) for k, v in parts.items()},
        specs={**{k: a.spec for k, a in attacks.items()},
               **{k: f"autoattack {autoattack_version} {n}:{e!r}" for k, (n, e) in aa.items()}},
        seen=seen_labels, info=info)


def autoattack_correct(model: nn.Module, images: Tensor, labels: Tensor, norm: str, eps: float,
                       *, seed: int = 0, version: str = "standard") -> Tensor:
    """``[N]`` bool: still correct after AutoAttack's standard ensemble (torchattacks' APGD-CE,
    APGD-T, FAB-T, Square; each on the images the previous ones did not break). ``eps`` in
    ``[0, 1]`` pixel units; ``version="standard"``: 100 steps, 5000 Square queries (Croce &
    Hein 2020); ``"fast"``: 20 steps, 500 queries."""
    import torchattacks

    from .attacks.strong import TorchattacksModel

    steps, queries = (100, 5000) if version == "standard" else (20, 500)
    norm_name = {"linf": "Linf", "l2": "L2"}[norm]
    with torch.no_grad():
        classes = model(images[:1]).shape[1]
    adapter = TorchattacksModel(model, images.device, images.dtype)
    parts = [
        torchattacks.APGD(adapter, norm=norm_name, eps=eps, steps=steps, seed=seed, loss="ce"),
        torchattacks.APGDT(adapter, norm=norm_name, eps=eps, steps=steps, seed=seed,
                           n_classes=classes),
        torchattacks.FAB(adapter, norm=norm_name, eps=eps, steps=steps, seed=seed,
                         multi_targeted=True, n_classes=classes),
        torchattacks.Square(adapter, norm=norm_name, eps=eps, n_queries=queries, seed=seed),
    ]
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
    for attack in parts:
        rows = correct.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
            adversarial = attack(images[rows], labels[rows]).detach().clamp(0, 1)
        delta = (adversarial - images[rows]).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        adversarial = torch.where((size <= eps * (1 + 1e-4) + 1e-6)[:, None, None, None],
                                  adversarial, images[rows])  # never count an out-of-ball one
        with torch.no_grad():
            still = model(adversarial).argmax(1) == labels[rows]
        correct[rows] = still
    return correct


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, percent: bool = True) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"
    return str(value)


def write_table(rows: list[dict[str, Any]], out: Path, stem: str, *, title: str,
                notes: list[str] = (), percent: bool = True) -> tuple[Path, Path]:
    """``stem.csv`` and ``stem.md`` of the rows; with ``percent`` the Markdown shows floats
    (accuracies, fractions in the CSV) in percent."""
    out.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", *[f"{n}" for n in notes], "" if notes else "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), percent) for c in columns) + " |")
    lines.append("")
    if percent and any(isinstance(v, float) for row in rows for v in row.values()):
        lines.append("Accuracies in percent (CSV: fractions). union: correct under every"
                     " threat model; unseen_mean: mean over threat models not used in"
                     " training.")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# --------------------------------------------------------------------------------------------
# Sanity checks
# --------------------------------------------------------------------------------------------


#: White-box attacks the masking check runs beside the black-box one, at its norm and bound
#: (50 steps each); the bound-monotone attacks inside that ball join them (see
#: :func:`sanity_checks`).
MASKING_WHITE_BOX = ("apgd_ce", "apgd_dlr")
#: The note written under the sanity table: its values are fractions, not percent.
SANITY_NOTE = ("Values are accuracies as fractions of the images (0–1), not percent."
               " square_not_stronger compares the black-box Square with the per-image worst"
               " case (union) of every white-box attack run inside the same ball.")


def _ball_of(attack: Attack) -> str | None:
    """The Lp ball (``linf`` / ``l2``) an image-space white-box attack stays inside, or None
    (another threat model, or the black-box Square)."""
    if attack.name == "square":
        return None
    if attack.name in ("linf", "lpips_oa"):
        return "linf"
    if attack.name == "l2":
        return "l2"
    return getattr(attack, "norm", None)


def sanity_checks(model: nn.Module, data, specs: list[str], *, limit: int = 200,
                  batch_size: int = 100, seed: int = 0, device: str | torch.device = "cpu",
                  square: tuple[str, ...] = ("linf:8/255",), square_queries: int = 1000,
                  unbounded: str = "linf:bound=1.0,num_iterations=50",
                  white_box: tuple[str, ...] = MASKING_WHITE_BOX,
                  progress: bool = False) -> list[dict[str, Any]]:
    """Gradient-masking checks (perceptual-prior paper, section 4.4). Returns rows
    ``{check, detail, value, passed}``; accuracies are fractions of the images (0–1):

    - ``bound_monotone`` per spec: accuracy at 0.5×, 1×, 2× its bound does not rise (one
      image of slack);
    - ``unbounded``: the ``unbounded`` attack (L∞ PGD with bound 1, i.e. any image) leaves at
      most 2 % accuracy;
    - ``square_not_stronger`` per ``NORM:EPS`` of ``square``: black-box Square accuracy is at
      least the accuracy under the *best white-box attack per image*, minus one image. The
      white-box side is the union (an image counts as broken if any of them breaks it) of the
      ``white_box`` attacks (APGD-CE and APGD-DLR, 50 steps, at ``NORM:EPS``) and every
      bound-monotone attack above whose ball lies inside ``NORM:EPS`` (same norm, bound
      ``<= EPS``). Comparing with APGD-CE alone flags models where APGD-CE merely
      under-attacks (PAT: Square 0.78 vs APGD-CE 0.80 while the white-box union reaches
      0.76). APGD-DLR needs three or more classes and is left out otherwise.
    """
    checks: list[dict[str, Any]] = []
    slack = 1.0 / max(1, min(limit, len(data)))
    white_box_runs: list[tuple[Attack, Tensor]] = []  # (attack, per-image correct)
    for spec in specs:
        attack = prepare_attack(spec, model)
        bounds = [attack.bound * f for f in (0.5, 1.0, 2.0)]
        variants = {f"{b:.4g}": with_params(spec, bound=float(b)) for b in bounds}
        ev = evaluate_model(model, data, variants, limit=limit, batch_size=batch_size,
                            seed=seed, device=device, progress=progress)
        accs = [ev.accuracy(k) for k in variants]
        ok = all(accs[i + 1] <= accs[i] + slack for i in range(len(accs) - 1))
        checks.append({"check": "bound_monotone", "detail": f"{attack.name} at bounds "
                       + ", ".join(variants), "value": " > ".join(f"{a:.3f}" for a in accs),
                       "passed": ok})
        white_box_runs += [(prepare_attack(text, model), ev.correct[key])
                           for key, text in variants.items()]
    ev = evaluate_model(model, data, {"unbounded": unbounded}, limit=limit,
                        batch_size=batch_size, seed=seed, device=device, progress=progress)
    acc = ev.accuracy("unbounded")
    checks.append({"check": "unbounded", "detail": unbounded, "value": f"{acc:.3f}",
                   "passed": acc <= 0.02})
    if square:
        first = next(iter(_batches(data, 1, 1, torch.device(device))))[1]
        with torch.no_grad():
            classes = int(model.to(device).eval()(first).shape[1])
    for text in square:
        norm, _, eps_text = text.partition(":")
        norm = norm.strip().lower()
        eps = parse_number("eps", eps_text)
        runs = {"square": join_spec("square", [("norm", norm), ("bound", eps_text),
                                               ("num_iterations", str(square_queries))])}
        runs.update({name: join_spec(name, [("norm", norm), ("bound", eps_text),
                                             ("num_iterations", "50")])
                     for name in white_box if name != "apgd_dlr" or classes >= 3})
        ev = evaluate_model(model, data, runs, limit=limit, batch_size=batch_size, seed=seed,
                            device=device, progress=progress)
        inside = [(a, correct) for a, correct in white_box_runs
                  if _ball_of(a) == norm and a.bound <= eps * (1 + 1e-6)]
        union = ev.clean.clone()
        for key in runs:
            if key != "square":
                union &= ev.correct[key]
        for _, correct in inside:
            union &= correct
        sq, wb = ev.accuracy("square"), float(union.float().mean())
        names = [f"{k.upper().replace('_', '-')} (50 steps)" for k in runs if k != "square"]
        names += [f"{a.name} {a.bound:.4g}" for a, _ in inside]
        parts = ", ".join(f"{k} {ev.accuracy(k):.3f}" for k in runs if k != "square")
        checks.append({"check": "square_not_stronger", "detail": f"{norm} {eps_text}: Square"
                       f" ({square_queries} queries) vs the per-image best of "
                       + ", ".join(names),
                       "value": f"square {sq:.3f} vs white-box union {wb:.3f} ({parts})",
                       "passed": sq >= wb - slack})
    return checks


# --------------------------------------------------------------------------------------------
# Perceptibility-matched robustness
# --------------------------------------------------------------------------------------------


def load_calibrated_bounds(path: str | Path) -> dict[str, dict[str, float]]:
    """Read ``{threat_model: {label: bound}}`` from JSON (also accepted: that mapping under a
    top-level ``"presets"`` or ``"bounds"`` key). Raises :class:`EngineError` on bad shape."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"calibrated bounds file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path} is not valid JSON: {exc}") from None
    return check_calibrated_bounds(data, str(path))


def check_calibrated_bounds(data: Any, where: str = "calibrated bounds"
                            ) -> dict[str, dict[str, float]]:
    if isinstance(data, dict):
        for key in ("presets", "bounds"):
            if key in data and isinstance(data[key], dict):
                data = data[key]
    if not isinstance(data, dict) or not data:
        raise EngineError(f"{where} must map threat models to {{label: bound}}, got {data!r}")
    out: dict[str, dict[str, float]] = {}
    for threat, table in data.items():
        if not isinstance(table, dict) or not table:
            raise EngineError(f"{where}: {threat!r} must map labels to bounds, got {table!r}")
        out[threat] = {}
        for label, bound in table.items():
            if isinstance(bound, bool) or not isinstance(bound, int | float) or not (
                    math.isfinite(bound) and bound >= 0):
                raise EngineError(f"{where}: bound {threat}/{label} must be a number >= 0,"
                                  f" got {bound!r}")
            out[threat][str(label)] = float(bound)
    return out


def _level(label: str) -> float | None:
    match = re.search(r"(\d+(?:\.\d+)?)", label)
    return float(match.group(1)) if match else None


def perceptibility_matched(model: nn.Module, data, bounds: dict[str, dict[str, float]], *,
                           attack_params: dict[str, str] | None = None, limit: int | None = 200,
                           batch_size: int = 100, seed: int = 0,
                           device: str | torch.device = "cpu", progress: bool = False
                           ) -> list[dict[str, Any]]:
    """Robust accuracy per threat model at each calibrated bound. Rows
    ``{threat_model, level, label, bound, spec, accuracy}`` (``level`` and ``label``: the
    calibrated label, e.g. ``p50``; ``spec``: canonical); ``attack_params`` adds spec
    parameters per threat model (e.g. ``{"linf": "num_iterations=40"}``)."""
    rows = []
    for threat, table in bounds.items():
        base = join_params(threat, (attack_params or {}).get(threat, ""))
        specs = {label: spec for label, spec in zip(
            table, expand_specs([base], [(label, b) for label, b in table.items()]),
            strict=True)}
        ev = evaluate_model(model, data, specs, limit=limit, batch_size=batch_size, seed=seed,
                            device=device, progress=progress)
        for label, bound in table.items():
            rows.append({"threat_model": threat, "level": label, "label": label,
                         "bound": bound, "spec": ev.info[label]["spec"],
                         "accuracy": ev.accuracy(label)})
    return rows


def write_perceptibility(rows_by_model: dict[str, list[dict[str, Any]]], out: Path, *,
                         title: str, notes: list[str] = ()) -> list[Path]:
    """Table (one row per model × threat model, one column per perceptibility level) and a
    curve (``perceptibility.png``: accuracy vs level, one line per model/threat model)."""
    table = []
    for model_name, rows in rows_by_model.items():
        for threat in dict.fromkeys(r["threat_model"] for r in rows):
            mine = [r for r in rows if r["threat_model"] == threat]
            row: dict[str, Any] = {"model": model_name, "threat_model": threat}
            row.update({r["level"]: r["accuracy"] for r in mine})
            row["bounds"] = ", ".join(f"{r['level']}={r['bound']:.4g}" for r in mine)
            table.append(row)
    paths = list(write_table(table, out, "perceptibility", title=title, notes=[
        "Robust accuracy at the bounds where people see each threat model's perturbation"
        " equally often (calibrated from the study): compare threat models along a column.",
        *notes]))
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for model_name, rows in rows_by_model.items():
        for threat in dict.fromkeys(r["threat_model"] for r in rows):
            pts = [r for r in rows if r["threat_model"] == threat]
            xs = [(_level(r["level"]) if _level(r["level"]) is not None else i)
                  for i, r in enumerate(pts)]
            ax.plot(xs, [100 * r["accuracy"] for r in pts], marker="o",
                    label=f"{model_name}: {threat}")
    ax.set_xlabel("perceptibility level (% of people who see the perturbation)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(title if not notes else f"{title}\n{notes[0][:90]}", fontsize=7)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "perceptibility.png", dpi=120)
    paths.append(out / "perceptibility.png")
    return paths
