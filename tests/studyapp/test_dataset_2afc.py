"""Releases of the new protocols: 2AFC studies in the BAPPS 2AFC and NIGHTS layouts (read by the
authors' loaders, scored as they score), back in as studies, and the general release of 2AFC,
rating and label studies (export → import → export gives byte-identical tables)."""

from __future__ import annotations

import csv
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models import Q

from engine.distances import l2_distance
from engine.release_formats import bapps_2afc_score, load_pixels
from studyapp.models import Condition, Judgment, Pair, Participant, Session, Study, Trial
from tests.oracles import bapps_twoafc, nights
from tests.studyapp.conftest import PHOTOS, SIZE, natural_image, perturbed_image, write_png

pytestmark = pytest.mark.django_db
TABLES = ["conditions.csv", "pairs.csv", "participants.csv", "sessions.csv", "judgments.csv",
          "fits.json", "study.json"]
RATERS = 7  # ≥ 6: NIGHTS' loader keeps items with at least 6 votes


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def _l2(media: Path, a: str, b: str) -> float:
    x, y = (torch.from_numpy(load_pixels(media / p)).permute(2, 0, 1)[None].double() / 255
            for p in (a, b))
    return float(l2_distance(x, y)[0])


def _answer(*, natural_first: bool, chose_b: bool) -> str:
    # copy A is on the left when natural_first: choosing B means pressing the other side
    return ("right" if chose_b else "left") if natural_first else ("left" if chose_b else "right")


@pytest.fixture
def twoafc(media_root):
    """A 2AFC study: per photo, linf 8/255 (A) against 32/255 (B), and a control (A = reference).

    RATERS people judge every triplet once, sides balanced; people mostly choose the smaller
    perturbation; plus a simulated observer, an excluded session, a practice trial and a
    retest — none of which count in the 2AFC layouts.
    """
    study = Study.objects.create(slug="twoafc", title="Which is more like the middle?",
                                 protocol="2afc", trials_per_session=4, practice_trials=1)
    small = Condition.objects.create(study=study, threat_model="linf", bound=8 / 255,
                                     spec="linf:bound=0.031373", label="small")
    large = Condition.objects.create(study=study, threat_model="linf", bound=32 / 255,
                                     spec="linf:bound=0.125490", label="large")
    for n, name in enumerate(PHOTOS):
        ref = write_png(media_root, f"twoafc/ref/{name}.png", natural_image(name))
        a = write_png(media_root, f"twoafc/small/{name}.png", perturbed_image(name, 8 / 255, n))
        b = write_png(media_root, f"twoafc/large/{name}.png",
                      perturbed_image(name, 32 / 255, 10 + n))
        # swap which copy is A for one photo, so people choose A there
        if n == 1:
            a, b = b, a
        Pair.objects.create(
            study=study, condition=large if n == 1 else small,
            condition_b=small if n == 1 else large, key=f"{name}|triplet", source_image=name,
            natural_path=ref, other_path=a, third_path=b, width=SIZE, height=SIZE,
            distances={"l2": _l2(media_root, ref, a)}, distances_b={"l2": _l2(media_root, ref, b)})
        Pair.objects.create(
            study=study, condition=None, condition_b=small, is_sentinel=True,
            key=f"{name}|control", source_image=name, natural_path=ref, other_path=ref,
            third_path=a, width=SIZE, height=SIZE, distances={"l2": 0.0},
            distances_b={"l2": _l2(media_root, ref, a)})
    rng = np.random.default_rng(5)
    pairs = list(study.pairs.order_by("id"))
    for r in range(RATERS + 2):  # + a simulated observer + an excluded session
        person = Participant.objects.create(study=study, external_id=f"w{r}",
                                            is_simulated=r == RATERS)
        session = Session.objects.create(participant=person, excluded=r == RATERS + 1,
                                         exclusion_reason="too fast" if r == RATERS + 1 else "")
        # practice first (on a control, as practice items are not main items), a retest last
        shown = [(pairs[1], True, False)] + [(p, False, False) for p in pairs if p != pairs[1]] \
            + [(pairs[2], False, True)]
        for pos, (pair, practice, repeat) in enumerate(shown):
            natural_first = bool((r + pos) % 2)
            closer_b = pair.distances_b["l2"] < pair.distances["l2"]
            chose_b = closer_b if rng.random() < 0.8 else not closer_b
            trial = Trial.objects.create(session=session, position=pos, pair=pair,
                                         natural_first=natural_first, is_practice=practice,
                                         is_repeat=repeat)
            Judgment.objects.create(trial=trial, response=_answer(natural_first=natural_first,
                                                             chose_b=chose_b),
                                    response_time_ms=float(rng.integers(300, 900)),
                                    first_ms=500.0 + pos, blank_ms=None, second_ms=None,
                                    idempotency_key=f"{r}-{pos}")
    return study


def counted(study: Study, include_simulated: bool = False):
    """Per data triplet: (n, n choosing B) from the stored judgments, the test's own count."""
    out = {}
    for pair in study.pairs.filter(is_sentinel=False).order_by("id"):
        main = Judgment.objects.filter(trial__pair=pair, trial__is_practice=False,
                                       trial__is_repeat=False, trial__session__excluded=False)
        if not include_simulated:
            main = main.filter(trial__session__participant__is_simulated=False)
        b = main.filter(Q(trial__natural_first=True, response="right")
                        | Q(trial__natural_first=False, response="left")).count()
        out[pair.key] = (main.count(), b)
    return out


def test_bapps_2afc_export_is_read_and_scored_like_the_lpips_repo(twoafc, media_root, tmp_path):
    out = tmp_path / "bapps"
    text = run("export_dataset", "--study", "twoafc", str(out), "--bapps-2afc")
    assert "Wrote 3 triplets in BAPPS 2AFC layout" in text
    index = list(csv.DictReader((out / "triplets.csv").open()))
    expected = counted(twoafc)
    assert [r["key"] for r in index] == list(expected)  # controls left out
    dataset = bapps_twoafc.TwoAFCDataset(str(out), load_size=SIZE)
    assert len(dataset) == 3
    for i, row in enumerate(index):
        pair = Pair.objects.get(study=twoafc, key=row["key"])
        n, b = expected[row["key"]]
        assert (int(row["n_judgments"]), int(row["n_b"])) == (n, b) and n == RATERS
        item = dataset[i]
        assert float(item["judge"]) == float(np.float32(b / n))
        for key, rel in (("ref", pair.natural_path), ("p0", pair.other_path),
                         ("p1", pair.third_path)):
            pixels = np.round((item[key] * 0.5 + 0.5).double().numpy().transpose(1, 2, 0) * 255)
            assert np.array_equal(pixels.astype(np.uint8), load_pixels(media_root / rel)), key
    # the authors' score of L2 on the exported files = ours from the stored distances
    loader = bapps_twoafc.CreateDataLoader(out, load_size=SIZE, batch_size=2)
    theirs, _ = bapps_twoafc.score_2afc_dataset(
        loader, lambda x, y: l2_distance(((x.double() + 1) / 2).clamp(0, 1),
                                         ((y.double() + 1) / 2).clamp(0, 1)))
    pairs = [Pair.objects.get(study=twoafc, key=r["key"]) for r in index]
    ours, _ = bapps_2afc_score([p.distances["l2"] for p in pairs],
                               [p.distances_b["l2"] for p in pairs],
                               [expected[p.key][1] / expected[p.key][0] for p in pairs])
    assert ours == pytest.approx(theirs, abs=1e-6) and 0.5 < ours < 1.0

    with_sim = tmp_path / "sim"
    run("export_dataset", "--study", "twoafc", str(with_sim), "--bapps-2afc",
        "--include-simulated")
    rows = list(csv.DictReader((with_sim / "triplets.csv").open()))
    assert [int(r["n_judgments"]) for r in rows] == [RATERS + 1] * 3


def test_bapps_2afc_import_gives_a_2afc_study_that_exports_the_same(twoafc, tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    run("export_dataset", "--study", "twoafc", str(first), "--bapps-2afc")
    text = run("import_dataset", str(first), "--bapps-2afc", "--slug", "bapps-copy")
    assert "3 pairs" in text
    copy = Study.objects.get(slug="bapps-copy")
    assert copy.protocol == "2afc" and copy.judgments_per_pair == RATERS
    expected = counted(twoafc)
    for pair in copy.pairs.order_by("id"):
        assert pair.third_path and pair.condition and pair.condition_b
        n, b = expected[pair.key]  # keys and counts come back from triplets.csv
        got = Judgment.objects.filter(trial__pair=pair)
        assert got.count() == n
        assert got.filter(trial__natural_first=True, response="right").count() == b
        assert set(pair.distances) == set(pair.distances_b) == {"l2", "linf"}
        original = Pair.objects.get(study=twoafc, key=pair.key)
        assert pair.distances["l2"] == pytest.approx(original.distances["l2"], rel=1e-5)
        assert Judgment.objects.filter(trial__pair=pair, blank_ms__isnull=True).count() == n
    run("export_dataset", "--study", "bapps-copy", str(second), "--bapps-2afc")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    # without our index, --raters judgments per triplet are rebuilt from the fraction
    (first / "triplets.csv").unlink()
    run("import_dataset", str(first), "--bapps-2afc", "--slug", "bapps-raters", "--raters", "4")
    rebuilt = Study.objects.get(slug="bapps-raters")
    for pair in rebuilt.pairs.all():
        judge = float(np.load(first / "judge" / f"{pair.source_image}.npy")[0])
        assert Judgment.objects.filter(trial__pair=pair, response="right").count() == \
            round(judge * 4)
        assert Judgment.objects.filter(trial__pair=pair).count() == 4


def test_nights_export_is_read_and_scored_like_dreamsim(twoafc, media_root, tmp_path):
    out = tmp_path / "nights"
    assert "Wrote 3 triplets in NIGHTS layout" in run(
        "export_dataset", "--study", "twoafc", str(out), "--nights")
    dataset = nights.TwoAFCDataset(str(out), split="test", preprocess="SSIM")
    assert len(dataset) == 3  # every triplet has RATERS ≥ 6 votes
    data = list(csv.DictReader((out / "data.csv").open()))
    index = list(csv.DictReader((out / "triplets.csv").open()))
    expected = counted(twoafc)
    for k, (row, idx) in enumerate(zip(data, index, strict=True)):
        pair = Pair.objects.get(study=twoafc, key=idx["key"])
        n, b = expected[pair.key]
        img_ref, img_left, img_right, p, item_id = dataset[k]
        assert int(item_id) == k and int(row["votes"]) == n
        assert p == np.float32(b / n) and float(row["left_vote"]) == pytest.approx(1 - b / n)
        for tensor, rel in ((img_ref, pair.natural_path), (img_left, pair.other_path),
                            (img_right, pair.third_path)):
            pixels = np.round(tensor.double().numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
            assert np.array_equal(pixels, load_pixels(media_root / rel))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False)
    theirs = nights.score_nights_dataset(lambda x, y: l2_distance(x.double(), y.double()),
                                         loader, "cpu")
    pairs = [Pair.objects.get(study=twoafc, key=r["key"]) for r in index]
    ours, _ = bapps_2afc_score([p.distances["l2"] for p in pairs],
                               [p.distances_b["l2"] for p in pairs],
                               [expected[p.key][1] / expected[p.key][0] for p in pairs])
    assert ours == pytest.approx(float(theirs), abs=1e-6)

    run("import_dataset", str(out), "--nights", "--slug", "nights-copy")
    copy = Study.objects.get(slug="nights-copy")
    assert copy.protocol == "2afc" and copy.pairs.count() == 3
    again = tmp_path / "again"
    run("export_dataset", "--study", "nights-copy", str(again), "--nights")
    for name in ("data.csv", "triplets.csv"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    # DreamSim's own filter: --min-votes above the vote count keeps nothing, and says so
    with pytest.raises(CommandError, match="no triplets to import"):
        run("import_dataset", str(out), "--nights", "--slug", "none", "--min-votes", "50")


def test_nights_export_with_fewer_than_6_votes_needs_min_votes(twoafc, tmp_path):
    """DreamSim's loader keeps votes >= 6: a study with 3 votes a triplet is refused by default
    (it would load empty), written with its true counts under --min-votes 3, with a warning."""
    Session.objects.filter(participant__study=twoafc, participant__external_id__in=[
        f"w{r}" for r in range(3, RATERS)]).update(excluded=True)
    assert {n for n, _ in counted(twoafc).values()} == {3}
    with pytest.raises(CommandError, match=r"3 of 3 triplets have fewer than 6 votes \(fewest:"
                       r" 3\).*load an empty dataset.*--min-votes"):
        run("export_dataset", "--study", "twoafc", str(tmp_path / "a"), "--nights")
    assert not (tmp_path / "a").exists()
    out, err = StringIO(), StringIO()
    call_command("export_dataset", "--study", "twoafc", str(tmp_path / "b"), "--nights",
                 "--min-votes", "3", stdout=out, stderr=err)
    assert "Wrote 3 triplets in NIGHTS layout" in out.getvalue()
    assert "Warning: 3 of 3 written triplets have fewer than 6 votes" in err.getvalue()
    rows = list(csv.DictReader((tmp_path / "b" / "data.csv").open()))
    assert [int(r["votes"]) for r in rows] == [3, 3, 3]
    assert len(nights.TwoAFCDataset(str(tmp_path / "b"), split="test")) == 0  # as warned
    with pytest.raises(CommandError, match="--min-votes goes with --nights"):
        run("export_dataset", "--study", "twoafc", str(tmp_path / "c"), "--bapps-2afc",
            "--min-votes", "3")


def test_2afc_layouts_refuse_wrong_protocols_and_malformed_folders(twoafc, make_study,
                                                                   media_root, tmp_path):
    make_study("jnd-study")
    for flag in ("--bapps-2afc", "--nights"):
        with pytest.raises(CommandError, match="uses the jnd protocol"):
            run("export_dataset", "--study", "jnd-study", str(tmp_path / "x"), flag)
    with pytest.raises(CommandError, match="uses the 2afc protocol.*--bapps-2afc or --nights"):
        run("export_dataset", "--study", "twoafc", str(tmp_path / "x"), "--bapps-jnd")
    assert not (tmp_path / "x").exists()
    out = tmp_path / "bapps"
    run("export_dataset", "--study", "twoafc", str(out), "--bapps-2afc")
    with pytest.raises(CommandError, match="not an empty folder"):
        run("export_dataset", "--study", "twoafc", str(out), "--bapps-2afc")

    before = sorted(p.name for p in media_root.iterdir())
    (out / "p1" / "000001.png").unlink()
    with pytest.raises(CommandError, match="'000001' has no file in p1/"):
        run("import_dataset", str(out), "--bapps-2afc", "--slug", "broken")
    with pytest.raises(CommandError, match="not a BAPPS 2AFC folder: no ref/, p0/, p1/"):
        run("import_dataset", str(tmp_path), "--bapps-2afc", "--slug", "broken")
    with pytest.raises(CommandError, match="data.csv is missing"):
        run("import_dataset", str(out), "--nights", "--slug", "broken")
    run("export_dataset", "--study", "twoafc", str(tmp_path / "n"), "--nights")
    with pytest.raises(CommandError, match="slug 'twoafc' exists already"):
        run("import_dataset", str(tmp_path / "n"), "--nights", "--slug", "twoafc")
    with pytest.raises(CommandError, match="--split and --min-votes go with --nights"):
        run("import_dataset", str(out), "--bapps-2afc", "--slug", "broken", "--split", "test")
    # a folder that reads but holds a corrupt image: refused inside the transaction
    good = tmp_path / "good"
    run("export_dataset", "--study", "twoafc", str(good), "--bapps-2afc")
    (good / "p0" / "000002.png").write_bytes(b"not a png")
    with pytest.raises(CommandError, match="not a readable image"):
        run("import_dataset", str(good), "--bapps-2afc", "--slug", "broken")
    assert not Study.objects.filter(slug="broken").exists()
    assert sorted(p.name for p in media_root.iterdir()) == before  # nothing staged is left


# ------------------------------------------------------------------------------ releases


def _round_trip(slug: str, tmp_path: Path) -> tuple[Path, Path, Study]:
    first, second = tmp_path / "one", tmp_path / "two"
    run("export_dataset", "--study", slug, str(first))
    run("import_dataset", str(first), "--slug", f"{slug}-copy")
    copy = Study.objects.get(slug=f"{slug}-copy")
    run("export_dataset", "--study", copy.slug, str(second))
    for name in TABLES[:-1]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    images = sorted(p.name for p in (first / "images").iterdir())
    assert images == sorted(p.name for p in (second / "images").iterdir()) and images
    for name in images:
        assert (first / "images" / name).read_bytes() == (second / "images" / name).read_bytes()
    return first, second, copy


def test_2afc_release_round_trip_keeps_triplets_and_retests(twoafc, tmp_path):
    first, _, copy = _round_trip("twoafc", tmp_path)
    header = next(csv.reader((first / "pairs.csv").open()))
    assert header[-5:] == ["third_image", "third_sha256", "condition_b", "class_name",
                           "b_distance_l2"]
    assert next(csv.reader((first / "judgments.csv").open()))[-1] == "is_repeat"
    readme = (first / "README.md").read_text()
    for col in header + ["is_repeat"]:
        assert f"`{col}`" in readme, col
    assert "Protocol `2afc`" in readme
    assert copy.protocol == "2afc"
    for pair in twoafc.pairs.all():
        twin = copy.pairs.get(key=pair.key)
        assert np.array_equal(load_pixels(_media(twin.third_path)),
                              load_pixels(_media(pair.third_path)))
        assert (twin.condition_b.spec if twin.condition_b else None) == \
            (pair.condition_b.spec if pair.condition_b else None)
        assert twin.distances_b == pair.distances_b and twin.is_sentinel == pair.is_sentinel
    assert Trial.objects.filter(session__participant__study=copy, is_repeat=True).count() == \
        RATERS + 2
    assert Judgment.objects.filter(trial__session__participant__study=copy,
                                   second_ms__isnull=False).count() == 0
    # the data triplets hold one assignment per first-time main trial (repeats not counted)
    for pair in copy.pairs.filter(condition__isnull=False):
        assert pair.n_assigned == Trial.objects.filter(pair=pair, is_practice=False,
                                                       is_repeat=False).count()


def _media(rel: str) -> Path:
    from django.conf import settings

    return Path(settings.MEDIA_ROOT) / rel


def _judge(study: Study, pairs: list[Pair], answer, *, repeat_every: int = 0) -> None:
    for r in range(3):
        session = Session.objects.create(participant=Participant.objects.create(
            study=study, external_id=f"p{r}"))
        shown = [(p, False) for p in pairs]
        if repeat_every:
            shown += [(p, True) for p in pairs[::repeat_every]]
        for pos, (pair, repeat) in enumerate(shown):
            trial = Trial.objects.create(session=session, position=pos, pair=pair,
                                         natural_first=True, is_repeat=repeat)
            Judgment.objects.create(trial=trial, response=answer(r, pos, pair),
                                    response_time_ms=700.0, first_ms=250.0,
                                    blank_ms=None, second_ms=None,
                                    idempotency_key=f"{study.slug}-{r}-{pos}")


def test_rating_release_round_trip_keeps_settings_and_retests(make_study, tmp_path):
    study = make_study("rating", protocol="rating", rating_points=7, rating_shows="single",
                       retest_fraction=0.25)
    pairs = list(study.pairs.order_by("id"))
    _judge(study, pairs, lambda r, pos, pair: str(1 + (r + pos) % 7), repeat_every=3)
    first, _, copy = _round_trip("rating", tmp_path)
    assert (copy.protocol, copy.rating_points, copy.rating_shows, copy.retest_fraction) == \
        ("rating", 7, "single", 0.25)
    assert Trial.objects.filter(session__participant__study=copy, is_repeat=True).count() == 9
    rows = list(csv.DictReader((first / "judgments.csv").open()))
    assert {r["blank_ms"] for r in rows} == {""} and {r["response"] for r in rows} <= {
        str(i) for i in range(1, 8)}
    # a rating outside the scale is refused on import, and nothing is written
    rows[0]["response"] = "9"
    with (first / "judgments.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(CommandError, match="'9' is not an answer of this rating study"):
        run("import_dataset", str(first), "--slug", "bad-rating")
    assert not Study.objects.filter(slug="bad-rating").exists()


def test_label_release_round_trip_keeps_label_set_and_classes(make_study, tmp_path):
    labels = ["cat", "coffee", "person"]
    study = make_study("label", protocol="label", label_set=labels)
    truth = {"astronaut": "person", "chelsea": "cat", "coffee": "coffee"}
    for pair in study.pairs.all():
        pair.class_name = truth[pair.source_image]
        pair.save(update_fields=["class_name"])
    pairs = list(study.pairs.order_by("id"))
    _judge(study, pairs, lambda r, pos, pair: pair.class_name if r else labels[pos % 3])
    first, _, copy = _round_trip("label", tmp_path)
    assert copy.label_set == labels
    assert {p.key: p.class_name for p in copy.pairs.all()} == {
        p.key: p.class_name for p in study.pairs.all()}
    header = next(csv.reader((first / "pairs.csv").open()))
    assert "class_name" in header and not any(c.startswith("b_distance_") for c in header)
