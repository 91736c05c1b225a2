"""Turning engine output into study rows and files. Management commands stay thin and call this.

The one rule here: bad input writes nothing, and re-running never duplicates or silently
changes what participants already judged. Stimuli are generated into a staging folder first;
rows are upserted by the pair's stable ``key`` inside one transaction; files move into place
only after every check has passed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from django.conf import settings
from django.db import transaction

from engine.attacks import parse_attack
from engine.attacks.spec import expand_specs as spec_expand_specs
from engine.data import load_sources
from engine.distances import build_lpips
from engine.errors import EngineError, WeightsUnavailableError
from engine.models import load_classifier
from engine.stimuli import Manifest, generate_stimuli

from .models import Condition, Pair, Study


class StimulusImportError(Exception):
    """Generated stimuli cannot be stored without changing pairs that were already judged."""


@dataclass(frozen=True)
class GenerationRequest:
    """Arguments of one ``generate_pairs`` run (units: ``size`` in pixels, bounds in specs)."""

    specs: tuple[str, ...]
    images: str = "skimage"
    classifier: str = "resnet50"
    lpips: tuple[str, ...] = ("alexnet",)
    size: int = 224
    crops_per_image: int = 1
    max_images: int | None = None
    sentinels: int | None = None
    catch: int = 0
    seed: int = 0
    batch_size: int = 16
    device: str = "cpu"
    autocast: str | None = None


def expand_specs(specs: list[str], bounds: list[str] | None) -> tuple[str, ...]:
    """Each spec once per bound in ``bounds``: :func:`engine.attacks.spec.expand_specs`
    (names, numbers, or ``VALUE@LABEL``; the specs must then omit ``bound``)."""
    return spec_expand_specs(specs, bounds)


@dataclass(frozen=True)
class ImportSummary:
    created: int
    updated: int
    unchanged: int
    conditions: int
    untrained: tuple[str, ...]


def study_dir(study: Study) -> Path:
    return Path(settings.MEDIA_ROOT) / "studies" / study.slug


def _validate(request: GenerationRequest) -> None:
    """Every cheap check, so that bad input fails before models load or files are written."""
    for spec in request.specs:
        parse_attack(spec)
    if request.device != "cpu" and not request.device.startswith("cuda"):
        raise EngineError(f"unknown device {request.device!r}; use cpu or cuda[:N]")
    if request.autocast not in (None, "bf16"):
        raise EngineError(f"unknown autocast {request.autocast!r}; use bf16 or leave it out")
    if request.device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device {request.device!r} requested but no CUDA GPU is available")


def generate_into_study(
    study: Study, request: GenerationRequest, *, progress: bool = True
) -> ImportSummary:
    """Generate stimuli for ``request`` and store them as rows and files of ``study``.

    Raises :class:`engine.errors.EngineError`, :class:`WeightsUnavailableError` or
    :class:`StimulusImportError`; in each case nothing is written.
    """
    _validate(request)
    sources = load_sources(
        request.images,
        size=request.size,
        crops_per_image=request.crops_per_image,
        max_images=request.max_images,
        seed=request.seed,
    )
    torch.manual_seed(request.seed)  # untrained networks are initialised reproducibly
    classifier = load_classifier(request.classifier)
    lpips_models = {spec.split(":")[0]: build_lpips(spec) for spec in request.lpips}
    target = study_dir(study)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
    try:
        manifest = generate_stimuli(
            sources,
            list(request.specs),
            classifier,
            staging,
            lpips_models=lpips_models,
            seed=request.seed,
            batch_size=request.batch_size,
            sentinels=request.sentinels,
            catch=request.catch,
            device=request.device,
            autocast=request.autocast,
            progress=progress,
        )
        return import_manifest(study, manifest, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _untrained(generator: dict) -> tuple[str, ...]:
    names = []
    if generator.get("weights") == "untrained":
        names.append(f"classifier {generator.get('classifier')}")
    for name, desc in generator.get("lpips_models", {}).items():
        if desc.get("lpips_weights") == "untrained":
            names.append(f"LPIPS {name}")
    return tuple(names)


@transaction.atomic
def import_manifest(study: Study, manifest: Manifest, staging: Path) -> ImportSummary:
    """Upsert ``manifest``'s conditions and pairs into ``study``; move files from ``staging``.

    A pair whose images would change after it has been shown in a trial is refused
    (:class:`StimulusImportError`) and the whole import rolls back.
    """
    study = Study.objects.select_for_update().get(pk=study.pk)
    prefix = f"studies/{study.slug}/"
    existing = {p.key: p for p in study.pairs.all()}
    shown = set(study.pairs.filter(trials__isnull=False).values_list("key", flat=True).distinct())
    changed_shown = [
        r.key
        for r in manifest.pairs
        if r.key in shown
        and (
            existing[r.key].metadata.get("natural_sha256") != r.natural_sha256
            or existing[r.key].metadata.get("other_sha256") != r.other_sha256
        )
    ]
    if changed_shown:
        raise StimulusImportError(
            f"{len(changed_shown)} pair(s) already shown to participants would get different"
            f" images (first: {changed_shown[0]!r}); use a new study slug or the same seed,"
            " networks and settings as before"
        )

    conditions = {}
    for c in manifest.conditions:
        conditions[c["spec"]], _ = Condition.objects.update_or_create(
            study=study,
            spec=c["spec"],
            defaults={
                "threat_model": c["threat_model"],
                "bound": c["bound"],
                "label": c.get("label", ""),
            },
        )
    created = updated = unchanged = 0
    for r in manifest.pairs:
        fields = {
            "condition": conditions.get(r.condition) if r.condition else None,
            "is_sentinel": r.is_sentinel,
            "is_catch": r.is_catch,
            "source_image": r.source_image,
            "natural_path": prefix + r.natural_path,
            "other_path": prefix + r.other_path,
            "width": r.width,
            "height": r.height,
            "label": r.label,
            "adversarial_label": r.adversarial_label,
            "attack_success": r.attack_success,
            "distances": r.distances,
            "metadata": {
                "natural_sha256": r.natural_sha256,
                "other_sha256": r.other_sha256,
                "size": r.size,
                "within_bound": r.within_bound,
                "stored_size": r.stored_size,
                "within_bound_stored": r.within_bound_stored,
                "size_ratio": r.size_ratio,
                "at_bound": r.at_bound,
                "fit_scale": r.fit_scale,
                "attack_measures": r.attack_measures,
                "origin": r.origin,
                "threat_model": r.threat_model,
                "bound": r.bound,
            },
        }
        old = existing.get(r.key)
        if old is None:
            Pair.objects.create(study=study, key=r.key, **fields)
            created += 1
        elif any(getattr(old, k) != v for k, v in fields.items()):
            Pair.objects.filter(pk=old.pk).update(**fields)
            updated += 1
        else:
            unchanged += 1
    generation = dict(manifest.generator, conditions=[c["spec"] for c in manifest.conditions])
    untrained = _untrained(manifest.generator)
    study.generation = generation
    if untrained and "untrained" not in study.description:
        study.description = (
            study.description + "\n" if study.description else ""
        ) + f"Generated with UNTRAINED networks: {', '.join(untrained)}."
    study.save(update_fields=["generation", "description"])

    target = study_dir(study)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            dest = target / path.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
    return ImportSummary(created, updated, unchanged, len(conditions), untrained)


def pretrained_or_untrained(load, spec: str, log) -> str:
    """``spec`` if its pretrained weights load, else ``ARCH:untrained`` (logged loudly).

    Only the demo uses this, because it must run offline; ``generate_pairs`` never falls back.
    """
    try:
        load(spec)
        return spec
    except WeightsUnavailableError as exc:
        fallback = f"{spec.split(':')[0]}:untrained"
        log(f"WARNING: {exc}\n  -> using the UNTRAINED network {fallback!r} instead.")
        return fallback
