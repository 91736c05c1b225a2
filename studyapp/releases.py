"""Dataset releases: a self-describing folder per study, and the BAPPS JND layout.

Release layout (``export_release`` → ``import_release``)::

    OUT/README.md          datasheet: every column, the exclusions, the provenance
    OUT/study.json         protocol settings and generation metadata of the study
    OUT/conditions.csv     OUT/pairs.csv     OUT/participants.csv
    OUT/sessions.csv       OUT/judgments.csv
    OUT/fits.json          every stored calibration (psychometric fits and presets)
    OUT/images/NNNNN.png   every image shown, lossless, named by first appearance

Identifiers in the tables are release-local (``P0001``, ``S0001``, pair 1..n in pair order),
so nothing links a row back to a worker id, and export → import → export gives byte-identical
tables. Practice trials are included (``is_practice``) and never analysed.

BAPPS JND layout (Zhang et al. 2018; read by the LPIPS repository's ``JNDDataset`` and
``score_jnd_dataset``)::

    OUT/p0/NNNNNN.png  OUT/p1/NNNNNN.png  OUT/same/NNNNNN.npy  (fraction answering "same")

plus ``OUT/pairs.csv`` naming the pair behind each index.

A study of another protocol (2AFC, rating, label) adds, and only then (JND releases stay as they
were, byte for byte): its protocol settings to ``study.json``; ``third_image``,
``third_sha256``, ``condition_b``, ``class_name`` and ``b_distance_*`` to ``pairs.csv``;
``is_repeat`` to ``judgments.csv`` (see ``PROTOCOL_COLUMNS``). One-image protocols leave
``blank_ms``/``second_ms`` empty.

2AFC studies also go out in the BAPPS 2AFC layout (``export_bapps_2afc``: ref/, p0/ = copy A,
p1/ = copy B, judge/ = fraction choosing B) and the NIGHTS layout of DreamSim
(``export_nights``: data.csv, ref/, distort/), and come back in from either
(``import_bapps_2afc``, ``import_nights``); the layouts themselves live in
:mod:`engine.release_formats`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone
from PIL import Image

from engine.release_formats import (
    ReleaseFormatError,
    Triplet,
    load_pixels,
    read_bapps_2afc,
    read_nights,
    write_bapps_2afc,
    write_nights,
)

from .models import (
    Calibration,
    Condition,
    Judgment,
    Pair,
    Participant,
    Session,
    Study,
    Trial,
)
from .protocols import BadResponse, validate_response

FORMAT = "perceptlab-release/1"

STUDY_FIELDS = [
    "title", "description", "instructions", "first_ms", "blank_ms", "second_ms",
    "trials_per_session", "sentinel_fraction", "judgments_per_pair", "generation",
    "consent_text", "key_same", "key_different", "randomize_first", "catch_fraction",
    "practice_trials", "break_every", "lease_minutes", "fast_response_ms",
    "max_sentinel_false_alarm", "min_catch_hit_rate", "max_fast_share", "adaptive",
    "adaptive_config",
]
#: Written to study.json only for a study whose protocol is not JND (JND releases unchanged).
PROTOCOL_STUDY_FIELDS = ["protocol", "rating_points", "rating_shows", "retest_fraction",
                         "label_set"]

COLUMNS: dict[str, dict[str, str]] = {
    "conditions.csv": {
        "condition": "Canonical attack spec (threat model and every parameter).",
        "threat_model": "Threat model name (linf, l2, jpeg_linf, stadv, recoloradv, lpa ...).",
        "bound": "Bound in the threat model's own units (Lp: [0,1] pixel scale).",
        "label": "Named bound (small/medium/large), calibrated label (p10/p25/p50) or ladder"
        " level (L0..); empty if none.",
    },
    "pairs.csv": {
        "pair": "Release-local pair number (1..n).",
        "key": "Stable identity in the study: source image + spec (or sentinel/catch).",
        "condition": "Spec of the pair's condition; empty for sentinel and catch pairs.",
        "is_sentinel": "1: the same image twice (a 'same' answer is correct).",
        "is_catch": "1: two different photographs (an attention check).",
        "source_image": "Which natural image and crop.",
        "natural_image": "File under images/ of the natural image.",
        "other_image": "File under images/ of the perturbed (or second) image.",
        "width": "Pixels.", "height": "Pixels.",
        "label": "Class the attack started from (classifier index); empty if unknown.",
        "adversarial_label": "Class after the attack; empty if unknown.",
        "attack_success": "1 if the attack changed the classifier's decision; empty if unknown.",
        "level": "Ladder index of an adaptive study (0 = smallest bound); empty otherwise.",
        "natural_sha256": "SHA-256 of the natural image file.",
        "other_sha256": "SHA-256 of the other image file.",
        "distance_*": "Distance between the two images as stored with the pair: l2 and linf on"
        " the [0,1] scale, ssim (similarity), lpips_<network> ...",
    },
    "participants.csv": {
        "participant": "Pseudonym (P0001 ...); no worker id is released.",
        "source": "Recruitment source: link, mturk or prolific.",
        "is_simulated": "1: a simulated observer (simulate_observers), not a person.",
    },
    "sessions.csv": {
        "session": "Pseudonym (S0001 ...).",
        "participant": "Pseudonym of its participant.",
        "started_at": "UTC, ISO 8601.", "completed_at": "UTC; empty if never completed.",
        "abandoned_at": "UTC, when its leases expired unanswered; empty otherwise.",
        "excluded": "1: excluded by quality control (analyses leave it out by default).",
        "exclusion_reason": "Why (rules broken, or a staff decision).",
    },
    "judgments.csv": {
        "session": "Pseudonym of the session.",
        "position": "0-based trial position within the session.",
        "pair": "Release-local pair number.",
        "is_practice": "1: a practice trial with feedback (never analysed).",
        "natural_first": "1: the natural image was shown first.",
        "response": "same or different.",
        "response_time_ms": "From the response prompt to the answer, ms.",
        "first_ms": "Measured on-screen time of the first image, ms.",
        "blank_ms": "Measured blank between the images, ms.",
        "second_ms": "Measured on-screen time of the second image, ms.",
    },
}


#: Columns that only releases of non-JND studies carry (after the columns above).
PROTOCOL_COLUMNS: dict[str, dict[str, str]] = {
    "pairs.csv": {
        "third_image": "2AFC: file under images/ of copy B (natural_image is the reference,"
        " other_image copy A); empty otherwise.",
        "third_sha256": "SHA-256 of the third image file; empty if none.",
        "condition_b": "2AFC: spec of copy B's condition (condition is copy A's); empty for"
        " an unperturbed copy and for other protocols.",
        "class_name": "Label protocol: the source image's true class (one of the study's"
        " label_set); empty otherwise.",
        "b_distance_*": "2AFC: distance between the reference and copy B (the distance_*"
        " columns are reference to copy A).",
    },
    "judgments.csv": {
        "is_repeat": "1: a retest, the item was shown earlier in the same session.",
    },
}


class ReleaseError(ValueError):
    """A release folder that cannot be written or read back (the message says what)."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _b(value) -> str:
    return "" if value is None else ("1" if value else "0")


def _num(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not np.isfinite(value):
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def _time(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _read_csv(folder: Path, name: str) -> list[dict[str, str]]:
    path = folder / name
    if not path.is_file():
        raise ReleaseError(f"{folder} is not a release: {name} is missing")
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def distance_names(study: Study, field: str = "distances") -> list[str]:
    names: set[str] = set()
    for d in Pair.objects.filter(study=study).values_list(field, flat=True):
        names.update(d or {})
    return sorted(names)


# ------------------------------------------------------------------------------ export


def export_release(study: Study, out: Path, *, code_version: str = "") -> dict[str, int]:
    """Write ``study`` as a release folder ``out`` (must not exist or be empty)."""
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out} exists and is not empty; choose a new folder")
    media = Path(settings.MEDIA_ROOT)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pairs = list(Pair.objects.filter(study=study).select_related("condition", "condition_b")
                 .order_by("id"))
    extended = study.protocol != "jnd"  # JND releases keep today's columns, byte for byte
    images: dict[str, str] = {}
    for pair in pairs:
        for rel in (pair.natural_path, pair.other_path, pair.third_path):
            if rel and rel not in images:
                source = media / rel
                if not source.is_file():
                    raise ReleaseError(f"pair {pair.key!r}: image {rel} is missing under "
                                       f"MEDIA_ROOT ({media})")
                images[rel] = f"{len(images) + 1:05d}.png"
                shutil.copyfile(source, out / "images" / images[rel])
    conditions = Condition.objects.filter(study=study).order_by("threat_model", "bound", "spec")
    _write_csv(out / "conditions.csv", list(COLUMNS["conditions.csv"]),
               [[c.spec, c.threat_model, _num(c.bound), c.label] for c in conditions])
    dists = distance_names(study)
    dists_b = distance_names(study, "distances_b") if extended else []
    number = {p.pk: i + 1 for i, p in enumerate(pairs)}
    header = [c for c in COLUMNS["pairs.csv"] if c != "distance_*"] + [
        f"distance_{d}" for d in dists]
    if extended:
        header += [c for c in PROTOCOL_COLUMNS["pairs.csv"] if c != "b_distance_*"] + [
            f"b_distance_{d}" for d in dists_b]
    rows = []
    for p in pairs:
        extra = []
        if extended:
            third = images[p.third_path] if p.third_path else ""
            extra = [third, _sha256(out / "images" / third) if third else "",
                     p.condition_b.spec if p.condition_b else "", p.class_name,
                     *[_num((p.distances_b or {}).get(d)) for d in dists_b]]
        rows.append([
            number[p.pk], p.key, p.condition.spec if p.condition else "", _b(p.is_sentinel),
            _b(p.is_catch), p.source_image, images[p.natural_path], images[p.other_path],
            p.width, p.height, _num(p.label), _num(p.adversarial_label), _b(p.attack_success),
            _num(p.level), _sha256(out / "images" / images[p.natural_path]),
            _sha256(out / "images" / images[p.other_path]),
            *[_num((p.distances or {}).get(d)) for d in dists], *extra,
        ])
    _write_csv(out / "pairs.csv", header, rows)

    people = list(Participant.objects.filter(study=study).order_by("id"))
    pseudonym = {p.pk: f"P{i + 1:04d}" for i, p in enumerate(people)}
    _write_csv(out / "participants.csv", list(COLUMNS["participants.csv"]),
               [[pseudonym[p.pk], p.source, _b(p.is_simulated)] for p in people])
    sessions = list(Session.objects.filter(participant__study=study).order_by("id"))
    session_name = {s.pk: f"S{i + 1:04d}" for i, s in enumerate(sessions)}
    _write_csv(out / "sessions.csv", list(COLUMNS["sessions.csv"]), [
        [session_name[s.pk], pseudonym[s.participant_id], _time(s.started_at),
         _time(s.completed_at), _time(s.abandoned_at), _b(s.excluded), s.exclusion_reason]
        for s in sessions
    ])
    judgments = (
        Judgment.objects.filter(trial__session__participant__study=study)
        .order_by("trial__session_id", "trial__position")
        .values_list("trial__session_id", "trial__position", "trial__pair_id",
                     "trial__is_practice", "trial__natural_first", "response",
                     "response_time_ms", "first_ms", "blank_ms", "second_ms",
                     "trial__is_repeat")
    )
    judgment_header = list(COLUMNS["judgments.csv"]) + (
        list(PROTOCOL_COLUMNS["judgments.csv"]) if extended else [])
    _write_csv(out / "judgments.csv", judgment_header, [
        [session_name[s], pos, number[pair], _b(prac), _b(nf), resp, _num(rt), _num(f),
         _num(b), _num(sec), *([_b(rep)] if extended else [])]
        for s, pos, pair, prac, nf, resp, rt, f, b, sec, rep
        in judgments.iterator(chunk_size=20_000)
    ])
    study_json = {"format": FORMAT, "slug": study.slug,
                  **{f: getattr(study, f) for f in STUDY_FIELDS}}
    if extended:
        study_json.update({f: getattr(study, f) for f in PROTOCOL_STUDY_FIELDS})
    (out / "study.json").write_text(json.dumps(study_json, indent=1, sort_keys=True) + "\n")
    fits = [
        {"created_at": _time(c.created_at), "targets": c.targets, "fit": c.fit,
         "presets": c.presets, "counts": c.counts, "settings": c.settings,
         "code_version": c.code_version}
        for c in Calibration.objects.filter(study=study).order_by("created_at", "id")
    ]
    (out / "fits.json").write_text(json.dumps(fits, indent=1, sort_keys=True) + "\n")
    counts = {"pairs": len(pairs), "images": len(images), "participants": len(people),
              "sessions": len(sessions), "judgments": len(judgments)}
    (out / "README.md").write_text(_datasheet(study, counts, dists, code_version, dists_b))
    return counts


def _protocol_text(study: Study) -> str:
    if study.protocol == "2afc":
        return (f"A reference between two copies (A and B) for {study.first_ms} ms, then"
                " left or right: which copy is more like the reference (`natural_first` = 1:"
                " copy A on the left)")
    if study.protocol == "rating":
        if study.rating_shows == "single":
            return (f"One image for {study.first_ms} ms, then its quality on 1 (bad) …"
                    f" {study.rating_points} (excellent)")
        return (f"Image {study.first_ms} ms, blank {study.blank_ms} ms, image"
                f" {study.second_ms} ms, then their difference on 1 (none) …"
                f" {study.rating_points} (very different)")
    return (f"One image for {study.first_ms} ms, then its label, one of"
            f" {len(study.label_set or [])} classes")


def _datasheet(study: Study, counts: dict[str, int], dists: list[str], code_version: str,
               dists_b: list[str] = ()):
    excluded = (
        Session.objects.filter(participant__study=study, excluded=True)
        .values("exclusion_reason").annotate(n=Count("id")).order_by("-n")
    )
    simulated = Participant.objects.filter(study=study, is_simulated=True).count()
    gen = study.generation or {}
    if study.protocol == "jnd":
        protocol = (f"Image {study.first_ms} ms, blank {study.blank_ms} ms, image"
                    f" {study.second_ms} ms, then same/different")
    else:
        protocol = f"Protocol `{study.protocol}`. " + _protocol_text(study)
    lines = [
        f"# {study.title} — perceptual study release", "",
        f"Study `{study.slug}`, exported {timezone.now():%Y-%m-%d %H:%M} UTC by {code_version}.",
        f"Format `{FORMAT}`. {counts['pairs']} pairs ({counts['images']} images),"
        f" {counts['participants']} participants, {counts['sessions']} sessions,"
        f" {counts['judgments']} judgments (practice included, flagged).", "",
        "## Protocol", "",
        f"{protocol}; {study.trials_per_session} main trials per session,"
        f" {study.practice_trials} practice trials, sentinel share {study.sentinel_fraction},"
        f" catch share {study.catch_fraction}, K = {study.judgments_per_pair} judgments per"
        f" pair.{' Adaptive (QUEST+ over a ladder of bounds).' if study.adaptive else ''}", "",
        "## Provenance", "",
        f"- classifier: {gen.get('classifier', 'unknown')} (weights: {gen.get('weights', '?')})",
        f"- LPIPS networks: {json.dumps(gen.get('lpips_models', {}), sort_keys=True)}",
        f"- seed: {gen.get('seed', 'unknown')}",
        f"- code version: {code_version}",
        "- full generation metadata: `study.json` → `generation`.", "",
        "## Exclusions", "",
        f"{sum(e['n'] for e in excluded)} session(s) excluded by quality control"
        " (`sessions.csv` → `excluded`); analyses leave them out by default:", "",
        *[f"- {e['n']} × {e['exclusion_reason'] or '(no reason given)'}" for e in excluded],
        "", f"{simulated} participant(s) are simulated observers (`participants.csv` →"
        " `is_simulated`), not people; analyses leave them out by default.", "",
        "## Columns", "",
    ]
    extended = study.protocol != "jnd"
    for name, cols in COLUMNS.items():
        lines += [f"### {name}", ""]
        extra = PROTOCOL_COLUMNS.get(name, {}) if extended else {}
        for col, text in {**cols, **extra}.items():
            if col in ("distance_*", "b_distance_*"):
                prefix = col[:-1]
                names = ", ".join(f"`{prefix}{d}`" for d in (dists if col == "distance_*"
                                                              else dists_b)) or f"`{col}` (none)"
                lines.append(f"- {names}: {text}")
            else:
                lines.append(f"- `{col}`: {text}")
        lines.append("")
    lines += ["### fits.json", "",
              "Every `manage.py calibrate` run: targets, psychometric fits per threat model"
              " (P(different | bound) = γ + (1 − γ − λ)·F(α + β·log bound)), calibrated"
              " presets, the counts used, settings and code version.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ import


def _bool(text: str) -> bool | None:
    return None if text == "" else text == "1"


def _opt_float(text: str) -> float | None:
    return None if text == "" else float(text)


def _opt_int(text: str) -> int | None:
    return None if text == "" else int(text)


def _parse_time(text: str) -> datetime | None:
    return None if text == "" else datetime.fromisoformat(text)


def import_release(folder: Path, slug: str) -> Study:
    """Read a release folder into a new study ``slug``; nothing is written on any error."""
    meta_path = folder / "study.json"
    if not meta_path.is_file():
        raise ReleaseError(f"{folder} is not a release: study.json is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ReleaseError(f"{folder}: unknown format {meta.get('format')!r}; expected {FORMAT}")
    if Study.objects.filter(slug=slug).exists():
        raise ReleaseError(f"a study with slug {slug!r} exists already; choose another --slug")
    conditions = _read_csv(folder, "conditions.csv")
    pairs = _read_csv(folder, "pairs.csv")
    people = _read_csv(folder, "participants.csv")
    sessions = _read_csv(folder, "sessions.csv")
    judgments = _read_csv(folder, "judgments.csv")
    fits = json.loads((folder / "fits.json").read_text()) if (folder / "fits.json").exists() \
        else []
    for row in pairs:  # every image present and intact before anything is written
        for col in ("natural", "other", "third"):
            if col == "third" and not row.get("third_image"):
                continue
            path = folder / "images" / row[f"{col}_image"]
            if not path.is_file():
                raise ReleaseError(f"pair {row['pair']}: {path} is missing")
            if _sha256(path) != row[f"{col}_sha256"]:
                raise ReleaseError(f"pair {row['pair']}: {path} does not match its SHA-256")
    media_dir = Path(settings.MEDIA_ROOT) / "studies" / slug / "images"
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=Path(settings.MEDIA_ROOT)))
    try:
        with transaction.atomic():
            study = Study.objects.create(
                slug=slug, **{f: meta[f] for f in STUDY_FIELDS + PROTOCOL_STUDY_FIELDS
                              if f in meta}
            )
            by_spec = {
                c["condition"]: Condition.objects.create(
                    study=study, spec=c["condition"], threat_model=c["threat_model"],
                    bound=float(c["bound"]), label=c["label"])
                for c in conditions
            }
            dists = [c.removeprefix("distance_") for c in (pairs[0] if pairs else {})
                     if c.startswith("distance_")]
            dists_b = [c.removeprefix("b_distance_") for c in (pairs[0] if pairs else {})
                       if c.startswith("b_distance_")]
            pair_ids: dict[str, int] = {}
            for row in pairs:
                for col in ("condition", "condition_b"):
                    if row.get(col) and row[col] not in by_spec:
                        raise ReleaseError(f"pair {row['pair']}: unknown {col} {row[col]!r}")
                distances = {d: float(row[f"distance_{d}"]) for d in dists
                             if row[f"distance_{d}"] != ""}
                distances_b = {d: float(row[f"b_distance_{d}"]) for d in dists_b
                               if row[f"b_distance_{d}"] != ""}
                third = row.get("third_image", "")
                metadata = {"natural_sha256": row["natural_sha256"],
                            "other_sha256": row["other_sha256"]}
                if third:
                    metadata["third_sha256"] = row["third_sha256"]
                pair = Pair.objects.create(
                    study=study, key=row["key"], condition=by_spec.get(row["condition"]),
                    is_sentinel=row["is_sentinel"] == "1", is_catch=row["is_catch"] == "1",
                    source_image=row["source_image"],
                    natural_path=f"studies/{slug}/images/{row['natural_image']}",
                    other_path=f"studies/{slug}/images/{row['other_image']}",
                    width=int(row["width"]), height=int(row["height"]),
                    label=_opt_int(row["label"]),
                    adversarial_label=_opt_int(row["adversarial_label"]),
                    attack_success=_bool(row["attack_success"]), level=_opt_int(row["level"]),
                    distances=distances, distances_b=distances_b,
                    third_path=f"studies/{slug}/images/{third}" if third else "",
                    condition_b=by_spec.get(row.get("condition_b", "")),
                    class_name=row.get("class_name", ""),
                    metadata={**metadata, "imported_from": str(folder)},
                )
                pair_ids[row["pair"]] = pair.pk
            person = {}
            for row in people:
                person[row["participant"]] = Participant.objects.create(
                    study=study, source=row["source"], external_id=row["participant"],
                    is_simulated=row["is_simulated"] == "1")
            session_of = {}
            for row in sessions:
                if row["participant"] not in person:
                    raise ReleaseError(f"session {row['session']}: unknown participant")
                s = Session.objects.create(
                    participant=person[row["participant"]], excluded=row["excluded"] == "1",
                    exclusion_reason=row["exclusion_reason"],
                    completed_at=_parse_time(row["completed_at"]),
                    abandoned_at=_parse_time(row["abandoned_at"]),
                )
                Session.objects.filter(pk=s.pk).update(started_at=_parse_time(row["started_at"]))
                session_of[row["session"]] = s
            trials, answers = [], []
            for n, row in enumerate(judgments):
                if row["session"] not in session_of or row["pair"] not in pair_ids:
                    raise ReleaseError(f"judgments.csv row {n + 2}: unknown session or pair")
                try:
                    validate_response(study, row["response"])
                except BadResponse as exc:
                    raise ReleaseError(f"judgments.csv row {n + 2}: {exc}") from exc
                trials.append(Trial(
                    session=session_of[row["session"]], position=int(row["position"]),
                    pair_id=pair_ids[row["pair"]], is_practice=row["is_practice"] == "1",
                    natural_first=row["natural_first"] == "1",
                    is_repeat=row.get("is_repeat", "") == "1", leased_until=None))
                answers.append(row)
            Trial.objects.bulk_create(trials, batch_size=5000)
            created = {(t.session_id, t.position): t.pk for t in Trial.objects.filter(
                session__participant__study=study).only("pk", "session_id", "position")}
            Judgment.objects.bulk_create([
                Judgment(trial_id=created[(session_of[r["session"]].pk, int(r["position"]))],
                         response=r["response"], response_time_ms=float(r["response_time_ms"]),
                         first_ms=float(r["first_ms"]), blank_ms=_opt_float(r["blank_ms"]),
                         second_ms=_opt_float(r["second_ms"]),
                         idempotency_key=f"import-{slug}-{i}")
                for i, r in enumerate(answers)
            ], batch_size=5000)
            # n_assigned: every imported main trial of a data pair is judged (holds a slot)
            for pk, n in Pair.objects.filter(study=study, condition__isnull=False).annotate(
                n=Count("trials", filter=Q(trials__is_practice=False, trials__is_repeat=False))
            ).values_list("pk", "n"):
                Pair.objects.filter(pk=pk).update(n_assigned=n)
            for f in fits:
                c = Calibration.objects.create(
                    study=study, targets=f["targets"], fit=f["fit"], presets=f["presets"],
                    counts=f["counts"], settings=f["settings"], code_version=f["code_version"])
                Calibration.objects.filter(pk=c.pk).update(
                    created_at=_parse_time(f["created_at"]))
            staged = staging / "images"
            shutil.copytree(folder / "images", staged)
            media_dir.parent.mkdir(parents=True, exist_ok=True)
            if media_dir.exists():
                raise ReleaseError(f"{media_dir} exists already; refusing to overwrite it")
            staged.rename(media_dir)
    except (KeyError, ValueError) as exc:
        if isinstance(exc, ReleaseError):
            raise
        raise ReleaseError(f"{folder}: malformed release ({type(exc).__name__}: {exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return study


# ------------------------------------------------------------------------------ BAPPS JND


def export_bapps_jnd(study: Study, out: Path, *, include_simulated: bool = False) -> int:
    """Judged data pairs as ``p0/``, ``p1/`` (natural, other) and ``same/`` (fraction same)."""
    if study.protocol != "jnd":
        raise ReleaseError(f"study {study.slug!r} uses the {study.protocol} protocol; the BAPPS"
                           " JND layout holds same/different judgments (protocol jnd) only"
                           + (" (use --bapps-2afc or --nights)" if study.protocol == "2afc"
                              else ""))
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out} exists and is not empty; choose a new folder")
    media = Path(settings.MEDIA_ROOT)
    judged = Judgment.objects.filter(
        trial__session__participant__study=study, trial__is_practice=False,
        trial__session__excluded=False, trial__pair__condition__isnull=False,
    )
    if not include_simulated:
        judged = judged.filter(trial__session__participant__is_simulated=False)
    rows = (judged.values("trial__pair_id")
            .annotate(n=Count("id"), same=Count("id", filter=Q(response="same")))
            .order_by("trial__pair_id"))
    if not rows:
        raise ReleaseError(f"study {study.slug!r} has no judged perturbed pairs to export")
    for sub in ("p0", "p1", "same"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    paths = dict(
        (pk, (n, o)) for pk, n, o in Pair.objects.filter(study=study).values_list(
            "pk", "natural_path", "other_path"))
    keys = dict(Pair.objects.filter(study=study).values_list("pk", "key"))
    index_rows = []
    for i, row in enumerate(rows):
        name = f"{i:06d}"
        natural, other = paths[row["trial__pair_id"]]
        shutil.copyfile(media / natural, out / "p0" / f"{name}.png")
        shutil.copyfile(media / other, out / "p1" / f"{name}.png")
        np.save(out / "same" / f"{name}.npy", np.array([row["same"] / row["n"]], np.float32))
        index_rows.append([name, keys[row["trial__pair_id"]], row["n"], row["same"]])
    _write_csv(out / "pairs.csv", ["index", "key", "n_judgments", "n_same"], index_rows)
    return len(index_rows)


def import_bapps_jnd(folder: Path, slug: str, *, raters: int = 3) -> Study:
    """A BAPPS JND folder as a new study: one pair per index, ``raters`` judgments each.

    BAPPS stores only the fraction of people who answered "same"; it becomes
    ``round(same · raters)`` "same" answers among ``raters`` reconstructed raters (BAPPS JND
    had 3 per pair). L2 and L∞ distances are measured here ([0,1] scale).
    """
    import torch
    from PIL import Image

    from engine.distances import l2_distance, linf_distance

    names = sorted(p.stem for p in (folder / "p0").glob("*.png")) if (folder / "p0").is_dir() \
        else []
    if not names:
        raise ReleaseError(f"{folder} is not a BAPPS JND folder: no p0/*.png")
    for name in names:
        for need in (folder / "p1" / f"{name}.png", folder / "same" / f"{name}.npy"):
            if not need.is_file():
                raise ReleaseError(f"{folder}: {need.relative_to(folder)} is missing")
    if raters < 1:
        raise ReleaseError("raters must be at least 1")
    if Study.objects.filter(slug=slug).exists():
        raise ReleaseError(f"a study with slug {slug!r} exists already; choose another --slug")
    media_dir = Path(settings.MEDIA_ROOT) / "studies" / slug
    with transaction.atomic():
        study = Study.objects.create(slug=slug, title=f"BAPPS JND {folder.name}",
                                     judgments_per_pair=raters,
                                     description=f"Imported from the BAPPS JND folder {folder}.")
        condition = Condition.objects.create(study=study, threat_model="bapps_jnd", bound=1.0,
                                             spec=f"bapps_jnd:{folder.name}")
        people = [Participant.objects.create(study=study, external_id=f"bapps-rater-{r}")
                  for r in range(raters)]
        sessions = [Session.objects.create(participant=p) for p in people]
        (media_dir / "p0").mkdir(parents=True, exist_ok=True)
        (media_dir / "p1").mkdir(parents=True, exist_ok=True)
        trials, answers = [], []
        for i, name in enumerate(names):
            a = np.array(Image.open(folder / "p0" / f"{name}.png").convert("RGB"))
            b = np.array(Image.open(folder / "p1" / f"{name}.png").convert("RGB"))
            same = float(np.load(folder / "same" / f"{name}.npy").reshape(-1)[0])
            ta = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
            tb = torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255
            dist = {}
            if ta.shape == tb.shape:
                dist = {"l2": float(l2_distance(ta, tb)[0]), "linf": float(linf_distance(ta,
                                                                                         tb)[0])}
            shutil.copyfile(folder / "p0" / f"{name}.png", media_dir / "p0" / f"{name}.png")
            shutil.copyfile(folder / "p1" / f"{name}.png", media_dir / "p1" / f"{name}.png")
            pair = Pair.objects.create(
                study=study, condition=condition, key=f"bapps|{name}", source_image=name,
                natural_path=f"studies/{slug}/p0/{name}.png",
                other_path=f"studies/{slug}/p1/{name}.png", width=a.shape[1], height=a.shape[0],
                distances=dist, metadata={"bapps_same": same}, n_assigned=raters,
            )
            n_same = round(same * raters)
            for r, session in enumerate(sessions):
                trials.append(Trial(session=session, position=i, pair=pair, natural_first=True))
                answers.append("same" if r < n_same else "different")
        Trial.objects.bulk_create(trials, batch_size=5000)
        Judgment.objects.bulk_create([
            Judgment(trial=t, response=resp, response_time_ms=0.0, first_ms=0.0, blank_ms=0.0,
                     second_ms=0.0, idempotency_key=f"bapps-{slug}-{n}")
            for n, (t, resp) in enumerate(zip(trials, answers, strict=True))
        ], batch_size=5000)
        Session.objects.filter(pk__in=[s.pk for s in sessions]).update(
            completed_at=timezone.now())
    return study


# ------------------------------------------------------------------------------ 2AFC layouts

#: BAPPS 2AFC collected 5 judgments per validation triplet (2 per training triplet); the
#: default number of raters reconstructed from a judge fraction when no count is stored.
BAPPS_2AFC_RATERS = 5


def _need_2afc(study: Study, layout: str) -> None:
    if study.protocol != "2afc":
        raise ReleaseError(f"study {study.slug!r} uses the {study.protocol} protocol; the"
                           f" {layout} layout holds 2AFC triplets (protocol 2afc) only")


def _chose_b() -> Q:
    """A 2AFC answer for copy B: B is on the right when ``natural_first`` (A on the left)."""
    return (Q(response="right", trial__natural_first=True)
            | Q(response="left", trial__natural_first=False))


def twoafc_triplets(study: Study, *, include_simulated: bool = False,
                    layout: str = "2AFC") -> list[Triplet]:
    """Judged 2AFC data triplets of ``study`` as :class:`engine.release_formats.Triplet`.

    Main, first-time trials of kept sessions (practice, retests and excluded sessions left out;
    simulated observers only with ``include_simulated``); control triplets (a copy equal to the
    reference) are left out. ``judge`` = fraction of judgments choosing copy B.
    """
    _need_2afc(study, layout)
    media = Path(settings.MEDIA_ROOT)
    judged = Judgment.objects.filter(
        trial__session__participant__study=study, trial__is_practice=False,
        trial__is_repeat=False, trial__session__excluded=False,
        trial__pair__is_sentinel=False, trial__pair__is_catch=False,
        trial__pair__condition__isnull=False,
    )
    if not include_simulated:
        judged = judged.filter(trial__session__participant__is_simulated=False)
    rows = (judged.values("trial__pair_id")
            .annotate(n=Count("id"), n_b=Count("id", filter=_chose_b()))
            .order_by("trial__pair_id"))
    if not rows:
        raise ReleaseError(f"study {study.slug!r} has no judged 2AFC triplets to export"
                           + ("" if include_simulated else
                              " (simulated observers are left out unless included)"))
    pairs = Pair.objects.in_bulk([r["trial__pair_id"] for r in rows])
    out = []
    for r in rows:
        pair = pairs[r["trial__pair_id"]]
        paths = [media / rel for rel in (pair.natural_path, pair.other_path, pair.third_path)]
        if not pair.third_path:
            raise ReleaseError(f"triplet {pair.key!r} has no copy B (third_path is empty)")
        for path in paths:
            if not path.is_file():
                raise ReleaseError(f"triplet {pair.key!r}: image {path} is missing under "
                                   f"MEDIA_ROOT ({media})")
        out.append(Triplet(ref=paths[0], a=paths[1], b=paths[2], judge=r["n_b"] / r["n"],
                           n=r["n"], key=pair.key))
    return out


def export_bapps_2afc(study: Study, out: Path, *, include_simulated: bool = False) -> int:
    """Judged 2AFC triplets as ``ref/``, ``p0/`` (copy A), ``p1/`` (copy B), ``judge/``."""
    triplets = twoafc_triplets(study, include_simulated=include_simulated,
                               layout="BAPPS 2AFC")
    try:
        return write_bapps_2afc(triplets, out)
    except ReleaseFormatError as exc:
        raise ReleaseError(str(exc)) from exc


def export_nights(study: Study, out: Path, *, include_simulated: bool = False,
                  min_votes: int | None = None) -> int:
    """Judged 2AFC triplets in DreamSim's NIGHTS layout (copy A left, copy B right).

    ``min_votes`` as in :func:`engine.release_formats.write_nights`: by default a triplet with
    fewer than 6 votes (which DreamSim's loader drops) is refused with the reason.
    """
    triplets = twoafc_triplets(study, include_simulated=include_simulated, layout="NIGHTS")
    try:
        return write_nights(triplets, out, min_votes=min_votes)
    except ReleaseFormatError as exc:
        raise ReleaseError(str(exc)) from exc


def _pixel_distances(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """L2 and L∞ between two same-size images on the [0,1] scale (as import_bapps_jnd)."""
    import torch

    from engine.distances import l2_distance, linf_distance

    if ref.shape != other.shape:
        return {}
    x = torch.from_numpy(ref).permute(2, 0, 1)[None].double() / 255  # float64: exact sums
    y = torch.from_numpy(other).permute(2, 0, 1)[None].double() / 255
    return {"l2": float(l2_distance(x, y)[0]), "linf": float(linf_distance(x, y)[0])}


def _import_triplets(triplets: list[Triplet], slug: str, *, layout: str, source: Path,
                     counts: list[int]) -> Study:
    """A 2AFC study from triplets: one rater per judgment, copy A on the left throughout.

    ``counts[i]`` judgments for triplet i, ``round(judge · counts[i])`` of them for copy B
    ("right"). L2 and L∞ distances (reference to each copy, [0,1] scale) are measured here.
    Images are staged and moved into MEDIA_ROOT only when every row is written.
    """
    if not triplets:
        raise ReleaseError(f"{source}: no triplets to import")
    if Study.objects.filter(slug=slug).exists():
        raise ReleaseError(f"a study with slug {slug!r} exists already; choose another --slug")
    media_dir = Path(settings.MEDIA_ROOT) / "studies" / slug
    if media_dir.exists():
        raise ReleaseError(f"{media_dir} exists already; refusing to overwrite it")
    Path(settings.MEDIA_ROOT).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=Path(settings.MEDIA_ROOT)))
    try:
        with transaction.atomic():
            study = Study.objects.create(
                slug=slug, protocol="2afc", title=f"{layout} {source.name}",
                judgments_per_pair=max(counts),
                description=f"Imported from the {layout} folder {source}.")
            tag = layout.lower().replace(" ", "_")
            cond_a = Condition.objects.create(study=study, threat_model=tag, bound=1.0,
                                              spec=f"{tag}:{source.name}:A")
            cond_b = Condition.objects.create(study=study, threat_model=tag, bound=1.0,
                                              spec=f"{tag}:{source.name}:B")
            sessions = [Session.objects.create(participant=Participant.objects.create(
                study=study, external_id=f"{tag}-rater-{r}")) for r in range(max(counts))]
            for sub in ("ref", "a", "b"):
                (staging / sub).mkdir()
            trials, answers = [], []
            positions = [0] * len(sessions)
            for i, (t, n) in enumerate(zip(triplets, counts, strict=True)):
                name = t.name or f"{i:06d}"
                stem = name.replace("/", "_")
                pixels, rels = [], []
                for sub, src in (("ref", t.ref), ("a", t.a), ("b", t.b)):
                    pixels.append(load_pixels(src))
                    if isinstance(src, np.ndarray):
                        suffix = ".png"
                        Image.fromarray(src).save(staging / sub / f"{stem}.png")
                    else:
                        suffix = Path(src).suffix.lower()
                        shutil.copyfile(src, staging / sub / f"{stem}{suffix}")
                    rels.append(f"studies/{slug}/{sub}/{stem}{suffix}")
                if not (pixels[0].shape == pixels[1].shape == pixels[2].shape):
                    raise ReleaseError(f"{source}: triplet {name}: reference and copies differ"
                                       " in size")
                pair = Pair.objects.create(
                    study=study, condition=cond_a, condition_b=cond_b,
                    key=t.key or f"{tag}|{name}", source_image=name,
                    natural_path=rels[0], other_path=rels[1], third_path=rels[2],
                    width=pixels[0].shape[1], height=pixels[0].shape[0],
                    distances=_pixel_distances(pixels[0], pixels[1]),
                    distances_b=_pixel_distances(pixels[0], pixels[2]),
                    metadata={"judge": t.judge, "imported_from": str(source)}, n_assigned=n,
                )
                n_b = round(t.judge * n)
                for r in range(n):
                    trials.append(Trial(session=sessions[r], position=positions[r], pair=pair,
                                        natural_first=True))
                    positions[r] += 1
                    answers.append("right" if r < n_b else "left")
            Trial.objects.bulk_create(trials, batch_size=5000)
            Judgment.objects.bulk_create([
                Judgment(trial=trial, response=resp, response_time_ms=0.0, first_ms=0.0,
                         blank_ms=None, second_ms=None, idempotency_key=f"{tag}-{slug}-{k}")
                for k, (trial, resp) in enumerate(zip(trials, answers, strict=True))
            ], batch_size=5000)
            Session.objects.filter(pk__in=[s.pk for s in sessions]).update(
                completed_at=timezone.now())
            media_dir.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(media_dir)
    except ReleaseFormatError as exc:
        raise ReleaseError(str(exc)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return study


def import_bapps_2afc(folder: Path, slug: str, *, raters: int | None = None) -> Study:
    """A BAPPS 2AFC folder as a new 2AFC study (reference, p0 = copy A, p1 = copy B).

    BAPPS stores the fraction choosing p1; ``raters`` judgments per triplet are reconstructed
    (``round(judge · raters)`` for B). Without ``raters`` the counts in our ``triplets.csv``
    are used where present, else :data:`BAPPS_2AFC_RATERS`. Nothing is written on any error.
    """
    if raters is not None and raters < 1:
        raise ReleaseError("raters must be at least 1")
    try:
        triplets = read_bapps_2afc(Path(folder))
    except ReleaseFormatError as exc:
        raise ReleaseError(str(exc)) from exc
    counts = [raters or t.n or BAPPS_2AFC_RATERS for t in triplets]
    return _import_triplets(triplets, slug, layout="BAPPS 2AFC", source=Path(folder),
                            counts=counts)


def import_nights(folder: Path, slug: str, *, split: str | None = None,
                  min_votes: int = 1) -> Study:
    """A NIGHTS folder as a new 2AFC study (left = copy A, right = copy B), one rater per vote.

    ``split``/``min_votes`` select items as DreamSim's loader does (it keeps ``votes >= 6``);
    items need at least one vote. Nothing is written on any error.
    """
    try:
        triplets = read_nights(Path(folder), split=split, min_votes=max(min_votes, 1))
    except ReleaseFormatError as exc:
        raise ReleaseError(str(exc)) from exc
    return _import_triplets(triplets, slug, layout="NIGHTS", source=Path(folder),
                            counts=[t.n for t in triplets])
