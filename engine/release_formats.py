"""Folder layouts of published 2AFC similarity datasets, read and written: BAPPS 2AFC and NIGHTS.

A 2AFC item is a *triplet*: a reference and two alternatives, A and B; people chose which
alternative looks more like the reference. ``judge`` is the fraction of judgments that chose
**B** (in ``[0, 1]``), the convention of both layouts.

BAPPS 2AFC (Zhang et al., CVPR 2018; the PerceptualSimilarity repository's ``TwoAFCDataset``
and ``score_2afc_dataset``)::

    OUT/ref/NNNNNN.png   reference
    OUT/p0/NNNNNN.png    A (the authors' "left patch p0")
    OUT/p1/NNNNNN.png    B (the "right patch p1")
    OUT/judge/NNNNNN.npy float32 [judge]: fraction of people who preferred p1
    OUT/triplets.csv     ours: index, key, n_judgments, n_b (the loaders ignore it)

The authors' loader pairs the four folders by *sorted position*, so the names must be the same
in every folder (zero-padded indices here); :func:`read_bapps_2afc` pairs by name and refuses a
folder where they differ rather than mispairing silently. Checked on 2026-12-02 against
richzhang/PerceptualSimilarity @ 082bb24f (``data/dataset/twoafc_dataset.py``,
``data/image_folder.py``, ``lpips/trainer.py``): folder names ``ref``/``p0``/``p1``/``judge``,
images ``.jpg .jpeg .png .ppm .bmp`` (either case), judges ``.npy`` holding one value that
``score_2afc_dataset`` documents as the fraction preferring p1 — as written here. DreamSim's
BAPPS reader (ssundaram21/dreamsim ``evaluation/eval_datasets.py``) opens ``<judge stem>.png``
in ref/, p0/ and p1/, so images are always written as PNG.

NIGHTS (Fu et al., NeurIPS 2023, DreamSim; the DreamSim repository's ``TwoAFCDataset`` and
``score_nights_dataset``)::

    OUT/ref/XXX/YYY.png        reference (item i: XXX = i // 1000, YYY = i % 1000)
    OUT/distort/XXX/YYY_0.png  A, shown on the left
    OUT/distort/XXX/YYY_1.png  B, shown on the right
    OUT/data.csv               id,left_vote,right_vote,votes,ref_path,left_path,right_path,
                               split,is_imagenet,prompt
    OUT/triplets.csv           ours, as above

What each column is, and where that comes from (read 2026-12-02):

- github.com/ssundaram21/dreamsim @ db4d16c6 ``dataset/dataset.py`` (``TwoAFCDataset``): reads
  ``data.csv`` with pandas, keeps rows with ``votes >= 6``, then the split (``train``, ``val``,
  ``test``; ``test_imagenet``/``test_no_imagenet`` = ``split == "test"`` and ``is_imagenet``
  ``== True``/``False``), and reads the rest by *position*: 0 = id, 2 = p (the target),
  4/5/6 = reference/left/right path. ``training/train.py`` counts ``p >= 0.5`` as "the right
  image is closer" (``dist_1 < dist_0``), so p is the fraction that chose the **right** image.
  ``dataset/README.md`` gives the ref/XXX/YYY.png, distort/XXX/YYY_{0,1}.png layout. (Its
  first release, 077b5571 of 2023-06-15, had no plain ``test`` split; the two ImageNet splits
  work in both.)
- The names, beyond ``votes``/``split``/``is_imagenet``, come from readers of the released
  file by name: TIGER-AI-Lab/UniIR @ 669475c4 ``src/data/preprocessing/
  nights_data_preprocessor.py`` (``csv.DictReader``: ``id``, ``ref_path``, ``left_path``,
  ``right_path``, ``split``, ``is_imagenet``, and ``right_vote`` compared with the *text*
  ``"0"``/``"1"``, refusing anything else); TIGER-AI-Lab/Mantis @ 44d20bf6
  ``data/dream_sim/prepare.py`` (pandas: ``ref_path``, ``left_path``, ``right_path``,
  ``left_vote``, ``right_vote``, ``prompt``, ``split``); candemircan/naturalcogsci @ 57397385
  ``bin/analyse_nights.py`` (pandas: ``votes >= 6``, ``~is_imagenet`` — a boolean column —,
  ``split``, the three paths, ``left_vote == 1``). Positions 1 and 3 are read by no code we
  found (by-name readers do not care), so ``left_vote`` at 1 and ``votes`` at 3 are an
  assumption, not checked against the released file. ``prompt`` (NIGHTS: the Stable Diffusion
  prompt, "An image of a <category>"; Mantis' reader fails without it) goes last, so no
  position the authors read moves; it is empty where unknown.

Values: ``left_vote``/``right_vote`` are the fractions of votes for the left (A) and right (B)
image, written ``0``/``1`` when unanimous (as the released file: UniIR's reader compares the
text) and ``repr(float)`` otherwise; ``votes`` is the true number of judgments; ``is_imagenet``
is ``True``/``False`` (pandas reads a boolean column).

Fewer than 6 votes. DreamSim's loader drops every row with ``votes < 6`` (their unanimity
filter), so a study with fewer judgments per triplet would load as an *empty* dataset, with no
error. :func:`write_nights` therefore refuses triplets with fewer than
:data:`NIGHTS_MIN_VOTES` votes unless ``min_votes`` is chosen: ``min_votes=6`` writes only the
triplets DreamSim's loader keeps; a smaller value writes every triplet with at least that many
votes, with its true count, and warns (:class:`NightsVotesWarning`) that DreamSim's loader, as
published, will not see those below 6 (read them with ``read_nights(min_votes=…)`` or filter
``votes >= K`` yourself). We never write an inflated vote count.

Images are PNG, lossless: a PNG source file is copied byte for byte, any other source (or an
array) is written from its decoded 8-bit RGB pixels. Writers stage into a hidden sibling folder
and rename it into place at the end, so an error leaves nothing behind. This module is pure
(numpy, Pillow, csv); Django's ``studyapp.releases`` maps studies onto these records.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from engine.protocol_analysis import bapps_item_scores

from .errors import EngineError

__all__ = [
    "INDEX_COLUMNS",
    "NIGHTS_COLUMNS",
    "NIGHTS_MIN_VOTES",
    "NightsVotesWarning",
    "ReleaseFormatError",
    "Triplet",
    "bapps_2afc_score",
    "load_pixels",
    "read_bapps_2afc",
    "read_nights",
    "score_triplets",
    "write_bapps_2afc",
    "write_nights",
]

ImageSource = Path | str | np.ndarray

#: Our index next to either layout (one row per item, in item order).
INDEX_COLUMNS = ["index", "key", "n_judgments", "n_b"]
#: NIGHTS ``data.csv`` columns, in the order the authors' loader reads by position (0, 2,
#: 4-6); ``prompt`` last, and optional when reading (our exports before it had none).
NIGHTS_COLUMNS = ["id", "left_vote", "right_vote", "votes", "ref_path", "left_path",
                  "right_path", "split", "is_imagenet", "prompt"]
_NIGHTS_REQUIRED = NIGHTS_COLUMNS[:-1]
#: DreamSim's ``TwoAFCDataset`` keeps rows with ``votes >= 6`` (dataset/dataset.py).
NIGHTS_MIN_VOTES = 6
NIGHTS_SPLITS = ("train", "val", "test", "test_imagenet", "test_no_imagenet")
#: Extensions the authors' ``make_dataset`` accepts as images (PerceptualSimilarity).
BAPPS_IMAGE_EXTENSIONS = (".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG", ".ppm", ".PPM",
                          ".bmp", ".BMP")
#: A judge stored as float32 differs from n_b / n by at most half a float32 ulp near 1.
JUDGE_TOLERANCE = 1e-6
_PROGRESS_MIN = 500  # items; smaller folders write in well under a few seconds


class ReleaseFormatError(EngineError):
    """A folder that does not follow the layout, or records that cannot be written to it."""


class NightsVotesWarning(UserWarning):
    """A NIGHTS export holds triplets DreamSim's loader will not read (``votes < 6``), or
    ``min_votes`` left triplets out."""


@dataclass(frozen=True)
class Triplet:
    """One 2AFC item.

    ``ref``, ``a``, ``b``: image files (paths) or ``[H, W, 3]`` uint8 arrays; A is BAPPS ``p0`` /
    NIGHTS left, B is ``p1`` / right. ``judge``: fraction of judgments that chose B, ``[0, 1]``.
    ``n``: number of judgments (``None`` where the layout does not store it: BAPPS without our
    index). ``key``: our stable item key (empty if unknown). ``name``: the item's index in its
    folder (BAPPS file stem, NIGHTS ``id``). ``split``/``is_imagenet``/``prompt``: NIGHTS
    columns (``prompt``: the text the images were generated from; empty if unknown).
    """

    ref: ImageSource
    a: ImageSource
    b: ImageSource
    judge: float
    n: int | None = None
    key: str = ""
    name: str = ""
    split: str = "test"
    is_imagenet: bool = False
    prompt: str = ""

    @property
    def n_b(self) -> int | None:
        """Judgments that chose B (``round(judge · n)``); ``None`` without ``n``."""
        return None if self.n is None else round(self.judge * self.n)


# ------------------------------------------------------------------------------ images


def load_pixels(source: ImageSource) -> np.ndarray:
    """An image file or array as ``[H, W, 3]`` uint8 RGB (what the authors' loaders decode).

    Files are converted with Pillow's ``convert('RGB')``, exactly as both authors' loaders do;
    arrays must already be ``[H, W, 3]`` uint8.
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ReleaseFormatError(
                f"an image array must be [H, W, 3] uint8, got {source.dtype} {source.shape}")
        return source
    path = Path(source)
    if not path.is_file():
        raise ReleaseFormatError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ReleaseFormatError(
            f"{path} is not a readable image ({type(exc).__name__}: {exc})") from exc


def _store_png(source: ImageSource, target: Path) -> tuple[int, int]:
    """Write ``source`` to ``target`` as PNG; returns (height, width). PNG files are copied."""
    if not isinstance(source, np.ndarray):
        path = Path(source)
        if not path.is_file():
            raise ReleaseFormatError(f"image {path} does not exist")
        try:
            with Image.open(path) as img:
                fmt, mode, (width, height) = img.format, img.mode, img.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ReleaseFormatError(
                f"{path} is not a readable image ({type(exc).__name__}: {exc})") from exc
        if fmt == "PNG" and mode == "RGB":
            shutil.copyfile(path, target)
            return height, width
    pixels = load_pixels(source)
    Image.fromarray(pixels, mode="RGB").save(target, format="PNG")
    return pixels.shape[0], pixels.shape[1]


# ------------------------------------------------------------------------------ validation


def _check_triplet(i: int, t: Triplet) -> None:
    label = f"triplet {i}" + (f" ({t.key})" if t.key else "")
    judge = float(t.judge)
    if not math.isfinite(judge) or not 0.0 <= judge <= 1.0:
        raise ReleaseFormatError(f"{label}: judge must be a fraction in [0, 1], got {t.judge!r}")
    if t.n is not None:
        if int(t.n) != t.n or t.n < 1:
            raise ReleaseFormatError(f"{label}: n (judgments) must be a positive integer, "
                                     f"got {t.n!r}")
        if abs(judge * t.n - round(judge * t.n)) > JUDGE_TOLERANCE * t.n:
            raise ReleaseFormatError(f"{label}: judge {judge!r} is not a count out of "
                                     f"n = {t.n} judgments")
    for field in ("key", "prompt"):
        text = getattr(t, field)
        if "\n" in text or "\r" in text:
            raise ReleaseFormatError(f"{label}: {field} must be one line")


def _staging(out: Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseFormatError(f"{out} exists and is not an empty folder; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _finish(staging: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty (checked by _staging); rename needs the name free
    os.replace(staging, out)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _index_rows(triplets: Sequence[Triplet], names: list[str]) -> list[list]:
    return [[name, t.key, "" if t.n is None else int(t.n), "" if t.n is None else t.n_b]
            for name, t in zip(names, triplets, strict=True)]


def _same_size(label: str, sizes: list[tuple[int, int]]) -> None:
    if len(set(sizes)) != 1:
        raise ReleaseFormatError(f"{label}: reference, A and B must have the same size, got "
                                 + ", ".join(f"{h}×{w}" for h, w in sizes))


def _progress(items, desc: str):
    return tqdm(items, desc=desc, unit="triplet", disable=len(items) < _PROGRESS_MIN)


# ------------------------------------------------------------------------------ BAPPS 2AFC


def write_bapps_2afc(triplets: Sequence[Triplet], out: Path) -> int:
    """Write ``triplets`` in the BAPPS 2AFC layout at ``out`` (new or empty); returns the count.

    Items are named ``000000``, ``000001`` ... in the given order; ``triplets.csv`` keeps each
    item's key and counts. Nothing is left at ``out`` on any error.
    """
    triplets = list(triplets)
    if not triplets:
        raise ReleaseFormatError("no triplets to write")
    for i, t in enumerate(triplets):
        _check_triplet(i, t)
    out = Path(out)
    staging = _staging(out)
    try:
        for sub in ("ref", "p0", "p1", "judge"):
            (staging / sub).mkdir()
        names = [f"{i:06d}" for i in range(len(triplets))]
        for name, t in zip(names, _progress(triplets, "BAPPS 2AFC"), strict=True):
            sizes = [_store_png(src, staging / sub / f"{name}.png")
                     for src, sub in ((t.ref, "ref"), (t.a, "p0"), (t.b, "p1"))]
            _same_size(f"triplet {name}" + (f" ({t.key})" if t.key else ""), sizes)
            np.save(staging / "judge" / f"{name}.npy", np.array([t.judge], dtype=np.float32))
        _write_csv(staging / "triplets.csv", INDEX_COLUMNS, _index_rows(triplets, names))
        _finish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(triplets)


def _files_by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """Files under ``folder`` (recursively, like the authors' ``make_dataset``) by relative stem."""
    found: dict[str, Path] = {}
    for root, _, fnames in sorted(os.walk(folder)):
        for fname in fnames:
            if fname.endswith(extensions):
                path = Path(root) / fname
                stem = path.relative_to(folder).with_suffix("").as_posix()
                if stem in found:
                    raise ReleaseFormatError(f"{folder}: two files for item {stem!r} "
                                             f"({found[stem].name}, {fname})")
                found[stem] = path
    return found


def _read_index(folder: Path, names: list[str]) -> dict[str, dict[str, str]]:
    path = folder / "triplets.csv"
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(INDEX_COLUMNS) - set(rows[0]):
        raise ReleaseFormatError(f"{path}: columns {sorted(set(INDEX_COLUMNS) - set(rows[0]))} "
                                 "are missing")
    by_name = {r["index"]: r for r in rows}
    if sorted(by_name) != sorted(names) or len(rows) != len(names):
        extra = sorted(set(by_name) - set(names))[:3]
        missing = sorted(set(names) - set(by_name))[:3]
        raise ReleaseFormatError(f"{path} does not list the folder's items (not in the folder:"
                                 f" {extra}; not in the index: {missing})")
    return by_name


def _apply_index(t: Triplet, row: dict[str, str] | None, where: str) -> Triplet:
    if row is None:
        return t
    try:
        n = None if row["n_judgments"] == "" else int(row["n_judgments"])
        n_b = None if row["n_b"] == "" else int(row["n_b"])
    except ValueError as exc:
        raise ReleaseFormatError(f"{where}: index row {row['index']!r} is malformed ({exc})") \
            from exc
    if (n is None) != (n_b is None) or (n is not None and not 0 <= n_b <= n):
        raise ReleaseFormatError(f"{where}: index row {row['index']!r} has n_judgments={n}, "
                                 f"n_b={n_b}")
    if t.n is not None and n != t.n:
        raise ReleaseFormatError(f"{where}: item {row['index']!r} has {t.n} votes but the "
                                 f"index says {n} judgments")
    if n is not None and abs(n_b / n - t.judge) > JUDGE_TOLERANCE:
        raise ReleaseFormatError(f"{where}: item {row['index']!r}: judge {t.judge!r} disagrees "
                                 f"with the index ({n_b} of {n} chose B)")
    return replace(t, n=n, key=row["key"])


def read_bapps_2afc(folder: Path) -> list[Triplet]:
    """Read a BAPPS 2AFC folder (ours or the authors') into triplets, in the authors' order.

    Images stay files (decode with :func:`load_pixels`); ``n`` and ``key`` come from our
    ``triplets.csv`` where present. Raises :class:`ReleaseFormatError` naming the problem for a
    missing subfolder, an item missing from one of them, or a judge that is not one fraction.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseFormatError(f"{folder} is not a folder")
    missing = [s for s in ("ref", "p0", "p1", "judge") if not (folder / s).is_dir()]
    if missing:
        raise ReleaseFormatError(f"{folder} is not a BAPPS 2AFC folder: no "
                                 + ", ".join(f"{s}/" for s in missing))
    images = {s: _files_by_stem(folder / s, BAPPS_IMAGE_EXTENSIONS) for s in ("ref", "p0", "p1")}
    judges = _files_by_stem(folder / "judge", (".npy",))
    if not judges:
        raise ReleaseFormatError(f"{folder} is not a BAPPS 2AFC folder: judge/ has no .npy")
    for sub, files in (*images.items(), ("judge", judges)):
        for other in (images["ref"], images["p0"], images["p1"], judges):
            lost = sorted(set(other) - set(files))
            if lost:
                raise ReleaseFormatError(f"{folder}: item {lost[0]!r} has no file in {sub}/"
                                         f" ({len(lost)} item(s) lack one)")
    # the authors sort every folder's full paths; with equal stems that is the stems' order
    names = sorted(judges, key=lambda s: str(judges[s]))
    index = _read_index(folder, names)
    out = []
    for name in names:
        path = judges[name]
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ReleaseFormatError(f"{path} is not a .npy array ({exc})") from exc
        if value.size != 1 or not np.issubdtype(value.dtype, np.number):
            raise ReleaseFormatError(f"{path} must hold one number (the fraction preferring "
                                     f"p1), got {value.dtype} {value.shape}")
        judge = float(value.reshape(-1)[0])
        if not math.isfinite(judge) or not 0.0 <= judge <= 1.0:
            raise ReleaseFormatError(f"{path}: judge {judge!r} is not a fraction in [0, 1]")
        t = Triplet(ref=images["ref"][name], a=images["p0"][name], b=images["p1"][name],
                    judge=judge, name=name)
        out.append(_apply_index(t, index.get(name), str(folder)))
    return out


# ------------------------------------------------------------------------------ NIGHTS


def _nights_paths(i: int) -> tuple[str, str, str]:
    group, item = f"{i // 1000:03d}", f"{i % 1000:03d}"
    return (f"ref/{group}/{item}.png", f"distort/{group}/{item}_0.png",
            f"distort/{group}/{item}_1.png")


def _vote_text(fraction: float) -> str:
    """A vote fraction as NIGHTS writes it: ``0``/``1`` when unanimous, else ``repr``."""
    return "0" if fraction == 0 else "1" if fraction == 1 else repr(fraction)


def _nights_selection(triplets: list[Triplet], min_votes: int | None) -> list[Triplet]:
    """The triplets to write, after the checks on vote counts (module docstring)."""
    counts = [int(t.n) for t in triplets]
    if min_votes is None:
        few = [n for n in counts if n < NIGHTS_MIN_VOTES]
        if few:
            everything = len(few) == len(counts)
            raise ReleaseFormatError(
                f"{len(few)} of {len(counts)} triplets have fewer than {NIGHTS_MIN_VOTES} votes"
                f" (fewest: {min(few)}); DreamSim's TwoAFCDataset keeps only rows with votes"
                f" >= {NIGHTS_MIN_VOTES}, so it would "
                + ("load an empty dataset" if everything else "silently leave them out")
                + f". Choose min_votes (--min-votes): {NIGHTS_MIN_VOTES} writes only the"
                " triplets DreamSim's loader keeps; a smaller value writes every triplet with at"
                " least that many votes, with its true count, which DreamSim's loader as"
                f" published does not read below {NIGHTS_MIN_VOTES} (filter votes >= K"
                " yourself)")
        return triplets
    if isinstance(min_votes, bool) or int(min_votes) != min_votes or min_votes < 1:
        raise ReleaseFormatError(f"min_votes must be a whole number of votes ≥ 1, got "
                                 f"{min_votes!r}")
    kept = [t for t, n in zip(triplets, counts, strict=True) if n >= min_votes]
    if not kept:
        raise ReleaseFormatError(f"no triplet has at least min_votes = {min_votes} votes "
                                 f"(most: {max(counts)}); nothing to write")
    if len(kept) < len(triplets):
        warnings.warn(NightsVotesWarning(
            f"min_votes = {min_votes}: {len(triplets) - len(kept)} of {len(triplets)} triplets"
            f" have fewer votes and are left out"), stacklevel=3)
    below = sum(1 for t in kept if t.n < NIGHTS_MIN_VOTES)
    if below:
        warnings.warn(NightsVotesWarning(
            f"{below} of {len(kept)} written triplets have fewer than {NIGHTS_MIN_VOTES} votes"
            f" (min_votes = {min_votes}); DreamSim's TwoAFCDataset drops rows with votes <"
            f" {NIGHTS_MIN_VOTES}, so it "
            + ("loads none of them" if below == len(kept) else f"reads only {len(kept) - below}")
            + f"; filter votes >= {min_votes} yourself (read_nights(min_votes=...), "
            f"import_dataset --nights --min-votes {min_votes})"), stacklevel=3)
    return kept


def write_nights(triplets: Sequence[Triplet], out: Path, *,
                 min_votes: int | None = None) -> int:
    """Write ``triplets`` in the NIGHTS layout at ``out`` (new or empty); returns the count.

    Every triplet needs ``n`` (NIGHTS stores the vote count); ``split`` must be train, val or
    test. ``min_votes`` (votes): ``None`` refuses any triplet with fewer than
    :data:`NIGHTS_MIN_VOTES` (DreamSim's loader would drop it without a word); a number keeps
    the triplets with at least that many votes and warns (:class:`NightsVotesWarning`) about
    those left out and those DreamSim's loader will not read. Written items get ``id`` 0, 1, …
    in the given order. Nothing is left at ``out`` on any error.
    """
    triplets = list(triplets)
    if not triplets:
        raise ReleaseFormatError("no triplets to write")
    for i, t in enumerate(triplets):
        _check_triplet(i, t)
        if t.n is None:
            raise ReleaseFormatError(f"triplet {i} ({t.key or 'no key'}): NIGHTS stores the "
                                     "number of votes; n is unknown")
        if t.split not in ("train", "val", "test"):
            raise ReleaseFormatError(f"triplet {i}: split must be train, val or test, got "
                                     f"{t.split!r}")
    triplets = _nights_selection(triplets, min_votes)
    out = Path(out)
    staging = _staging(out)
    try:
        rows = []
        for i, t in enumerate(_progress(triplets, "NIGHTS")):
            paths = _nights_paths(i)
            for rel in paths:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            sizes = [_store_png(src, staging / rel)
                     for src, rel in zip((t.ref, t.a, t.b), paths, strict=True)]
            _same_size(f"triplet {i}" + (f" ({t.key})" if t.key else ""), sizes)
            n, n_b = int(t.n), t.n_b  # fractions from the counts: left + right is exactly 1
            rows.append([i, _vote_text((n - n_b) / n), _vote_text(n_b / n), n, *paths, t.split,
                         "True" if t.is_imagenet else "False", t.prompt])
        _write_csv(staging / "data.csv", NIGHTS_COLUMNS, rows)
        _write_csv(staging / "triplets.csv", INDEX_COLUMNS,
                   _index_rows(triplets, [str(i) for i in range(len(triplets))]))
        _finish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(triplets)


def _inside(folder: Path, rel: str, where: str) -> Path:
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ReleaseFormatError(f"{where}: path {rel!r} must be relative, inside the folder")
    path = folder / rel
    if not path.is_file():
        raise ReleaseFormatError(f"{where}: {rel} is missing")
    return path


def _parse_bool(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    raise ReleaseFormatError(f"{where}: is_imagenet must be True or False, got {text!r}")


def read_nights(folder: Path, *, split: str | None = None, min_votes: int = 0) -> list[Triplet]:
    """Read a NIGHTS folder (ours or the authors') into triplets, in ``data.csv`` order.

    ``split``: keep one split as the authors' loader does (train, val, test, test_imagenet,
    test_no_imagenet); ``None`` keeps all. ``min_votes``: keep items with at least this many
    votes (the authors' loader uses 6). Columns are read by name and checked: fractions in
    ``[0, 1]`` that sum to one, an integer vote count, paths inside the folder that exist;
    ``prompt`` may be absent (empty then).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseFormatError(f"{folder} is not a folder")
    table = folder / "data.csv"
    if not table.is_file():
        raise ReleaseFormatError(f"{folder} is not a NIGHTS folder: data.csv is missing")
    if split is not None and split not in NIGHTS_SPLITS:
        raise ReleaseFormatError(f"split must be one of {', '.join(NIGHTS_SPLITS)}; got "
                                 f"{split!r}")
    with table.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    lost = [c for c in _NIGHTS_REQUIRED if c not in header]
    if lost:
        raise ReleaseFormatError(f"{table}: columns {lost} are missing (NIGHTS has "
                                 f"{', '.join(NIGHTS_COLUMNS)})")
    names = [r["id"] for r in rows]
    if len(set(names)) != len(names):
        raise ReleaseFormatError(f"{table}: ids are not unique")
    index = _read_index(folder, names)
    out = []
    for line, row in enumerate(rows, start=2):
        where = f"{table} line {line}"
        try:
            left, right = float(row["left_vote"]), float(row["right_vote"])
            votes = float(row["votes"])
        except ValueError as exc:
            raise ReleaseFormatError(f"{where}: votes are not numbers ({exc})") from exc
        if not (math.isfinite(right) and 0.0 <= right <= 1.0 and math.isfinite(left)
                and abs(left + right - 1.0) <= JUDGE_TOLERANCE):
            raise ReleaseFormatError(f"{where}: left_vote {row['left_vote']} and right_vote "
                                     f"{row['right_vote']} must be fractions that sum to 1")
        if not votes.is_integer() or votes < 0:
            raise ReleaseFormatError(f"{where}: votes must be a whole count, got "
                                     f"{row['votes']!r}")
        is_imagenet = _parse_bool(row["is_imagenet"], where)
        if votes < min_votes:
            continue
        if split in ("train", "val", "test") and row["split"] != split:
            continue
        if split in ("test_imagenet", "test_no_imagenet") and (
                row["split"] != "test" or is_imagenet != (split == "test_imagenet")):
            continue
        t = Triplet(ref=_inside(folder, row["ref_path"], where),
                    a=_inside(folder, row["left_path"], where),
                    b=_inside(folder, row["right_path"], where),
                    judge=right, n=int(votes) if votes >= 1 else None, name=row["id"],
                    split=row["split"], is_imagenet=is_imagenet,
                    prompt=row.get("prompt") or "")
        out.append(_apply_index(t, index.get(row["id"]), str(folder)))
    return out


# ------------------------------------------------------------------------------ scoring


def bapps_2afc_score(d_a: Sequence[float] | np.ndarray, d_b: Sequence[float] | np.ndarray,
                     judge: Sequence[float] | np.ndarray) -> tuple[float, np.ndarray]:
    """The BAPPS 2AFC score of a distance: mean agreement with people, and per item.

    Per item: ``judge`` (fraction choosing B) when the distance says B is closer to the
    reference (``d_b < d_a``), ``1 − judge`` when it says A, ½ on a tie — Zhang et al. (2018),
    also DreamSim's NIGHTS score. Distances: larger = more different (for a similarity such as
    SSIM pass ``1 − ssim``).
    """
    a, b, j = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (d_a, d_b, judge))
    if not (a.shape == b.shape == j.shape) or a.size == 0:
        raise ReleaseFormatError(f"d_a, d_b and judge must be equal, non-empty lengths; got "
                                 f"{a.size}, {b.size}, {j.size}")
    scores = bapps_item_scores(a, b, j)  # the one definition, in engine.protocol_analysis
    return float(np.mean(scores)), scores


def score_triplets(triplets: Sequence[Triplet],
                   distance: Callable[[np.ndarray, np.ndarray], float]) -> tuple[float, np.ndarray]:
    """:func:`bapps_2afc_score` of ``distance(ref_pixels, other_pixels)`` over ``triplets``."""
    d_a, d_b = [], []
    for t in triplets:
        ref = load_pixels(t.ref)
        d_a.append(distance(ref, load_pixels(t.a)))
        d_b.append(distance(ref, load_pixels(t.b)))
    return bapps_2afc_score(d_a, d_b, [t.judge for t in triplets])
