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

FORMAT = "perceptlab-release/1"

STUDY_FIELDS = [
    "title", "description", "instructions", "first_ms", "blank_ms", "second_ms",
    "trials_per_session", "sentinel_fraction", "judgments_per_pair", "generation",
    "consent_text", "key_same", "key_different", "randomize_first", "catch_fraction",
    "practice_trials", "break_every", "lease_minutes", "fast_response_ms",
    "max_sentinel_false_alarm", "min_catch_hit_rate", "max_fast_share", "adaptive",
    "adaptive_config",
]

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


def distance_names(study: Study) -> list[str]:
    names: set[str] = set()
    for d in Pair.objects.filter(study=study).values_list("distances", flat=True):
        names.update(d or {})
    return sorted(names)


# ------------------------------------------------------------------------------ export


def export_release(study: Study, out: Path, *, code_version: str = "") -> dict[str, int]:
    """Write ``study`` as a release folder ``out`` (must not exist or be empty)."""
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out} exists and is not empty; choose a new folder")
    media = Path(settings.MEDIA_ROOT)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pairs = list(Pair.objects.filter(study=study).select_related("condition").order_by("id"))
    images: dict[str, str] = {}
    for pair in pairs:
        for rel in (pair.natural_path, pair.other_path):
            if rel not in images:
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
    number = {p.pk: i + 1 for i, p in enumerate(pairs)}
    header = [c for c in COLUMNS["pairs.csv"] if c != "distance_*"] + [
        f"distance_{d}" for d in dists]
    rows = []
    for p in pairs:
        rows.append([
            number[p.pk], p.key, p.condition.spec if p.condition else "", _b(p.is_sentinel),
            _b(p.is_catch), p.source_image, images[p.natural_path], images[p.other_path],
            p.width, p.height, _num(p.label), _num(p.adversarial_label), _b(p.attack_success),
            _num(p.level), _sha256(out / "images" / images[p.natural_path]),
            _sha256(out / "images" / images[p.other_path]),
            *[_num((p.distances or {}).get(d)) for d in dists],
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
                     "response_time_ms", "first_ms", "blank_ms", "second_ms")
    )
    _write_csv(out / "judgments.csv", list(COLUMNS["judgments.csv"]), [
        [session_name[s], pos, number[pair], _b(prac), _b(nf), resp, _num(rt), _num(f),
         _num(b), _num(sec)]
        for s, pos, pair, prac, nf, resp, rt, f, b, sec in judgments.iterator(chunk_size=20_000)
    ])
    study_json = {"format": FORMAT, "slug": study.slug,
                  **{f: getattr(study, f) for f in STUDY_FIELDS}}
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
    (out / "README.md").write_text(_datasheet(study, counts, dists, code_version))
    return counts


def _datasheet(study: Study, counts: dict[str, int], dists: list[str], code_version: str):
    excluded = (
        Session.objects.filter(participant__study=study, excluded=True)
        .values("exclusion_reason").annotate(n=Count("id")).order_by("-n")
    )
    simulated = Participant.objects.filter(study=study, is_simulated=True).count()
    gen = study.generation or {}
    lines = [
        f"# {study.title} — perceptual study release", "",
        f"Study `{study.slug}`, exported {timezone.now():%Y-%m-%d %H:%M} UTC by {code_version}.",
        f"Format `{FORMAT}`. {counts['pairs']} pairs ({counts['images']} images),"
        f" {counts['participants']} participants, {counts['sessions']} sessions,"
        f" {counts['judgments']} judgments (practice included, flagged).", "",
        "## Protocol", "",
        f"Image {study.first_ms} ms, blank {study.blank_ms} ms, image {study.second_ms} ms,"
        f" then same/different; {study.trials_per_session} main trials per session,"
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
    for name, cols in COLUMNS.items():
        lines += [f"### {name}", ""]
        for col, text in cols.items():
            if col == "distance_*":
                names = ", ".join(f"`distance_{d}`" for d in dists) or "`distance_*` (none)"
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
        for col in ("natural", "other"):
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
                slug=slug, **{f: meta[f] for f in STUDY_FIELDS if f in meta}
            )
            by_spec = {
                c["condition"]: Condition.objects.create(
                    study=study, spec=c["condition"], threat_model=c["threat_model"],
                    bound=float(c["bound"]), label=c["label"])
                for c in conditions
            }
            dists = [c.removeprefix("distance_") for c in (pairs[0] if pairs else {})
                     if c.startswith("distance_")]
            pair_ids: dict[str, int] = {}
            for row in pairs:
                if row["condition"] and row["condition"] not in by_spec:
                    raise ReleaseError(f"pair {row['pair']}: unknown condition "
                                       f"{row['condition']!r}")
                distances = {d: float(row[f"distance_{d}"]) for d in dists
                             if row[f"distance_{d}"] != ""}
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
                    distances=distances,
                    metadata={"natural_sha256": row["natural_sha256"],
                              "other_sha256": row["other_sha256"],
                              "imported_from": str(folder)},
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
                if row["response"] not in ("same", "different"):
                    raise ReleaseError(f"judgments.csv row {n + 2}: response must be same or "
                                       f"different, got {row['response']!r}")
                trials.append(Trial(
                    session=session_of[row["session"]], position=int(row["position"]),
                    pair_id=pair_ids[row["pair"]], is_practice=row["is_practice"] == "1",
                    natural_first=row["natural_first"] == "1", leased_until=None))
                answers.append(row)
            Trial.objects.bulk_create(trials, batch_size=5000)
            created = {(t.session_id, t.position): t.pk for t in Trial.objects.filter(
                session__participant__study=study).only("pk", "session_id", "position")}
            Judgment.objects.bulk_create([
                Judgment(trial_id=created[(session_of[r["session"]].pk, int(r["position"]))],
                         response=r["response"], response_time_ms=float(r["response_time_ms"]),
                         first_ms=float(r["first_ms"]), blank_ms=float(r["blank_ms"]),
                         second_ms=float(r["second_ms"]),
                         idempotency_key=f"import-{slug}-{i}")
                for i, r in enumerate(answers)
            ], batch_size=5000)
            # n_assigned: every imported main trial of a data pair is judged (holds a slot)
            for pk, n in Pair.objects.filter(study=study, condition__isnull=False).annotate(
                n=Count("trials", filter=Q(trials__is_practice=False))
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
