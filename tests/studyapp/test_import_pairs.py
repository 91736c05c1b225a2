"""One generation pipeline: ``python -m engine generate`` + ``import_pairs`` equals
``generate_pairs``; a tampered or inconsistent folder is refused with nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from engine.__main__ import main as engine_main
from studyapp.models import Condition, Pair, Participant, Study
from studyapp.scheduler import start_session

# A named bound and a labelled number (VALUE@LABEL) for two threat models: labels must travel.
ARGS = ["--spec", "linf:num_iterations=2", "--spec", "l2:num_iterations=2", "--bounds",
        "small,0.05@big", "--classifier", "resnet18:untrained", "--lpips", "alexnet:untrained",
        "--size", "32", "--max-images", "3", "--batch-size", "2", "--catch", "1",
        "--device", "cpu", "--no-progress"]


@pytest.fixture(autouse=True)
def media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()} if root.exists() else {}


def engine_generate(out: Path, seed: int = 0) -> None:
    assert engine_main(["generate", "--out", str(out), *ARGS, "--seed", str(seed)]) == 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """One engine folder for the module (generation is the slow part); copied per test."""
    out = tmp_path_factory.mktemp("engine") / "out"
    engine_generate(out)
    return out


def copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def rows(study: Study) -> list[tuple]:
    out = []
    for p in Pair.objects.filter(study=study).select_related("condition").order_by("key"):
        out.append((p.key, p.condition.spec if p.condition else None,
                    p.condition.label if p.condition else None, p.level, p.is_sentinel,
                    p.is_catch, p.source_image, p.natural_path.split("/", 2)[2],
                    p.other_path.split("/", 2)[2], p.width, p.height, p.label,
                    p.adversarial_label, p.attack_success, p.distances, p.metadata))
    return out


@pytest.mark.django_db
def test_engine_folder_plus_import_equals_generate_pairs(folder, media, tmp_path, capsys):
    out = run("import_pairs", str(folder), "--study", "via-folder")
    assert "UNTRAINED" in out
    a = Study.objects.get(slug="via-folder")
    # Labels travel: named and VALUE@LABEL bounds reach Condition.label, per threat model.
    labels = sorted(Condition.objects.filter(study=a).values_list("threat_model", "label"))
    assert labels == [("l2", "big"), ("l2", "small"), ("linf", "big"), ("linf", "small")]
    assert Condition.objects.get(study=a, threat_model="linf", label="big").bound == 0.05
    # Provenance: the untrained LPIPS network's column says so, and so does the study.
    pair = Pair.objects.filter(study=a).first()
    assert "lpips_alexnet_untrained" in pair.distances and "lpips_alexnet" not in pair.distances
    assert "UNTRAINED" in a.description
    assert {n["weights"] for n in a.generation["networks"]} == {"untrained"}
    assert a.generation["code_version"].startswith("perceptlab")

    out2 = run("generate_pairs", "--study", "in-process", *ARGS)
    b = Study.objects.get(slug="in-process")
    assert "UNTRAINED" in out2
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb) == 3 * 4 + 3 + 1
    # Equal rows. The one float-side number, ``size`` (the attack's own measure of its float
    # image before 8-bit storage), may differ in its last float32 bits between two runs of
    # the attack in one process (CPU kernels pick paths by memory alignment); what is stored
    # and shown (bytes, stored sizes, distances) is exact.
    float_side = [r[-1].pop("size") for r in ra], [r[-1].pop("size") for r in rb]
    assert ra == rb
    assert [x is None for x in float_side[0]] == [x is None for x in float_side[1]]
    assert [x for x in float_side[0] if x is not None] == pytest.approx(
        [x for x in float_side[1] if x is not None], rel=1e-6)
    # Byte-identical PNGs by either route, and identical to the engine's folder.
    fa, fb = files(media / "studies" / "via-folder"), files(media / "studies" / "in-process")
    assert fa == fb
    manifest = json.loads((folder / "manifest.json").read_text())
    assert fa == {rel: (folder / rel).read_bytes() for rel in manifest["files"]}
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256(fa[rel]).hexdigest() == digest


@pytest.mark.django_db
def test_reimport_changes_nothing(folder, media):
    run("import_pairs", str(folder), "--study", "again")
    before_rows = rows(Study.objects.get(slug="again"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in media.rglob("*") if p.is_file()}
    out = run("import_pairs", str(folder), "--study", "again")
    assert "0 pairs created, 0 updated, 16 unchanged" in out
    assert rows(Study.objects.get(slug="again")) == before_rows
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in media.rglob("*") if p.is_file()}
    assert after == before  # not even rewritten


def _tamper_png(folder: Path, manifest: dict) -> None:
    rel = next(p["other_path"] for p in manifest["pairs"] if p["condition"])
    pixels = np.asarray(Image.open(folder / rel).convert("RGB")).copy()
    pixels[0, 0, 0] ^= 1  # a valid PNG, one value changed by one level
    Image.fromarray(pixels).save(folder / rel)


def _wrong_hash(folder: Path, manifest: dict) -> None:
    pair = next(p for p in manifest["pairs"] if p["condition"])
    pair["other_sha256"] = "0" * 64
    manifest["files"][pair["other_path"]] = "0" * 64


def _unknown_spec(folder: Path, manifest: dict) -> None:
    old = manifest["conditions"][0]["spec"]
    manifest["conditions"][0]["spec"] = "nosuch:bound=1"
    for p in manifest["pairs"]:
        if p["condition"] == old:
            p["condition"] = "nosuch:bound=1"


def _bound_changed(folder: Path, manifest: dict) -> None:
    manifest["conditions"][0]["bound"] *= 2


def _over_bound(folder: Path, manifest: dict) -> None:
    # Claim a smaller bound than the images have: spec, condition and pairs agree, PNGs don't.
    c = next(c for c in manifest["conditions"] if c["threat_model"] == "linf")
    new_spec = c["spec"].replace(f"bound={c['bound']!r}", "bound=0.001")
    for p in manifest["pairs"]:
        if p["condition"] == c["spec"]:
            p["condition"], p["bound"] = new_spec, 0.001
    c["spec"], c["bound"] = new_spec, 0.001


def _unknown_weights(folder: Path, manifest: dict) -> None:
    manifest["generator"]["networks"][1]["weights"] = "mystery"


def _missing_png(folder: Path, manifest: dict) -> None:
    (folder / next(iter(manifest["files"]))).unlink()


def _bad_label(folder: Path, manifest: dict) -> None:
    manifest["conditions"][0]["label"] = "two words"


@pytest.mark.django_db
@pytest.mark.parametrize("tamper, message", [
    (_tamper_png, "SHA-256"), (_wrong_hash, "SHA-256"), (_unknown_spec, "nosuch"),
    (_bound_changed, "disagree with its spec"), (_over_bound, "over the bound"),
    (_unknown_weights, "unknown weights state"), (_missing_png, "missing"),
    (_bad_label, "one word"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_a_bad_folder_is_refused_and_nothing_is_written(folder, media, tmp_path, tamper,
                                                         message):
    bad = copy(folder, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    tamper(bad, manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CommandError, match=message):
        run("import_pairs", str(bad), "--study", "bad")
    assert not Study.objects.exists() and not Pair.objects.exists()
    assert files(media) == {}


@pytest.mark.django_db
def test_not_a_manifest_folder_is_a_clear_error(tmp_path, media):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="manifest.json not found"):
        run("import_pairs", str(tmp_path / "empty"), "--study", "x")
    with pytest.raises(CommandError, match="is not a folder"):
        run("import_pairs", str(tmp_path / "nope"), "--study", "x")
    assert not Study.objects.exists()


@pytest.mark.django_db
def test_shown_pairs_are_never_changed_by_an_import(folder, media, tmp_path):
    run("import_pairs", str(folder), "--study", "shown")
    study = Study.objects.get(slug="shown")
    start_session(Participant.objects.create(study=study, external_id="p1"))
    before_rows, before_files = rows(study), files(media)
    other = tmp_path / "seed1"
    engine_generate(other, seed=1)
    with pytest.raises(CommandError, match="already shown to participants"):
        run("import_pairs", str(other), "--study", "shown")
    assert rows(study) == before_rows and files(media) == before_files


@pytest.mark.django_db
def test_import_dataset_sends_an_engine_folder_to_import_pairs(folder, media):
    with pytest.raises(CommandError, match="import_pairs"):
        run("import_dataset", str(folder))
    assert not Study.objects.exists()
    out = run("import_dataset", str(folder), "--slug", "via-dataset")
    assert "16 pairs created" in out and Pair.objects.count() == 16


@pytest.mark.django_db
def test_migration_renames_old_untrained_lpips_columns():
    """Migration 0006_untrained_columns_defense_labels: an older study's untrained-AlexNet
    distances stored as ``lpips_alexnet`` become ``lpips_alexnet_untrained``; a pretrained
    study's column is left alone."""
    import importlib

    from django.apps import apps

    migration = importlib.import_module(
        "studyapp.migrations.0006_untrained_columns_defense_labels")
    old = Study.objects.create(slug="old", title="old", generation={
        "lpips_models": {"alexnet": {"lpips_model": "alexnet", "lpips_weights": "untrained"}}})
    kept = Study.objects.create(slug="kept", title="kept", generation={
        "lpips_models": {"alexnet": {"lpips_model": "alexnet",
                                     "lpips_weights": "IMAGENET1K_V1"}}})
    for study in (old, kept):
        Pair.objects.create(study=study, key="a|sentinel", is_sentinel=True, source_image="a",
                            natural_path="n.png", other_path="n.png", width=8, height=8,
                            distances={"l2": 0.0, "lpips_alexnet": 0.25})
    migration.rename_untrained_columns(apps, None)
    assert Pair.objects.get(study=old).distances == {"l2": 0.0, "lpips_alexnet_untrained": 0.25}
    assert Pair.objects.get(study=kept).distances == {"l2": 0.0, "lpips_alexnet": 0.25}
    old.refresh_from_db()
    assert set(old.generation["lpips_models"]) == {"alexnet_untrained"}
