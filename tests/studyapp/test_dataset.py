"""Releases: export → import → export gives byte-identical tables; the BAPPS JND layout."""

from __future__ import annotations

import csv
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from studyapp.models import Calibration, Judgment, Pair, Session, Study
from studyapp.releases import COLUMNS
from studyapp.scheduler import assignment_errors
from studyapp.simulation import simulate

pytestmark = pytest.mark.django_db
TABLES = ["conditions.csv", "pairs.csv", "participants.csv", "sessions.csv", "judgments.csv",
          "fits.json"]


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.fixture
def judged(make_study):
    study = make_study(judgments_per_pair=3, practice_trials=1, catch_pairs=1,
                       catch_fraction=0.2)
    Pair.objects.filter(study=study, condition__isnull=False).update(
        attack_success=True, distances={"linf": 0.03125, "lpips_alexnet": 0.1 / 3})
    simulate(study, 4, seed=2)
    first = Session.objects.order_by("pk").first()
    Session.objects.filter(pk=first.pk).update(excluded=True, exclusion_reason="too fast")
    run("calibrate", "--study", study.slug, "--include-simulated", "--n-boot", "5")
    return study


def test_export_import_export_gives_identical_tables(judged, tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    text = run("export_dataset", "--study", judged.slug, str(first))
    assert "4 participants" in text
    run("import_dataset", str(first), "--slug", "copy")
    copy = Study.objects.get(slug="copy")
    run("export_dataset", "--study", "copy", str(second))
    for name in TABLES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    images = sorted(p.name for p in (first / "images").iterdir())
    assert images == sorted(p.name for p in (second / "images").iterdir()) and images
    for name in images:
        assert (first / "images" / name).read_bytes() == (second / "images" / name).read_bytes()
    # the copy is a working study: same judgments, same bookkeeping, same calibration
    assert Judgment.objects.filter(trial__session__participant__study=copy).count() == \
        Judgment.objects.filter(trial__session__participant__study=judged).count()
    assert assignment_errors(copy) == []
    assert Calibration.objects.get(study=copy).presets == Calibration.objects.get(
        study=judged).presets
    assert Session.objects.filter(participant__study=copy, excluded=True).count() == 1


def test_release_is_pseudonymised_and_described(judged, tmp_path):
    out = tmp_path / "rel"
    run("export_dataset", "--study", judged.slug, str(out))
    people = list(csv.DictReader((out / "participants.csv").open()))
    assert [p["participant"] for p in people] == ["P0001", "P0002", "P0003", "P0004"]
    text = (out / "participants.csv").read_text() + (out / "sessions.csv").read_text()
    for external in judged.participants.values_list("external_id", flat=True):
        assert external not in text
    readme = (out / "README.md").read_text()
    for name, columns in COLUMNS.items():
        header = next(csv.reader((out / name).open()))
        for col in header:
            assert f"`{col}`" in readme, (name, col)
        assert set(columns) - {"distance_*"} <= set(header)
    assert "1 × too fast" in readme and "4 participant(s) are simulated" in readme
    judgments = list(csv.DictReader((out / "judgments.csv").open()))
    assert len(judgments) == Judgment.objects.count()
    assert sum(j["is_practice"] == "1" for j in judgments) == 4


def test_import_refuses_a_tampered_or_incomplete_release(judged, tmp_path):
    out = tmp_path / "rel"
    run("export_dataset", "--study", judged.slug, str(out))
    image = sorted((out / "images").iterdir())[0]
    image.write_bytes(image.read_bytes() + b"x")
    with pytest.raises(CommandError, match="does not match its SHA-256"):
        run("import_dataset", str(out), "--slug", "bad")
    (out / "judgments.csv").unlink()
    with pytest.raises(CommandError, match="judgments.csv is missing"):
        run("import_dataset", str(out), "--slug", "bad")
    with pytest.raises(CommandError, match="exists already"):
        run("import_dataset", str(out), "--slug", judged.slug)
    with pytest.raises(CommandError, match="is not a folder"):
        run("import_dataset", str(tmp_path / "nowhere"))
    with pytest.raises(CommandError, match="exists and is not empty"):
        run("export_dataset", "--study", judged.slug, str(out))
    assert not Study.objects.filter(slug="bad").exists()


def lpips_repo_jnd_read(root: Path):
    """What the LPIPS repository's JNDDataset reads: sorted p0/, p1/ and same/ (.npy)."""
    p0 = sorted((root / "p0").glob("*.png"))
    p1 = sorted((root / "p1").glob("*.png"))
    same = [float(np.load(p).reshape((1, 1, 1))[0, 0, 0]) for p in
            sorted((root / "same").glob("*.npy"))]
    assert len(p0) == len(p1) == len(same)
    return p0, p1, same


def voc_ap(rec, prec):
    """The LPIPS repository's ``voc_ap`` (VOC 2010+ area under the precision envelope)."""
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def test_bapps_jnd_export_is_scored_like_the_lpips_repo_and_reads_back(judged, tmp_path):
    out = tmp_path / "jnd"
    text = run("export_dataset", "--study", judged.slug, str(out), "--bapps-jnd",
               "--include-simulated")
    p0, p1, same = lpips_repo_jnd_read(out)
    assert f"Wrote {len(p0)} pairs" in text and len(p0) == 6
    index = list(csv.DictReader((out / "pairs.csv").open()))
    for row, s in zip(index, same, strict=True):
        pair = Pair.objects.get(study=judged, key=row["key"])
        main = Judgment.objects.filter(trial__pair=pair, trial__is_practice=False,
                                       trial__session__excluded=False)
        assert s == pytest.approx(main.filter(response="same").count() / main.count())
    # score_jnd_dataset: sort by distance, precision/recall of "same"
    ds = np.array([float(Pair.objects.get(study=judged, key=r["key"]).distances["linf"])
                   for r in index])
    sames = np.array(same)
    order = np.argsort(ds)
    tps = np.cumsum(sames[order])
    fps = np.cumsum(1 - sames[order])
    score = voc_ap(tps / np.sum(sames), tps / (tps + fps))
    assert 0 <= score <= 1

    run("import_dataset", str(out), "--bapps-jnd", "--slug", "bapps", "--raters", "5")
    imported = Study.objects.get(slug="bapps")
    assert imported.pairs.count() == 6 and assignment_errors(imported) == []
    for pair in imported.pairs.all():
        name = pair.source_image
        expected = round(float(np.load(out / "same" / f"{name}.npy")[0]) * 5)
        got = Judgment.objects.filter(trial__pair=pair, response="same").count()
        assert got == expected
        assert set(pair.distances) == {"l2", "linf"}
    text = run("analyze", "--study", "bapps", "--n-boot", "10", "--csv",
               str(tmp_path / "b.csv"))
    assert "30 judgments" in text
    with pytest.raises(CommandError, match="no p0/\\*.png"):
        run("import_dataset", str(tmp_path), "--bapps-jnd", "--slug", "nothing")
