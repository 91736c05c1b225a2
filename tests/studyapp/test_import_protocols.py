"""Importing the items of every protocol (issue 18): ``import_pairs`` of a
``python -m engine generate --protocol …`` folder writes Pair rows per the contract, and
``generate_pairs --protocol …`` is the same generation plus the same import; a folder of
another protocol than the study's, a label outside the study's label set, a tampered third
image or a wrong hash is refused with nothing written."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from engine.__main__ import main as engine_main
from engine.attacks import parse_attack
from studyapp.models import Condition, Pair, Participant, Study
from studyapp.scheduler import start_session

COMMON = ["--classifier", "resnet18:untrained", "--lpips", "alexnet:untrained", "--size", "32",
          "--max-images", "2", "--device", "cpu", "--no-progress"]
LINF, L2 = "linf:bound=small,num_iterations=2", "l2:bound=small,num_iterations=2"
TWO_AFC = ["--protocol", "2afc", "--versus", LINF, L2]
LABEL = ["--protocol", "label", "--spec", "linf:num_iterations=1", "--ladder", "2", "--bounds",
         "2/255,8/255"]
RATING = ["--protocol", "rating", "--rating-shows", "single", "--spec", LINF]


@pytest.fixture(autouse=True)
def media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.PERCEPTLAB_ROWS_DIR = tmp_path / "rows"
    return settings.MEDIA_ROOT


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()} if root.exists() else {}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    for name, args in (("2afc", TWO_AFC), ("label", LABEL), ("rating", RATING)):
        assert engine_main(["generate", "--out", str(root / name), *args, *COMMON]) == 0
    return {name: root / name for name in ("2afc", "label", "rating")}


def rows(study: Study) -> list[tuple]:
    return [(p.key, p.condition.spec if p.condition else None,
             p.condition_b.spec if p.condition_b else None, p.is_sentinel, p.level,
             p.natural_path.split("/", 2)[2], p.other_path.split("/", 2)[2],
             p.third_path.split("/", 2)[2] if p.third_path else "", p.distances, p.distances_b,
             p.class_name, {k: v for k, v in p.metadata.items() if k != "size"})
            for p in Pair.objects.filter(study=study).select_related(
                "condition", "condition_b").order_by("key")]


@pytest.mark.django_db
def test_2afc_rows_follow_the_contract(folders, media):
    folder = folders["2afc"]
    manifest = json.loads((folder / "manifest.json").read_text())
    out = run("import_pairs", str(folder), "--study", "afc")
    assert "(2afc items)" in out
    study = Study.objects.get(slug="afc")
    assert study.protocol == "2afc"
    by_key = {p["key"]: p for p in manifest["pairs"]}
    pairs = list(Pair.objects.filter(study=study).select_related("condition", "condition_b"))
    assert len(pairs) == len(by_key) == 4
    prefix = "studies/afc/"
    for pair in pairs:
        item = by_key[pair.key]
        assert pair.natural_path == prefix + item["natural_path"]  # the reference
        assert pair.other_path == prefix + item["other_path"]  # copy A
        assert pair.third_path == prefix + item["third_path"]  # copy B
        assert pair.condition_b.spec == item["condition_b"]
        assert pair.distances_b == item["distances_b"] and pair.distances == item["distances"]
        # distances_b are the reference↔B distances of the stored files.
        ref, b = pixels(media / pair.natural_path), pixels(media / pair.third_path)
        assert pair.distances_b["linf"] == pytest.approx(np.abs(ref - b).max(), abs=1e-6)
        assert pair.distances_b["l2"] == pytest.approx(np.linalg.norm(ref - b), rel=1e-5)
        assert pair.metadata["b"]["stored_size"] == item["measures_b"]["stored_size"]
        if pair.is_sentinel:  # control: copy A is the reference itself
            assert pair.condition is None and pair.other_path == pair.natural_path
            pair.full_clean()
        else:
            assert pair.condition.spec == parse_attack(LINF).spec
            assert pair.condition_b.spec == parse_attack(L2).spec
    assert Condition.objects.filter(study=study).count() == 2
    # Every image a triplet shows, copy B included, is decoded at import (issue 17).
    from studyapp import stimulus_rows

    for pair in pairs:
        assert stimulus_rows.read_rows(stimulus_rows.fingerprint(pair.third_path)) is not None
    # Re-import: nothing changes.
    before = rows(study)
    assert "0 pairs created, 0 updated, 4 unchanged" in run("import_pairs", str(folder),
                                                            "--study", "afc")
    assert rows(study) == before


@pytest.mark.django_db
def test_generate_pairs_is_the_engine_folder_plus_import(folders, media):
    run("import_pairs", str(folders["2afc"]), "--study", "via-folder")
    run("generate_pairs", "--study", "in-process", *TWO_AFC, *COMMON)
    a, b = Study.objects.get(slug="via-folder"), Study.objects.get(slug="in-process")
    assert b.protocol == "2afc" and rows(a) == rows(b)
    assert files(media / "studies" / "via-folder") == files(media / "studies" / "in-process")


@pytest.mark.django_db
def test_label_rows_carry_classes_levels_and_the_study_label_set(folders, media):
    manifest = json.loads((folders["label"] / "manifest.json").read_text())
    run("import_pairs", str(folders["label"]), "--study", "labels")
    study = Study.objects.get(slug="labels")
    assert study.protocol == "label" and study.label_set == manifest["label_set"]
    pairs = Pair.objects.filter(study=study)
    assert {(p.source_image, p.class_name) for p in pairs} == {
        ("astronaut-c0-32", "astronaut"), ("chelsea-c0-32", "cat")}
    assert sorted(p.level for p in pairs if not p.is_sentinel) == [0, 0, 1, 1]
    gold = [p for p in pairs if p.is_sentinel]
    assert gold and all(p.other_path == p.natural_path and p.class_name for p in gold)
    assert all(p.third_path == "" and p.condition_b is None for p in pairs)


@pytest.mark.django_db
def test_rating_single_sets_the_new_study(folders):
    run("import_pairs", str(folders["rating"]), "--study", "mos")
    study = Study.objects.get(slug="mos")
    assert (study.protocol, study.rating_shows) == ("rating", "single")
    anchors = Pair.objects.filter(study=study, is_sentinel=True)
    assert anchors.count() == 2 and all(p.other_path == p.natural_path for p in anchors)


@pytest.mark.django_db
def test_another_protocol_than_the_study_is_refused(folders, media):
    Study.objects.create(slug="jnd-study", title="jnd")
    with pytest.raises(CommandError, match="is a jnd study and this folder holds 2afc"):
        run("import_pairs", str(folders["2afc"]), "--study", "jnd-study")
    with pytest.raises(CommandError, match="is a jnd study"):
        run("generate_pairs", "--study", "jnd-study", *LABEL, *COMMON)
    assert not Pair.objects.exists() and files(media) == {}


@pytest.mark.django_db
def test_a_class_outside_the_study_label_set_is_refused(folders, media):
    Study.objects.create(slug="cats", title="cats", protocol="label", label_set=["cat", "dog"])
    with pytest.raises(CommandError, match="class 'astronaut' is not in study 'cats'"):
        run("import_pairs", str(folders["label"]), "--study", "cats")
    # generate_pairs offers the study's label set: refused before anything is generated.
    with pytest.raises(CommandError, match=r"astronaut-c0-32 \(class 'astronaut'\)"):
        run("generate_pairs", "--study", "cats", *LABEL, *COMMON)
    with pytest.raises(CommandError, match="outside the label set"):
        run("generate_pairs", "--study", "new-labels", *LABEL, "--label-set", "cat,dog",
            *COMMON)
    assert not Pair.objects.exists() and files(media) == {}
    assert not Study.objects.filter(slug="new-labels").exists()


def _third(manifest: dict) -> dict:
    return next(p for p in manifest["pairs"] if not p["is_sentinel"])


def _tamper_third(folder: Path, manifest: dict) -> None:
    rel = _third(manifest)["third_path"]
    values = np.asarray(Image.open(folder / rel).convert("RGB")).copy()
    values[0, 0, 0] ^= 1
    Image.fromarray(values).save(folder / rel)


def _wrong_third_hash(folder: Path, manifest: dict) -> None:
    item = _third(manifest)
    for p in manifest["pairs"]:
        if p["third_path"] == item["third_path"]:
            p["third_sha256"] = "0" * 64
    manifest["files"][item["third_path"]] = "0" * 64


def _third_over_bound(folder: Path, manifest: dict) -> None:
    """Copy B's PNG moved past its L2 bound, its hash updated: only re-measuring shows it."""
    import hashlib

    item = _third(manifest)
    path = folder / item["third_path"]
    values = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    Image.fromarray(np.clip(values + 60, 0, 255).astype(np.uint8)).save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for p in manifest["pairs"]:
        if p["third_path"] == item["third_path"]:
            p["third_sha256"] = digest
    manifest["files"][item["third_path"]] = digest


def _b_size_misrecorded(folder: Path, manifest: dict) -> None:
    _third(manifest)["measures_b"]["stored_size"] *= 0.5


def _b_condition_unknown(folder: Path, manifest: dict) -> None:
    _third(manifest)["condition_b"] = "l2:bound=9.0"


def _control_not_identical(folder: Path, manifest: dict) -> None:
    control = next(p for p in manifest["pairs"] if p["is_sentinel"])
    other = _third(manifest)
    control["other_path"], control["other_sha256"] = other["other_path"], other["other_sha256"]


@pytest.mark.django_db
@pytest.mark.parametrize("tamper, message", [
    (_tamper_third, "SHA-256"), (_wrong_third_hash, "SHA-256"),
    (_third_over_bound, "copy B.* over the bound"), (_b_size_misrecorded, "stored size"),
    (_b_condition_unknown, "unknown condition_b"),
    (_control_not_identical, "does not show its natural image unchanged"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_a_bad_2afc_folder_is_refused_and_nothing_is_written(folders, media, tmp_path, tamper,
                                                             message):
    bad = tmp_path / "bad"
    shutil.copytree(folders["2afc"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    tamper(bad, manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CommandError, match=message):
        run("import_pairs", str(bad), "--study", "bad")
    assert not Study.objects.exists() and not Pair.objects.exists()
    assert files(media) == {}


@pytest.mark.django_db
def test_shown_triplets_are_never_changed(folders, media, tmp_path):
    run("import_pairs", str(folders["2afc"]), "--study", "shown", "--title", "shown")
    study = Study.objects.get(slug="shown")
    start_session(Participant.objects.create(study=study, external_id="p1"))
    assert Pair.objects.filter(study=study, trials__isnull=False).exists()
    before_rows, before_files = rows(study), files(media)
    other = tmp_path / "seed1"
    assert engine_main(["generate", "--out", str(other), *TWO_AFC, *COMMON, "--seed", "1"]) == 0
    with pytest.raises(CommandError, match="already shown to participants"):
        run("import_pairs", str(other), "--study", "shown")
    assert rows(study) == before_rows and files(media) == before_files


@pytest.mark.django_db
def test_a_label_study_without_answers_takes_the_folder_label_set(folders):
    Study.objects.create(slug="empty-labels", title="t", protocol="label")
    run("import_pairs", str(folders["label"]), "--study", "empty-labels")
    manifest = json.loads((folders["label"] / "manifest.json").read_text())
    assert Study.objects.get(slug="empty-labels").label_set == manifest["label_set"]


@pytest.mark.django_db
def test_versus_at_calibrated_bounds_pairs_the_shared_labels():
    """``--versus linf l2 --bounds calibrated:SLUG``: A and B at each label both threat
    models were calibrated at (p50 only here: l2 has no p10), as labelled bounds."""
    from studyapp.management.commands._shared import add_generation_arguments, generation_request
    from studyapp.models import Calibration

    pilot = Study.objects.create(slug="pilot", title="pilot")
    Calibration.objects.create(study=pilot, targets=[0.1, 0.5], fit={}, presets={
        "linf": {"p10": 0.01, "p50": 0.02}, "l2": {"p50": 0.75}})
    import argparse

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    opts = vars(parser.parse_args(["--protocol", "2afc", "--versus", "linf:num_iterations=2",
                                   "l2:num_iterations=2", "--bounds", "calibrated:pilot"]))
    request = generation_request(opts)
    assert request.versus == (("linf:bound=0.02@p50,num_iterations=2",
                               "l2:bound=0.75@p50,num_iterations=2"),)
    assert request.specs == request.versus[0]
    opts["versus"] = [["linf:num_iterations=2", "stadv"]]
    with pytest.raises(CommandError, match="no presets for threat model 'stadv'"):
        generation_request(opts)


@pytest.mark.django_db
@pytest.mark.parametrize("extra, message", [
    ("x" * 201, "is longer than 200 characters"),
    ("", "'label_set' must be a list of class names"),  # the manifest reader's check
    (None, "given twice in the label set"),  # None: the first label again
])
def test_a_label_set_that_could_never_be_answered_is_refused(folders, media, tmp_path, extra,
                                                             message):
    bad = tmp_path / "bad"
    shutil.copytree(folders["label"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["label_set"].append(manifest["label_set"][0] if extra is None else extra)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CommandError, match=message):  # (a new study's clean() says it first)
        run("import_pairs", str(bad), "--study", "bad")
    assert not Study.objects.exists() and not Pair.objects.exists()
    assert files(media) == {}


@pytest.mark.django_db
def test_an_existing_label_study_refuses_a_manifest_label_set_that_cannot_be_answered(
        folders, media, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folders["label"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    labels = list(manifest["label_set"])
    Study.objects.create(slug="labels", title="t", protocol="label", label_set=labels)
    manifest["label_set"] = labels + ["y" * 300]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CommandError, match="label set cannot be answered: .*longer than 200"):
        run("import_pairs", str(bad), "--study", "labels")
    assert not Pair.objects.exists() and files(media) == {}
