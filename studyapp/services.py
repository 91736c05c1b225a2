"""Turning the engine's output folders into study rows and files. Commands stay thin.

There is one generation pipeline: :func:`engine.generate.generate` writes PNG pairs and a
manifest into a folder (``python -m engine generate``, on any machine, 1 or N ranks), and
:func:`import_folder` stores such a folder in a study (``manage.py import_pairs``).
``generate_pairs`` is exactly the two in one process (:func:`generate_into_study`), so the
same request and seed give byte-identical pairs and equal rows by either route.

The rules of an import:

- everything is checked before anything is written (:func:`validate_manifest`): every
  file's SHA-256, the spec grammar (:mod:`engine.attacks.spec`), the labels, the bounds
  (recorded ones agree with the specs; Lp sizes re-measured from the PNGs are within them)
  and the networks (known architectures, a weights state each, distance columns that name
  them, the same networks as the study's earlier pairs);
- files are copied into a staging folder first and moved into place only after the rows
  were written, inside one transaction: any error writes nothing;
- rows are upserted by the pair's stable ``key``: re-importing a manifest changes nothing;
- a pair already shown to participants is never changed (:class:`StimulusImportError`);
- protocols (issue 18; version 3 manifests): the manifest's protocol must be the study's
  (``Study.protocol``); 2AFC copy B is checked as copy A is (hash, condition, Lp size
  re-measured from the PNGs); a label item's class must be in the study's ``label_set`` (a
  label study without one takes the manifest's). Rows per the contract: ``natural_path`` =
  reference, ``other_path`` = A, ``third_path`` = B, ``condition_b``, ``distances_b``,
  ``class_name``.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import transaction
from PIL import Image

from engine.attacks import parse_attack
from engine.attacks.spec import check_label
from engine.errors import EngineError, WeightsUnavailableError
from engine.generate import GenerateRequest, generate
from engine.models import KNOWN_ARCHITECTURES, parse_network
from engine.provenance import untrained_networks
from engine.stimuli import MANIFEST_VERSION, Manifest

from . import stimulus_rows
from .models import Condition, Pair, Study
from .protocols import label_set_problem

__all__ = [
    "GenerateRequest", "ImportSummary", "StimulusImportError", "WeightsUnavailableError",
    "generate_into_study", "import_folder", "manifest_settings", "pretrained_or_untrained",
    "study_dir", "validate_manifest",
]

#: Relative tolerance of a bound check (the engine's, :func:`engine.stimuli._le`).
BOUND_RTOL = 1e-4
#: ``Pair.key``'s length limit.
KEY_LENGTH = Pair._meta.get_field("key").max_length
#: Threat models whose stored size :func:`validate_manifest` re-measures from the PNGs.
LP_NORMS = {"linf": lambda d: float(np.abs(d).max()), "l2": lambda d: float(np.linalg.norm(d))}


class StimulusImportError(Exception):
    """A folder cannot be imported: it fails a check, or it would change pairs that were
    already shown to participants. Nothing was written."""


@dataclass(frozen=True)
class ImportSummary:
    created: int
    updated: int
    unchanged: int
    conditions: int
    untrained: tuple[str, ...]


def study_dir(study: Study) -> Path:
    return Path(settings.MEDIA_ROOT) / "studies" / study.slug


def generate_into_study(
    study: Study, request: GenerateRequest, *, progress: bool = True
) -> ImportSummary:
    """``python -m engine generate`` into a staging folder, then :func:`import_folder`.

    Raises :class:`engine.errors.EngineError`, :class:`WeightsUnavailableError` or
    :class:`StimulusImportError`; in each case nothing is written.
    """
    request.check()
    target = study_dir(study)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
    try:
        generate(replace(request, out=str(staging), progress=progress))
        return import_folder(study, staging, staged=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _safe(folder: Path, rel: str) -> Path:
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or ".." in Path(
            rel).parts or "\\" in rel:
        raise StimulusImportError(f"manifest names an unsafe file path {rel!r}")
    return folder / rel


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64) / 255


def manifest_settings(manifest: Manifest) -> dict:
    """The Study fields a study created for ``manifest`` takes: its ``protocol`` and, where
    the manifest has them, ``rating_shows`` and ``label_set``."""
    out: dict = {"protocol": manifest.protocol}
    if manifest.rating_shows is not None:
        out["rating_shows"] = manifest.rating_shows
    if manifest.label_set is not None:
        out["label_set"] = list(manifest.label_set)
    return out


def _check_protocol(manifest: Manifest, study: Study | None) -> None:
    """The manifest's protocol and label set against ``study``'s."""
    if study is not None and study.protocol != manifest.protocol:
        raise StimulusImportError(
            f"study {study.slug!r} is a {study.protocol} study and this folder holds"
            f" {manifest.protocol} items (generated with --protocol {manifest.protocol}); use a"
            " new study slug, or generate the folder for the study's protocol")
    if manifest.protocol != "label":
        return
    if not manifest.label_set:
        raise StimulusImportError("a label manifest without a label set")
    problem = label_set_problem(list(manifest.label_set))
    if problem:
        raise StimulusImportError(f"the manifest's label set cannot be answered: {problem}")
    allowed = set(manifest.label_set)
    where = "the manifest's label set"
    if study is not None and study.label_set:
        allowed, where = set(study.label_set), f"study {study.slug!r}'s label set"
    for p in manifest.pairs:
        if not p.class_name or p.class_name not in allowed:
            raise StimulusImportError(
                f"label item {p.key!r}: its class {p.class_name!r} is not in {where}"
                f" ({', '.join(sorted(allowed)[:12])}{', …' if len(allowed) > 12 else ''})")


def _measure_lp(folder: Path, key: str, threat_model: str | None, bound: float | None,
                natural: str, other: str, stored_size: float | None, copy: str = "") -> None:
    """Re-measure an Lp pair's size from its PNGs: within the bound, equal to the record."""
    measure = LP_NORMS.get(threat_model)
    if measure is None:
        return
    size = measure(_pixels(folder / other) - _pixels(folder / natural))
    if size > bound * (1 + BOUND_RTOL) + 1e-9:
        raise StimulusImportError(
            f"pair {key!r}: its stored images{copy} differ by {threat_model} {size:.6g},"
            f" over the bound {bound:.6g}")
    if stored_size is None or not math.isclose(size, stored_size, rel_tol=1e-4, abs_tol=1e-6):
        raise StimulusImportError(
            f"pair {key!r}: recorded stored size{copy} {stored_size!r} is not the"
            f" {threat_model} size of its images ({size:.6g})")


def _check_item(manifest: Manifest, p, conditions: dict, folder: Path) -> None:
    """The protocol-specific shape of one item of a version 3 manifest (2AFC copy B is
    checked as copy A is; controls show the natural image unchanged)."""
    protocol = manifest.protocol
    if p.is_sentinel and p.other_path != p.natural_path:
        raise StimulusImportError(f"control item {p.key!r} does not show its natural image"
                                  " unchanged (other_path differs from natural_path)")
    if not p.is_sentinel and not p.is_catch and p.other_path == p.natural_path:
        raise StimulusImportError(f"item {p.key!r} shows its natural image unchanged but is"
                                  " not a control")
    if p.is_catch and protocol != "jnd":
        raise StimulusImportError(f"item {p.key!r}: catch pairs are JND attention checks, not"
                                  f" {protocol} items")
    b_fields = (p.third_path, p.condition_b, p.distances_b)
    if protocol != "2afc":
        if any(x is not None for x in b_fields):
            raise StimulusImportError(f"item {p.key!r}: a third image or copy B is for 2AFC"
                                      f" triplets, not {protocol} items")
        return
    if p.third_path is None or p.condition_b is None or not isinstance(p.distances_b, dict):
        raise StimulusImportError(f"2AFC triplet {p.key!r} lacks copy B (third_path,"
                                  " condition_b, distances_b)")
    if p.third_path in (p.natural_path, p.other_path):
        raise StimulusImportError(f"2AFC triplet {p.key!r}: copy B must be a perturbed copy,"
                                  " other than the reference and copy A")
    c = conditions.get(p.condition_b)
    if c is None:
        raise StimulusImportError(f"2AFC triplet {p.key!r}: unknown condition_b"
                                  f" {p.condition_b!r}")
    if p.condition_b == p.condition:
        raise StimulusImportError(f"2AFC triplet {p.key!r}: A and B have one condition")
    if p.threat_model_b != c["threat_model"] or p.bound_b != c["bound"]:
        raise StimulusImportError(f"2AFC triplet {p.key!r}: copy B's threat model/bound"
                                  f" differ from its condition {p.condition_b!r}")
    if set(p.distances_b) != set(p.distances):
        raise StimulusImportError(f"2AFC triplet {p.key!r}: distances_b"
                                  f" {sorted(p.distances_b)} do not name the distances"
                                  f" {sorted(p.distances)}")
    measures = p.measures_b if isinstance(p.measures_b, dict) else {}
    _measure_lp(folder, p.key, p.threat_model_b, p.bound_b, p.natural_path, p.third_path,
                measures.get("stored_size"), " (reference and copy B)")


def validate_manifest(manifest: Manifest, folder: Path, study: Study | None = None) -> None:
    """Every check of an import, before anything is written; :class:`StimulusImportError`
    naming the first problem. ``study``: also check the networks match its earlier pairs,
    and the protocol and label set are the study's."""
    _check_protocol(manifest, study)
    # Files: each present, each with the recorded SHA-256.
    for rel, digest in manifest.files.items():
        path = _safe(folder, rel)
        if not path.is_file():
            raise StimulusImportError(f"{rel}: listed in the manifest but missing in {folder}")
        if not isinstance(digest, str):
            raise StimulusImportError(f"{rel}: the manifest gives no SHA-256 for it")
        actual = _sha256(path)
        if actual != digest:
            raise StimulusImportError(
                f"{rel}: SHA-256 {actual[:16]}… does not match the manifest's {digest[:16]}…"
                " (file changed or corrupted after generation)")
    # Specs, labels, levels, bounds of the conditions (spec.py reads the text).
    conditions: dict[str, dict] = {}
    for c in manifest.conditions:
        if not isinstance(c, dict):
            raise StimulusImportError(f"manifest condition {c!r} is not a JSON object")
        spec = c.get("spec")
        try:
            attack = parse_attack(spec)
            check_label(c.get("label", ""))
        except EngineError as exc:
            raise StimulusImportError(f"condition {spec!r}: {exc}") from None
        if attack.spec != spec:
            raise StimulusImportError(f"condition {spec!r} is not in canonical form (the"
                                      f" engine writes {attack.spec!r})")
        if c.get("threat_model") != attack.name or c.get("bound") != float(attack.bound):
            raise StimulusImportError(
                f"condition {spec!r}: recorded threat model/bound {c.get('threat_model')!r}/"
                f"{c.get('bound')!r} disagree with its spec ({attack.name}/{attack.bound!r})")
        level = c.get("level")
        if level is not None and (not isinstance(level, int) or level < 0):
            raise StimulusImportError(f"condition {spec!r}: ladder level {level!r} is not an"
                                      " integer >= 0")
        if spec in conditions:
            raise StimulusImportError(f"condition {spec!r} is listed twice")
        conditions[spec] = c
    # Networks: known architectures, a weights state each, distance columns that name them.
    networks = manifest.generator.get("networks")
    if not isinstance(networks, list) or not networks:
        raise StimulusImportError("the manifest lists no networks (written by an older engine?"
                                  " generate it again with `python -m engine generate`)")
    columns = set()
    for net in networks:
        if not isinstance(net, dict):
            raise StimulusImportError(f"manifest network {net!r} is not a JSON object")
        weights = str(net.get("weights", ""))
        if weights not in ("pretrained", "untrained") and not weights.startswith(
                ("sha256:", "file:")):
            raise StimulusImportError(f"network {net.get('spec')!r}: unknown weights state"
                                      f" {weights!r} (pretrained, untrained or sha256:…)")
        if net.get("role") == "lpips":
            if net.get("arch") not in KNOWN_ARCHITECTURES:
                raise StimulusImportError(f"LPIPS network {net.get('arch')!r} is unknown")
            columns.add(net.get("column"))
    if study is not None:
        before = (study.generation or {}).get("networks")
        if before and study.pairs.exists() and _network_set(before) != _network_set(networks):
            raise StimulusImportError(
                f"study {study.slug!r} has pairs made with other networks"
                f" ({_describe(before)}) than this folder ({_describe(networks)}); their"
                " distances would not be comparable: use a new study")
    # Pairs: their condition, bound and distance columns; Lp sizes re-measured.
    keys = set()
    for p in manifest.pairs:
        if p.key in keys:
            raise StimulusImportError(f"pair {p.key!r} is listed twice")
        keys.add(p.key)
        lpips = {k for k in p.distances if k.startswith("lpips_")}
        if lpips != columns:
            raise StimulusImportError(
                f"pair {p.key!r}: LPIPS columns {sorted(lpips)} do not match the manifest's"
                f" networks {sorted(columns)}")
        if len(p.key) > KEY_LENGTH:
            raise StimulusImportError(f"pair key {p.key[:60]!r}… is longer than {KEY_LENGTH}"
                                      " characters")
        if manifest.version != MANIFEST_VERSION:
            _check_item(manifest, p, conditions, folder)
        if p.is_sentinel or p.is_catch:
            if p.condition is not None or (p.is_sentinel and p.is_catch):
                raise StimulusImportError(f"control pair {p.key!r} has a condition")
            continue
        c = conditions.get(p.condition)
        if c is None:
            raise StimulusImportError(f"pair {p.key!r}: unknown condition {p.condition!r}")
        if p.threat_model != c["threat_model"] or p.bound != c["bound"]:
            raise StimulusImportError(f"pair {p.key!r}: threat model/bound differ from its"
                                      f" condition {p.condition!r}")
        _measure_lp(folder, p.key, p.threat_model, p.bound, p.natural_path, p.other_path,
                    p.stored_size)


def _network_set(networks: list[dict]) -> set[tuple]:
    return {(n.get("role"), n.get("spec"), n.get("weights")) for n in networks}


def _describe(networks: list[dict]) -> str:
    return ", ".join(f"{n.get('role')} {n.get('spec')} [{n.get('weights')}]" for n in networks)


def import_folder(study: Study, folder: str | Path, *, staged: bool = False) -> ImportSummary:
    """Store the manifest folder ``folder`` in ``study`` (see the module's rules).

    ``staged``: ``folder`` is a private staging folder inside the study's media folder whose
    files may be moved; otherwise the files are copied into one first.
    """
    folder = Path(folder)
    try:
        manifest = Manifest.read(folder)
    except EngineError as exc:
        raise StimulusImportError(str(exc)) from None
    validate_manifest(manifest, folder, study)
    if staged:
        return _store(study, manifest, folder)
    target = study_dir(study)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
    try:
        for rel, digest in manifest.files.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / rel, dest)
            if _sha256(dest) != digest:  # the folder changed while we were reading it
                raise StimulusImportError(f"{rel}: changed while being imported; try again")
        return _store(study, manifest, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pair_fields(r, conditions: dict, levels: dict, prefix: str) -> dict:
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
        "level": levels.get(r.condition) if r.condition else None,
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
        # Protocol fields (issue 18): the model's defaults for JND pairs.
        "third_path": prefix + r.third_path if r.third_path else "",
        "condition_b": conditions.get(r.condition_b) if r.condition_b else None,
        "distances_b": r.distances_b or {},
        "class_name": r.class_name or "",
    }
    if r.third_path:  # 2AFC copy B's own numbers, as copy A's above
        fields["metadata"]["third_sha256"] = r.third_sha256
        fields["metadata"]["b"] = r.measures_b
    return fields


@transaction.atomic
def _store(study: Study, manifest: Manifest, staging: Path) -> ImportSummary:
    """Upsert ``manifest``'s conditions and pairs into ``study``; move files from
    ``staging`` into place last. Refuses (and rolls back) any change to a shown pair."""
    study = Study.objects.select_for_update().get(pk=study.pk)
    prefix = f"studies/{study.slug}/"
    target = study_dir(study)
    existing = {p.key: p for p in study.pairs.select_related("condition")}
    shown_pairs = study.pairs.filter(trials__isnull=False).select_related("condition").distinct()
    shown = {p.key: p for p in shown_pairs}
    # Files a shown pair uses must keep their bytes, even where the new manifest's pairs differ.
    shown_files = {path for p in shown.values()
                   for path in (p.natural_path, p.other_path, p.third_path) if path}
    for rel, digest in manifest.files.items():
        dest = target / rel
        if prefix + rel in shown_files and dest.is_file() and _sha256(dest) != digest:
            raise StimulusImportError(
                f"{prefix + rel} is already shown to participants and this folder has"
                " different bytes for it; use a new study slug or the same seed, networks and"
                " settings")

    conditions: dict[str, Condition] = {}
    levels: dict[str, int | None] = {}
    old_conditions = {c.spec: c for c in Condition.objects.filter(study=study)}
    shown_conditions = {p.condition.spec for p in shown.values() if p.condition_id}
    shown_conditions |= set(study.pairs.filter(trials__isnull=False, condition_b__isnull=False)
                            .values_list("condition_b__spec", flat=True))
    for c in manifest.conditions:
        label = c.get("label", "")
        old = old_conditions.get(c["spec"])
        if old is not None and old.label != label and c["spec"] in shown_conditions:
            raise StimulusImportError(
                f"condition {c['spec']!r} was shown to participants labelled {old.label!r};"
                f" this folder labels it {label!r}")
        conditions[c["spec"]], _ = Condition.objects.update_or_create(
            study=study, spec=c["spec"],
            defaults={"threat_model": c["threat_model"], "bound": c["bound"], "label": label})
        levels[c["spec"]] = c.get("level")

    created = updated = unchanged = 0
    changed_shown = []
    for r in manifest.pairs:
        fields = _pair_fields(r, conditions, levels, prefix)
        old = existing.get(r.key)
        if old is None:
            Pair.objects.create(study=study, key=r.key, **fields)
            created += 1
        elif any(getattr(old, k) != v for k, v in fields.items()):
            if r.key in shown:
                changed_shown.append(r.key)
                continue
            Pair.objects.filter(pk=old.pk).update(**fields)
            updated += 1
        else:
            unchanged += 1
    if changed_shown:
        raise StimulusImportError(
            f"{len(changed_shown)} pair(s) already shown to participants would change (first:"
            f" {changed_shown[0]!r}); use a new study slug or the same seed, networks and"
            " settings as before")

    generator = manifest.generator
    untrained = tuple(untrained_networks(generator.get("networks", [])))
    study.generation = dict(generator, conditions=[c["spec"] for c in manifest.conditions])
    if untrained and "untrained" not in study.description.lower():
        study.description = (
            study.description + "\n" if study.description else ""
        ) + f"Generated with UNTRAINED networks: {', '.join(untrained)}."
    ladder = _ladder(manifest)
    if ladder:
        config = dict(study.adaptive_config)
        merged = {tm: dict(config.get("ladder", {}).get(tm, {})) for tm in ladder}
        for tm, steps in ladder.items():
            merged[tm].update(steps)
        config["ladder"] = {**config.get("ladder", {}), **merged}
        if "request" in generator:  # what refill needs to make more pairs the same way
            config["generation"] = {**generator["request"], "specs": None, "levels": None}
        study.adaptive_config = config
    update = ["generation", "description", "adaptive_config"]
    if manifest.protocol == "label" and not study.label_set:
        study.label_set = list(manifest.label_set)  # a label study without answers yet
        update.append("label_set")
    study.save(update_fields=update)

    for rel, digest in manifest.files.items():
        dest = target / rel
        if dest.is_file() and _sha256(dest) == digest:
            continue  # already in place (re-import): leave it untouched
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dest)
    # Decoded now (2AFC copy B included), so no first serving is slower (issues 17, 18).
    stimulus_rows.prepare_study(study)
    return ImportSummary(created, updated, unchanged, len(conditions), untrained)


def _ladder(manifest: Manifest) -> dict[str, dict[str, dict]]:
    """``{threat model: {level: {bound, spec, given}}}`` of the manifest's ladder conditions
    (``given``: the spec as requested, with its ``@L<level>`` label, for ``refill``)."""
    out: dict[str, dict[str, dict]] = {}
    for c in manifest.conditions:
        if c.get("level") is not None:
            out.setdefault(c["threat_model"], {})[str(c["level"])] = {
                "bound": c["bound"], "spec": c["spec"], "given": c.get("given", c["spec"])}
    return out


def pretrained_or_untrained(load, spec: str, log) -> str:
    """``spec`` if its pretrained weights load, else ``ARCH:untrained`` (logged loudly).

    Only the demo uses this, because it must run offline; ``generate_pairs`` never falls back.
    """
    try:
        load(spec)
        return spec
    except WeightsUnavailableError as exc:
        fallback = f"{parse_network(spec).arch}:untrained"
        log(f"WARNING: {exc}\n  -> using the UNTRAINED network {fallback!r} instead.")
        return fallback
