"""BAPPS 2AFC and NIGHTS layouts: the authors' loaders read our folders unchanged, their 2AFC
scores equal ours, reading back gives the same records, and bad input is refused cleanly."""

from __future__ import annotations

import csv
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from engine.distances import l2_distance, ssim
from engine.release_formats import (
    NIGHTS_COLUMNS,
    NIGHTS_MIN_VOTES,
    NightsVotesWarning,
    ReleaseFormatError,
    Triplet,
    bapps_2afc_score,
    load_pixels,
    read_bapps_2afc,
    read_nights,
    score_triplets,
    write_bapps_2afc,
    write_nights,
)
from tests.oracles import bapps_twoafc, nights

SIZE = 64


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].double() / 255


def our_l2(x: np.ndarray, y: np.ndarray) -> float:
    return float(l2_distance(_tensor(x), _tensor(y))[0])


def our_dssim(x: np.ndarray, y: np.ndarray) -> float:
    return 1.0 - float(ssim(_tensor(x), _tensor(y))[0])


def _noisy(pixels: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def triplets(tmp_path) -> list[Triplet]:
    """Real photo patches; A and B noisy copies; counts out of n with split human votes.

    Items: 6 with different noise (people sometimes disagree with L2), a tie (A == B), a
    control (A == reference), one from PNG files (copied bytes) and one from a JPEG file
    (re-encoded from its pixels); item 2 has only 3 votes (below NIGHTS' filter of 6).
    """
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    out = []
    for i in range(6):
        photo = photos[i % len(photos)]
        y, x = 40 + 30 * i, 60 + 20 * i
        ref = np.ascontiguousarray(photo[y:y + SIZE, x:x + SIZE])
        sigma_a, sigma_b = (4.0, 12.0) if i % 2 else (14.0, 5.0)
        n = 3 if i == 2 else 8
        n_b = [6, 1, 2, 3, 8, 0][i]
        out.append(Triplet(ref=ref, a=_noisy(ref, sigma_a, i), b=_noisy(ref, sigma_b, 100 + i),
                           judge=n_b / n, n=n, key=f"item-{i}", is_imagenet=i < 3))
    ref = np.ascontiguousarray(photos[0][200:200 + SIZE, 200:200 + SIZE])
    same = _noisy(ref, 8.0, 7)
    out.append(Triplet(ref=ref, a=same, b=same.copy(), judge=5 / 8, n=8, key="tie"))
    out.append(Triplet(ref=ref, a=ref.copy(), b=_noisy(ref, 10.0, 8), judge=1 / 8, n=8,
                       key="control"))
    files = tmp_path / "sources"
    files.mkdir()
    for name, pixels in (("r", ref), ("a", _noisy(ref, 3.0, 9)), ("b", _noisy(ref, 20.0, 10))):
        Image.fromarray(pixels).save(files / f"{name}.png")
        Image.fromarray(pixels).save(files / f"{name}.jpg", quality=80)
    out.append(Triplet(ref=files / "r.png", a=files / "a.png", b=files / "b.png", judge=7 / 9,
                       n=9, key="png-files"))
    out.append(Triplet(ref=files / "r.jpg", a=files / "a.jpg", b=files / "b.jpg", judge=0.5,
                       n=6, key="jpeg-files"))
    return out


def _pixels_of(tensor: torch.Tensor) -> np.ndarray:
    """A [3, H, W] tensor in [0, 1] back to uint8 pixels (exact for 8-bit images)."""
    return np.round(tensor.double().numpy().transpose(1, 2, 0) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------ BAPPS 2AFC


def test_bapps_2afc_export_loads_with_the_authors_loader(triplets, tmp_path):
    out = tmp_path / "2afc"
    assert write_bapps_2afc(triplets, out) == len(triplets)
    dataset = bapps_twoafc.TwoAFCDataset(str(out), load_size=SIZE)
    assert len(dataset) == len(triplets)
    for i, t in enumerate(triplets):
        item = dataset[i]
        for key, source in (("ref", t.ref), ("p0", t.a), ("p1", t.b)):
            assert Path(item[f"{key}_path"]).name == f"{i:06d}.png"
            # their tensors are (x - 0.5) / 0.5: back to pixels, pixel for pixel
            assert np.array_equal(_pixels_of(item[key] * 0.5 + 0.5), load_pixels(source)), key
        assert item["judge"].shape == (1, 1, 1)
        assert float(item["judge"]) == float(np.float32(t.n_b / t.n))
    # DreamSim's own BAPPS reader (ssundaram21/dreamsim @ db4d16c, evaluation/eval_datasets.py,
    # BAPPSDataset) lists judge/ flat and opens <stem>.png in ref/, p0/ and p1/: so PNG only
    for judge in (out / "judge").iterdir():
        stem = judge.name.split(".")[0]
        assert all((out / sub / f"{stem}.png").is_file() for sub in ("ref", "p0", "p1"))
    assert {p.suffix for sub in ("ref", "p0", "p1") for p in (out / sub).iterdir()} == {".png"}
    # PNG sources are copied byte for byte; the JPEG is re-encoded losslessly from its pixels
    assert (out / "p1" / "000008.png").read_bytes() == Path(triplets[8].b).read_bytes()
    index = list(csv.DictReader((out / "triplets.csv").open()))
    assert [(r["key"], int(r["n_judgments"]), int(r["n_b"])) for r in index] == [
        (t.key, t.n, t.n_b) for t in triplets]


@pytest.mark.parametrize("name, ours, theirs_of", [
    ("l2", our_l2, lambda a, b: l2_distance(a, b)),
    ("1-ssim", our_dssim, lambda a, b: 1 - ssim(a, b)),
])
def test_bapps_2afc_score_equals_the_authors(triplets, tmp_path, name, ours, theirs_of):
    out = tmp_path / "2afc"
    write_bapps_2afc(triplets, out)
    loader = bapps_twoafc.CreateDataLoader(out, load_size=SIZE, batch_size=4)

    def func(in0, in1):  # their inputs are in [-1, 1]; our distances take [0, 1]
        return theirs_of(((in0.double() + 1) / 2).clamp(0, 1), ((in1.double() + 1) / 2)
                         .clamp(0, 1))

    their_score, verbose = bapps_twoafc.score_2afc_dataset(loader, func, name=name)
    our_score, per_item = score_triplets(read_bapps_2afc(out), ours)
    assert our_score == pytest.approx(their_score, abs=1e-12)
    np.testing.assert_allclose(per_item, verbose["scores"], atol=1e-7)
    assert 0.0 < our_score < 1.0  # people disagree with the metric on some items
    assert per_item[6] == 0.5  # the tie (A == B) scores one half
    # judges as stored: the fraction that chose p1
    np.testing.assert_allclose(verbose["gts"], [t.judge for t in triplets], atol=1e-7)


def test_bapps_2afc_reads_back_and_rewrites_identically(triplets, tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    write_bapps_2afc(triplets, first)
    back = read_bapps_2afc(first)
    assert [(t.key, t.n, t.n_b, t.name) for t in back] == [
        (t.key, t.n, t.n_b, f"{i:06d}") for i, t in enumerate(triplets)]
    for t, original in zip(back, triplets, strict=True):
        assert t.judge == pytest.approx(original.judge, abs=1e-7)
        for got, want in ((t.ref, original.ref), (t.a, original.a), (t.b, original.b)):
            assert np.array_equal(load_pixels(got), load_pixels(want))
    write_bapps_2afc(back, second)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


def test_bapps_2afc_without_our_index_reads_like_the_authors(triplets, tmp_path):
    out = tmp_path / "2afc"
    write_bapps_2afc(triplets[:3], out)
    (out / "triplets.csv").unlink()
    back = read_bapps_2afc(out)
    assert [t.n for t in back] == [None] * 3 and [t.key for t in back] == [""] * 3
    assert [t.judge for t in back] == [float(np.float32(t.judge)) for t in triplets[:3]]


# ------------------------------------------------------------------------------ NIGHTS


def _write_nights_quietly(triplets, out, **kwargs) -> int:
    """write_nights with a NightsVotesWarning expected (the fixture's item 2 has 3 votes)."""
    with pytest.warns(NightsVotesWarning):
        return write_nights(triplets, out, **kwargs)


def test_nights_export_loads_with_the_authors_loader(triplets, tmp_path):
    out = tmp_path / "nights"
    # min_votes=1 writes every triplet with its true count, and says which DreamSim won't see
    with pytest.warns(NightsVotesWarning, match="1 of 10 written triplets have fewer than 6 "
                      "votes.*reads only 9"):
        assert write_nights(triplets, out, min_votes=1) == len(triplets)
    header = next(csv.reader((out / "data.csv").open()))
    assert header == NIGHTS_COLUMNS
    dataset = nights.TwoAFCDataset(str(out), split="test", preprocess="SSIM")
    kept = [i for i, t in enumerate(triplets) if t.n >= 6]  # their unanimity filter: votes >= 6
    assert len(dataset) == len(kept) == len(triplets) - 1
    for row, i in enumerate(kept):
        img_ref, img_left, img_right, p, item_id = dataset[row]
        assert int(item_id) == i
        t = triplets[i]
        assert p == np.float32(t.n_b / t.n) and p.dtype == np.float32
        for tensor, source in ((img_ref, t.ref), (img_left, t.a), (img_right, t.b)):
            assert np.array_equal(_pixels_of(tensor), load_pixels(source))
    # their default preprocessing (bicubic resize to 224) reads the same files
    img_ref, *_ = nights.TwoAFCDataset(str(out), split="test")[0]
    assert img_ref.shape == (3, 224, 224)
    # our reader with their filter selects the same items; without it, every item
    assert [t.name for t in read_nights(out, split="test", min_votes=6)] == [str(i) for i in kept]
    back = read_nights(out)
    assert [(t.key, t.n, t.n_b) for t in back] == [(t.key, t.n, t.n_b) for t in triplets]
    # their ImageNet subsets follow is_imagenet
    imagenet = nights.TwoAFCDataset(str(out), split="test_imagenet", preprocess="SSIM")
    assert sorted(int(imagenet[k][4]) for k in range(len(imagenet))) == [0, 1]
    assert [t.name for t in read_nights(out, split="test_imagenet", min_votes=6)] == ["0", "1"]
    assert len(read_nights(out, split="test_no_imagenet")) == len(triplets) - 3
    assert read_nights(out, split="train") == []


def test_nights_csv_is_what_readers_of_the_released_file_expect(triplets, tmp_path):
    """The by-name uses of NIGHTS' data.csv in public code (cited in tests/oracles/nights.py),
    checked on our file: the names, the text of unanimous votes, a boolean is_imagenet."""
    triplets = [replace(t, prompt=f"An image of a photo {i}") for i, t in enumerate(triplets)]
    out = tmp_path / "nights"
    _write_nights_quietly(triplets, out, min_votes=1)
    rows = list(csv.DictReader((out / "data.csv").open(newline="")))
    # UniIR (csv.DictReader) takes right_vote "0" as "left chosen", "1" as "right chosen"
    # and refuses any other text: unanimous items must be written exactly so
    unanimous = [(r, t) for r, t in zip(rows, triplets, strict=True) if t.n_b in (0, t.n)]
    assert len(unanimous) == 2  # item 4 (8 of 8 chose B) and item 5 (0 of 8)
    for row, t in unanimous:
        assert row["right_vote"] == ("1" if t.n_b == t.n else "0")
        assert row["left_vote"] == ("0" if t.n_b == t.n else "1")
    for row, t in zip(rows, triplets, strict=True):  # split votes: the exact fraction
        assert float(row["right_vote"]) == t.n_b / t.n
        assert float(row["left_vote"]) + float(row["right_vote"]) == 1.0
        assert row["prompt"] == t.prompt
    # Mantis and naturalcogsci (pandas): every name there, is_imagenet a boolean column
    frame = pd.read_csv(out / "data.csv")
    for name in ("id", "ref_path", "left_path", "right_path", "left_vote", "right_vote",
                 "votes", "split", "is_imagenet", "prompt"):
        assert name in frame.columns, name
    assert frame["is_imagenet"].dtype == bool
    assert frame["votes"].dtype.kind == "i"
    test_no_imagenet = frame[(frame.votes >= 6) & (~frame.is_imagenet) & (frame.split == "test")]
    assert test_no_imagenet["id"].tolist() == [i for i, t in enumerate(triplets)
                                              if t.n >= 6 and not t.is_imagenet]
    # the layout of the released files: ref/XXX/YYY.png, distort/XXX/YYY_{0,1}.png
    assert rows[3]["ref_path"] == "ref/000/003.png"
    assert (rows[3]["left_path"], rows[3]["right_path"]) == ("distort/000/003_0.png",
                                                            "distort/000/003_1.png")
    assert [t.prompt for t in read_nights(out)] == [t.prompt for t in triplets]


def test_nights_unanimous_votes_load_as_integers_in_the_authors_loader(triplets, tmp_path):
    # a file where every item is unanimous (as the released 20k): pandas reads right_vote as
    # integers; their loader still returns a float32 target
    unanimous = [replace(t, judge=float(i % 2), n=8) for i, t in enumerate(triplets[:4])]
    out = tmp_path / "nights"
    write_nights(unanimous, out)
    assert pd.read_csv(out / "data.csv")["right_vote"].dtype.kind == "i"
    dataset = nights.TwoAFCDataset(str(out), split="test", preprocess="SSIM")
    got = [dataset[k][3] for k in range(len(dataset))]
    assert [float(p) for p in got] == [0.0, 1.0, 0.0, 1.0]
    assert all(p.dtype == np.float32 for p in got)


def test_nights_export_with_fewer_than_6_votes_is_refused_unless_min_votes_says_what(
        triplets, tmp_path):
    """DreamSim's loader drops rows with votes < 6: never a silently empty (or thinned) file."""
    assert NIGHTS_MIN_VOTES == 6
    # some below 6: refused by default, with the count, the fewest and the way out
    with pytest.raises(ReleaseFormatError, match=r"1 of 10 triplets have fewer than 6 votes "
                       r"\(fewest: 3\).*votes >= 6.*silently leave them out.*min_votes"):
        write_nights(triplets, tmp_path / "a")
    # all below 6 (K = 3 judgments each): their loader would load nothing
    few = [replace(t, judge=round(t.judge * 3) / 3, n=3) for t in triplets]
    with pytest.raises(ReleaseFormatError, match="10 of 10 triplets.*load an empty dataset"):
        write_nights(few, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sources"]  # nothing written

    # min_votes=6 keeps DreamSim's semantics: only what their loader reads, all of it read
    with pytest.warns(NightsVotesWarning, match="min_votes = 6: 1 of 10 triplets have fewer "
                      "votes and are left out"):
        assert write_nights(triplets, tmp_path / "c", min_votes=6) == 9
    dataset = nights.TwoAFCDataset(str(tmp_path / "c"), split="test", preprocess="SSIM")
    assert len(dataset) == 9
    keys = [r["key"] for r in csv.DictReader((tmp_path / "c" / "triplets.csv").open())]
    assert keys == [t.key for t in triplets if t.n >= 6]

    # K = 3 with min_votes=3: written with the true count; the warning says DreamSim sees none
    with pytest.warns(NightsVotesWarning, match="10 of 10 written triplets have fewer than 6 "
                      "votes.*loads none of them.*votes >= 3"):
        assert write_nights(few, tmp_path / "d", min_votes=3) == 10
    assert len(nights.TwoAFCDataset(str(tmp_path / "d"), split="test")) == 0
    assert [t.n for t in read_nights(tmp_path / "d", min_votes=3)] == [3] * 10
    assert set(pd.read_csv(tmp_path / "d" / "data.csv")["votes"]) == {3}  # never inflated

    # bad min_votes, or one that leaves nothing: refused, nothing written
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ReleaseFormatError, match="min_votes must be a whole number"):
            write_nights(triplets, tmp_path / "e", min_votes=bad)
    with pytest.raises(ReleaseFormatError, match=r"no triplet has at least min_votes = 10 "
                       r"votes \(most: 9\)"):
        write_nights(triplets, tmp_path / "e", min_votes=10)
    assert not (tmp_path / "e").exists()
    # with every triplet at 6 or more, min_votes=6 and the default write the same files, quietly
    enough = [t for t in triplets if t.n >= 6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_nights(enough, tmp_path / "f")
        write_nights(enough, tmp_path / "g", min_votes=6)
    for name in ("data.csv", "triplets.csv"):
        assert (tmp_path / "f" / name).read_bytes() == (tmp_path / "g" / name).read_bytes()


def test_nights_reads_files_without_prompt(triplets, tmp_path):
    # our exports before the prompt column: read as before, prompt empty
    out = tmp_path / "nights"
    write_nights(triplets[:2], out)
    _rewrite_csv(out / "data.csv", lambda rows: [r[:-1] for r in rows])
    assert [t.prompt for t in read_nights(out)] == ["", ""]
    assert len(nights.TwoAFCDataset(str(out), split="test")) == 2


def test_nights_score_equals_the_authors(triplets, tmp_path):
    out = tmp_path / "nights"
    _write_nights_quietly(triplets, out, min_votes=6)
    dataset = nights.TwoAFCDataset(str(out), split="test", preprocess="SSIM")
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False)
    theirs = nights.score_nights_dataset(lambda a, b: l2_distance(a.double(), b.double()),
                                         loader, "cpu")
    ours, _ = score_triplets(read_nights(out, split="test"), our_l2)
    assert ours == pytest.approx(float(theirs), abs=1e-6)
    assert 0.0 < ours < 1.0


def test_nights_to_bapps_and_back_keeps_every_record(triplets, tmp_path):
    # BAPPS has no split, is_imagenet or prompt (its split is the folder): they come back as
    # defaults
    triplets = [replace(t, is_imagenet=False) for t in triplets]
    _write_nights_quietly(triplets, tmp_path / "nights", min_votes=1)
    write_bapps_2afc(read_nights(tmp_path / "nights"), tmp_path / "bapps")
    _write_nights_quietly(read_bapps_2afc(tmp_path / "bapps"), tmp_path / "again", min_votes=1)
    assert (tmp_path / "nights" / "data.csv").read_bytes() == \
        (tmp_path / "again" / "data.csv").read_bytes()
    assert (tmp_path / "nights" / "triplets.csv").read_bytes() == \
        (tmp_path / "again" / "triplets.csv").read_bytes()


# ------------------------------------------------------------------------------ score


def test_bapps_2afc_score_definition():
    # d_b < d_a → judge; d_a < d_b → 1 − judge; tie → ½ (Zhang et al. 2018)
    score, per = bapps_2afc_score([2.0, 1.0, 3.0], [1.0, 2.0, 3.0], [0.75, 0.75, 0.2])
    assert per.tolist() == [0.75, 0.25, 0.5] and score == pytest.approx(0.5)
    with pytest.raises(ReleaseFormatError, match="equal, non-empty"):
        bapps_2afc_score([1.0], [1.0, 2.0], [0.5])


# ------------------------------------------------------------------------------ errors


def _left_behind(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def _write_nights_any_votes(triplets, out) -> int:
    return write_nights(triplets, out, min_votes=1)


@pytest.mark.filterwarnings("ignore::engine.release_formats.NightsVotesWarning")
@pytest.mark.parametrize("writer", [write_bapps_2afc, write_nights, _write_nights_any_votes])
def test_writers_refuse_bad_records_and_leave_nothing(triplets, tmp_path, writer):
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "out"
    t = triplets[0]
    small = np.zeros((8, 8, 3), np.uint8)
    cases = [
        ([], "no triplets"),
        ([Triplet(t.ref, t.a, t.b, judge=1.5, n=8)], "judge must be a fraction"),
        ([Triplet(t.ref, t.a, t.b, judge=float("nan"), n=8)], "judge must be a fraction"),
        ([Triplet(t.ref, t.a, t.b, judge=0.4, n=3)], "not a count out of n = 3"),
        ([Triplet(t.ref, t.a, t.b, judge=0.5, n=0)], "positive integer"),
        ([triplets[1], Triplet(t.ref, small, t.b, judge=0.5, n=8)], "same size"),
        ([triplets[1], Triplet(t.ref, tmp_path / "nope.png", t.b, judge=0.5, n=8)],
         "does not exist"),
        ([Triplet(t.ref, t.a.astype(np.float32), t.b, judge=0.5, n=8)], "uint8"),
        ([Triplet(t.ref, t.a, t.b, judge=0.5, n=8, prompt="two\nlines")],
         "prompt must be one line"),
    ]
    for records, message in cases:
        with pytest.raises(ReleaseFormatError, match=message):
            writer(records, out)
        assert _left_behind(parent) == [], message
    out.mkdir()
    (out / "x").write_text("taken")
    with pytest.raises(ReleaseFormatError, match="not an empty folder"):
        writer([t for t in triplets if t.n >= 6], out)
    assert _left_behind(parent) == ["out"] and _left_behind(out) == ["x"]


def test_nights_writer_needs_vote_counts_and_a_split(triplets, tmp_path):
    t = triplets[0]
    with pytest.raises(ReleaseFormatError, match="number of votes"):
        write_nights([Triplet(t.ref, t.a, t.b, judge=0.5)], tmp_path / "a")
    with pytest.raises(ReleaseFormatError, match="split must be"):
        write_nights([Triplet(t.ref, t.a, t.b, judge=0.5, n=2, split="dev")], tmp_path / "b")
    assert _left_behind(tmp_path) == ["sources"]


def test_bapps_reader_refuses_malformed_folders(triplets, tmp_path):
    out = tmp_path / "2afc"
    with pytest.raises(ReleaseFormatError, match="is not a folder"):
        read_bapps_2afc(out)
    write_bapps_2afc(triplets[:3], out)
    (out / "p1" / "000001.png").unlink()
    with pytest.raises(ReleaseFormatError, match="'000001' has no file in p1/"):
        read_bapps_2afc(out)
    write_bapps_2afc(triplets[:3], tmp_path / "b")
    np.save(tmp_path / "b" / "judge" / "000002.npy", np.array([0.5, 0.5], np.float32))
    with pytest.raises(ReleaseFormatError, match="must hold one number"):
        read_bapps_2afc(tmp_path / "b")
    np.save(tmp_path / "b" / "judge" / "000002.npy", np.array([1.5], np.float32))
    with pytest.raises(ReleaseFormatError, match="not a fraction"):
        read_bapps_2afc(tmp_path / "b")
    np.save(tmp_path / "b" / "judge" / "000002.npy", np.array([0.9], np.float32))
    with pytest.raises(ReleaseFormatError, match="disagrees with the index"):
        read_bapps_2afc(tmp_path / "b")
    write_bapps_2afc(triplets[:3], tmp_path / "c")
    lines = (tmp_path / "c" / "triplets.csv").read_text().splitlines()
    (tmp_path / "c" / "triplets.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ReleaseFormatError, match="does not list the folder's items"):
        read_bapps_2afc(tmp_path / "c")
    (tmp_path / "d" / "ref").mkdir(parents=True)
    with pytest.raises(ReleaseFormatError, match="no p0/, p1/, judge/"):
        read_bapps_2afc(tmp_path / "d")


def _rewrite_csv(path: Path, edit) -> None:
    rows = list(csv.reader(path.open()))
    rows = edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [r[:3] + r[4:] for r in rows], r"columns \['votes'\] are missing"),
    (lambda rows: [rows[0], rows[1][:4] + ["../outside.png"] + rows[1][5:]],
     "must be relative, inside the folder"),
    (lambda rows: [rows[0], rows[1][:4] + ["ref/000/999.png"] + rows[1][5:]],
     "ref/000/999.png is missing"),
    (lambda rows: [rows[0], rows[1][:1] + ["0.5", "0.75"] + rows[1][3:]],
     "must be fractions that sum to 1"),
    (lambda rows: [rows[0], rows[1][:3] + ["2.5"] + rows[1][4:]], "whole count"),
    (lambda rows: [rows[0], rows[1][:8] + ["maybe"]], "is_imagenet must be"),
    (lambda rows: [rows[0], rows[1], rows[1]], "ids are not unique"),
])
def test_nights_reader_refuses_malformed_csv(triplets, tmp_path, edit, message):
    out = tmp_path / "nights"
    write_nights(triplets[:1], out)
    (out / "triplets.csv").unlink()
    _rewrite_csv(out / "data.csv", edit)
    with pytest.raises(ReleaseFormatError, match=message):
        read_nights(out)


def test_nights_reader_checks_folder_split_and_index(triplets, tmp_path):
    with pytest.raises(ReleaseFormatError, match="data.csv is missing"):
        read_nights(tmp_path)
    out = tmp_path / "nights"
    write_nights(triplets[:2], out)
    with pytest.raises(ReleaseFormatError, match="split must be one of"):
        read_nights(out, split="dev")
    _rewrite_csv(out / "triplets.csv", lambda rows: [rows[0], rows[1][:2] + ["7", "5"],
                                                      rows[2]])
    with pytest.raises(ReleaseFormatError, match="has 8 votes but the index says 7"):
        read_nights(out)
