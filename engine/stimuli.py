"""Stimulus sets for JND studies: natural images × conditions → lossless PNG pairs + manifest.

A *condition* is a threat model at a bound, given as an attack spec
(``linf:bound=4/255,num_iterations=10``). Each source image is attacked under each condition
against a classifier; both images are stored as 8-bit PNG (no metadata chunks) and every
distance is measured on the stored 8-bit images, i.e. on exactly what a participant sees.
*Sentinel* pairs show the same natural image twice.

The natural images have no labels a classifier trained elsewhere understands, so every attack
is untargeted away from the classifier's own prediction on the natural image (``label``);
``attack_success`` means the stored adversarial image is classified differently.

Output folder layout (all names are file-safe)::

    OUT/natural/<source>.png
    OUT/<condition-slug>/<source>.png
    OUT/manifest.json   # everything, see Manifest
    OUT/manifest.csv    # one row per pair, distances as columns

The other protocols' items (2AFC triplets, rating and label items; issue 18) are made of
these same pairs by :func:`engine.generate.protocol_items` and written in the same layout as a
version 3 manifest (:data:`PROTOCOL_FIELDS`: a triplet's copy B is another condition's PNG of
the same source, ``third_path``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import platform
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .analysis import AT_BOUND
from .attacks import parse_attack
from .attacks.spec import bound_label
from .data import SourceImage
from .distances import LPIPS, pairwise_distances
from .errors import EngineError
from .models import ImageClassifier

#: The protocols a manifest's items can be for (issue 18; studyapp.protocols shows them).
PROTOCOLS = ("jnd", "2afc", "rating", "label")
#: What a rating item shows: the pair (natural, then perturbed) or the perturbed image alone.
RATING_SHOWS = ("pair", "single")

#: 2: adds ``files`` (path → SHA-256), each condition's ``level`` and ``given`` spec, and the
#: generator's ``networks`` / ``untrained`` / ``request`` / ``code_version`` (engine.generate).
#: JND manifests are still written (and read) as version 2, byte for byte as before.
MANIFEST_VERSION = 2
#: 3: the items of the other protocols (issue 18: ``2afc``, ``rating``, ``label``): the
#: manifest's ``protocol``, ``label_set`` and ``rating_shows``, and each row's
#: :data:`PROTOCOL_FIELDS` (copy B of a 2AFC triplet, the source's class, the ladder level).
PROTOCOL_MANIFEST_VERSION = 3
MANIFEST_VERSIONS = (MANIFEST_VERSION, PROTOCOL_MANIFEST_VERSION)


@dataclass
class PairRecord:
    """One row of the manifest. Paths are relative to the output folder."""

    key: str
    source_image: str
    is_sentinel: bool
    is_catch: bool
    condition: str | None
    threat_model: str | None
    bound: float | None
    natural_path: str
    other_path: str
    width: int
    height: int
    label: int
    adversarial_label: int
    attack_success: bool | None
    #: Perturbation size in the bound's units where the attack optimised it (float image, or
    #: its flow / colour lattice / DCT coefficients), and whether that is within the bound.
    #: Stimulus mode: the attack's output before :func:`fit_to_bound` scaled it by
    #: ``fit_scale``, except the flow / lattice, which are given as scaled and shown.
    size: float | None
    within_bound: bool | None
    #: The same measured on the stored 8-bit images, where it can be measured from images
    #: alone (Lp, JPEG, LPIPS). 8-bit storage can push JPEG-L∞ sizes past tiny bounds.
    stored_size: float | None
    within_bound_stored: bool | None
    attack_measures: dict[str, float]
    distances: dict[str, float]
    natural_sha256: str
    other_sha256: str
    origin: str
    #: Stored size ÷ bound (``stored_size`` where the images define it, else ``size``), and
    #: whether it lies in ``[AT_BOUND, 1]`` — False flags a pair that did not reach its bound.
    #: None for controls and unbounded threat models.
    size_ratio: float | None = None
    at_bound: bool | None = None
    #: The factor stimulus mode scaled the attack's perturbation by to reach the bound
    #: (:func:`fit_to_bound`; 1: unchanged; ``attack_measures`` are the attack's, before it).
    fit_scale: float | None = None
    # --- manifest version 3 only (PROTOCOL_FIELDS; a version 2 / JND manifest has none) ---
    #: Ladder level of ``condition`` within its threat model (``None``: not a ladder / control).
    level: int | None = None
    #: Label protocol: the source image's true class name (one of the manifest's label set).
    class_name: str | None = None
    #: 2AFC: copy B of the triplet (``natural_path`` is the reference, ``other_path`` copy A),
    #: its SHA-256, condition (spec), threat model and bound.
    third_path: str | None = None
    third_sha256: str | None = None
    condition_b: str | None = None
    threat_model_b: str | None = None
    bound_b: float | None = None
    #: 2AFC: the distances between the reference and copy B (``distances``: copy A; the
    #: same names, measured the same way on the stored 8-bit images).
    distances_b: dict[str, float] | None = None
    #: 2AFC: copy B's own numbers, named as copy A's fields above (``adversarial_label``,
    #: ``attack_success``, ``size``, ``within_bound``, ``stored_size``, ``within_bound_stored``,
    #: ``size_ratio``, ``at_bound``, ``fit_scale``, ``attack_measures``).
    measures_b: dict | None = None


#: The fields a version 3 manifest's rows add to version 2's.
PROTOCOL_FIELDS = ("level", "class_name", "third_path", "third_sha256", "condition_b",
                   "threat_model_b", "bound_b", "distances_b", "measures_b")
#: What ``measures_b`` holds: copy B's values of these PairRecord fields.
B_MEASURES = ("adversarial_label", "attack_success", "size", "within_bound", "stored_size",
              "within_bound_stored", "size_ratio", "at_bound", "fit_scale", "attack_measures")


def _row_fields(version: int) -> tuple[str, ...]:
    names = tuple(PairRecord.__dataclass_fields__)
    if version == MANIFEST_VERSION:
        return tuple(n for n in names if n not in PROTOCOL_FIELDS)
    return names


@dataclass
class Manifest:
    """What was generated and how: enough to regenerate it bit for bit.

    ``protocol`` (issue 18): ``jnd`` (written as version 2, exactly as before protocols
    existed), ``2afc``, ``rating`` or ``label`` (version 3: adds ``protocol``, ``label_set``
    — the label protocol's answers — and ``rating_shows`` — ``pair`` or ``single`` — at the
    top, and :data:`PROTOCOL_FIELDS` to every row).
    """

    generator: dict
    conditions: list[dict]
    pairs: list[PairRecord] = field(default_factory=list)
    version: int = MANIFEST_VERSION
    protocol: str = "jnd"
    label_set: list[str] | None = None
    rating_shows: str | None = None

    @property
    def files(self) -> dict[str, str]:
        """``{path relative to the folder: SHA-256}`` of every PNG the pairs name, sorted."""
        out: dict[str, str] = {}
        for p in self.pairs:
            out[p.natural_path] = p.natural_sha256
            out[p.other_path] = p.other_sha256
            if p.third_path is not None:
                out[p.third_path] = p.third_sha256
        return dict(sorted(out.items()))

    def _row(self, p: PairRecord) -> dict:
        row = asdict(p)
        if self.version == MANIFEST_VERSION:
            for name in PROTOCOL_FIELDS:
                del row[name]
        return row

    def to_json(self) -> dict:
        out = {"version": self.version}
        if self.version != MANIFEST_VERSION:
            out.update(protocol=self.protocol, label_set=self.label_set,
                       rating_shows=self.rating_shows)
        out.update({
            "generator": self.generator,
            "conditions": self.conditions,
            "files": self.files,
            "pairs": [self._row(p) for p in self.pairs],
        })
        return out

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of a folder written by :meth:`write`; :class:`EngineError` naming
        the problem when it is missing, not JSON, of another version or malformed."""
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            raise EngineError(f"{path} not found: give the folder `python -m engine generate"
                              " --out` wrote")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineError(f"{path} is not a readable JSON manifest: {exc}") from None
        if not isinstance(data, dict):
            raise EngineError(f"{path}: a manifest is a JSON object")
        version = data.get("version")
        if version not in MANIFEST_VERSIONS:
            raise EngineError(f"{path}: manifest version {version!r}, this code reads"
                              f" versions {', '.join(map(str, MANIFEST_VERSIONS))}: generate"
                              " the folder again with this code's `python -m engine generate`")
        for key, kind in (("generator", dict), ("conditions", list), ("pairs", list),
                          ("files", dict)):
            if not isinstance(data.get(key), kind):
                raise EngineError(f"{path}: {key!r} must be a JSON {kind.__name__}")
        protocol, label_set, rating_shows = "jnd", None, None
        if version != MANIFEST_VERSION:
            protocol, label_set, rating_shows = (data.get("protocol"), data.get("label_set"),
                                                 data.get("rating_shows"))
            if protocol not in PROTOCOLS:
                raise EngineError(f"{path}: unknown protocol {protocol!r} (one of"
                                  f" {', '.join(PROTOCOLS)})")
            if label_set is not None and (not isinstance(label_set, list) or not all(
                    isinstance(c, str) and c for c in label_set)):
                raise EngineError(f"{path}: 'label_set' must be a list of class names")
            if rating_shows not in (None, *RATING_SHOWS):
                raise EngineError(f"{path}: unknown rating_shows {rating_shows!r}")
        names = set(_row_fields(version))
        pairs = []
        for i, row in enumerate(data["pairs"]):
            if not isinstance(row, dict) or set(row) != names:
                got = set(row) if isinstance(row, dict) else set()
                raise EngineError(
                    f"{path}: pair {i} does not have the manifest's fields (missing:"
                    f" {sorted(names - got)}, unknown: {sorted(got - names)})")
            pairs.append(PairRecord(**row))
        manifest = cls(generator=data["generator"], conditions=data["conditions"],
                       pairs=pairs, version=version, protocol=protocol, label_set=label_set,
                       rating_shows=rating_shows)
        if manifest.files != data["files"]:
            raise EngineError(f"{path}: its 'files' list does not match its pairs' hashes")
        return manifest

    def write(self, out_dir: Path) -> None:
        """``manifest.json`` and ``manifest.csv`` (one row per item, distances as columns;
        version 3: copy B's distances as ``b_<name>`` columns)."""
        (out_dir / "manifest.json").write_text(json.dumps(self.to_json(), indent=1))
        distance_keys = sorted({k for p in self.pairs for k in p.distances})
        b_keys = sorted({k for p in self.pairs for k in (p.distances_b or {})})
        columns = [k for k in _row_fields(self.version)
                   if k not in ("distances", "attack_measures", "distances_b", "measures_b")]
        with open(out_dir / "manifest.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns + distance_keys + [f"b_{k}" for k in b_keys])
            for p in self.pairs:
                row = asdict(p)
                writer.writerow(
                    [row[c] for c in columns] + [p.distances.get(k) for k in distance_keys]
                    + [(p.distances_b or {}).get(k) for k in b_keys]
                )


#: Threat models whose bound is a norm of the pixel perturbation on the [0, 1] scale.
PIXEL_LP = ("linf", "l2")


def clip_to_lp_bound(natural_u8: np.ndarray, adversarial_u8: np.ndarray, norm: str,
                     bound: float) -> np.ndarray:
    """8-bit images whose perturbation is within ``bound`` exactly (float64 on the 8-bit
    values ÷ 255), not only within a float tolerance.

    :func:`quantize_toward` counts values within 1e-3 of a level as that level, and an
    attack projects in float32 (or bf16 under autocast), so a stored L2 pair can come out a
    few millionths over its ball (measured: 2.35295 for the bound 600/255 under bf16 on an
    AVX2 CPU). L∞: each step clipped to ``⌊255·bound⌋``; L2: one level taken off the
    largest remaining step, toward the natural image, until the norm is within (each such
    step lowers the norm the most). Images already within are returned unchanged.
    """
    if norm not in PIXEL_LP:
        raise ValueError(f"unknown pixel norm {norm!r}; use one of {PIXEL_LP}")
    natural = natural_u8.astype(np.int32)
    steps = adversarial_u8.astype(np.int32) - natural
    out = adversarial_u8.copy()
    limit = bound * 255 * (1 + 1e-12)  # the bound in 8-bit steps
    for i in range(len(steps)):
        flat = steps[i].reshape(-1)
        if norm == "linf":
            cap = math.floor(limit)
            if np.abs(flat).max(initial=0) <= cap:
                continue
            flat = np.clip(flat, -cap, cap)
        else:
            if float(np.dot(flat, flat)) <= limit * limit:
                continue
            flat = flat.copy()
            total = float(np.dot(flat, flat))
            while total > limit * limit:  # a few steps: the excess is float error
                j = int(np.argmax(np.abs(flat)))
                total -= 2 * abs(int(flat[j])) - 1
                flat[j] -= np.sign(flat[j])
        out[i] = (natural[i].reshape(-1) + flat).reshape(natural[i].shape).astype(np.uint8)
    return out


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode ``[H, W, 3]`` uint8 as PNG with only IHDR/IDAT/IEND (no text, time or gamma)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def quantize_toward(natural_u8: np.ndarray, adversarial: torch.Tensor) -> np.ndarray:
    """8-bit adversarial images whose perturbation is rounded toward zero, per value.

    Rounding to the nearest level could push a perturbation that sits on its L2 ball (or an
    L∞ bound that is not a multiple of 1/255) outside the bound; truncating toward the
    natural image never makes any Lp norm larger. Values within 1e-3 of a level count as that
    level, so float error cannot cost a whole step. Returns ``[N, H, W, 3]`` uint8.
    """
    delta = adversarial.detach().double().cpu().permute(
        0, 2, 3, 1
    ).numpy() * 255 - natural_u8.astype(np.float64)
    steps = np.trunc(delta + np.sign(delta) * 1e-3)
    return np.clip(natural_u8.astype(np.int16) + steps.astype(np.int16), 0, 255).astype(np.uint8)


def from_uint8(pixels: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 → ``[N, 3, H, W]`` float32 in [0, 1] on ``device``."""
    return (
        torch.from_numpy(np.ascontiguousarray(pixels))
        .permute(0, 3, 1, 2)
        .float()
        .div(255)
        .to(device)
    )


def condition_slug(spec: str) -> str:
    """A file-safe folder name for a spec: ``linf:bound=0.0157`` → ``linf_bound-0.0157``."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in spec.replace("=", "-"))


#: Attacks with a hard LPIPS bound: truncating toward the natural image does not bound
#: LPIPS, so :func:`fit_stored` shrinks the few stored perturbations that 8 bits push over.
STORED_WITHIN_BOUND = ("ppgd", "lpa")
FIT_STEPS = 8


def fit_stored(attack, natural_u8: np.ndarray, natural: torch.Tensor, adversarial_u8: np.ndarray,
               classifier: ImageClassifier, device: torch.device) -> np.ndarray:
    """8-bit images within ``attack.bound`` as measured by ``attack.perturbation_size``.

    Images already within are unchanged. For the others, bisects (``FIT_STEPS`` steps) the
    largest ``α`` such that ``natural + α·(stored − natural)``, truncated toward the natural
    image, is within the bound (α = 0, the natural image itself, always is).
    """
    with torch.no_grad():
        size = attack.perturbation_size(natural, from_uint8(adversarial_u8, device), classifier)
    over = np.flatnonzero((size > attack.bound * (1 + 1e-4)).cpu().numpy())
    if over.size == 0:
        return adversarial_u8
    fitted = adversarial_u8.copy()
    base = natural_u8[over].astype(np.float64)
    delta = adversarial_u8[over].astype(np.float64) - base
    low, high = np.zeros(over.size), np.ones(over.size)
    best = natural_u8[over].copy()
    for _ in range(FIT_STEPS):
        middle = (low + high) / 2
        candidate = (base + np.trunc(middle[:, None, None, None] * delta)).astype(np.uint8)
        with torch.no_grad():
            sizes = attack.perturbation_size(natural[torch.as_tensor(over)],
                                             from_uint8(candidate, device), classifier)
        inside = (sizes <= attack.bound * (1 + 1e-4)).cpu().numpy()
        best[inside] = candidate[inside]
        low = np.where(inside, middle, low)
        high = np.where(inside, high, middle)
    fitted[over] = best
    return fitted


#: Stimulus mode's target: stored size ÷ bound in ``[AT_BOUND, 1]`` (1 with the relative float
#: tolerance of :func:`_le`), :data:`engine.analysis.AT_BOUND`. Pairs below it are kept and
#: flagged (``at_bound=False``).
#: The mode :func:`generate_stimuli` runs attacks in unless told otherwise (see MODES).
STIMULUS_MODE = "stimulus"
#: Doublings of the scale tried before bisecting, and bisection steps, of :func:`fit_to_bound`.
GROW_STEPS = 4
BISECT_STEPS = 10
#: Probes around the bisected scale (``α·(1 ± k·PROBE_SPACING)``, k = 1…PROBE_STEPS) for the
#: pairs still short of :data:`AT_BOUND`: where 8-bit rounding makes the size jagged in ``α``
#: (JPEG-L∞, whose DCT coefficients pick up the rounding of every pixel) a nearby scale can
#: store a larger size within the bound.
PROBE_STEPS = 8
PROBE_SPACING = 0.01
#: Float tolerance of "at most the bound" in :func:`fit_to_bound`: relative ``_TOLERANCE`` plus
#: absolute ``_ABS_TOLERANCE`` (bound units). Stimulus mode pushes every pair to its bound, so
#: this is the float32 rounding of a stored-size measurement (a difference of two pixel values
#: in [0, 1] is off by up to about 1.2e-7; L∞ 2/255 then reads 2/255 + 1e-7), not
#: :func:`_le`'s looser 1e-4, which would let the fit store pairs systematically just over
#: their bound (an 8-bit L2 pair measured 5e-5 relative over 600/255).
_TOLERANCE = 1e-6
_ABS_TOLERANCE = 1e-6
#: A stored size ÷ bound counts as "at most 1" up to this slack when pairs are flagged
#: (``at_bound``, :func:`size_ratio_summary`): :func:`_le`'s relative 1e-4, as
#: ``within_bound_stored``; tiny bounds read a ratio of 1 + 1e-5 from float32 rounding alone.
_RATIO_SLACK = 1e-4


@dataclass
class Fitted:
    """:func:`fit_to_bound`'s result for a batch of ``N`` pairs."""

    #: ``[N, H, W, 3]`` uint8, the images to store.
    pixels: np.ndarray
    #: ``[N]`` scale applied to the attack's perturbation (1: unchanged).
    scale: np.ndarray
    #: ``[N]`` size in bound units where it is defined by parameters (flow, lattice), else None.
    parameter_size: np.ndarray | None


def _scaled(attack, natural_u8: np.ndarray, natural: torch.Tensor, adversarial: torch.Tensor,
            extras: dict, scale: np.ndarray, labels: torch.Tensor, classifier: ImageClassifier,
            device: torch.device):
    """Stored pixels, size (bound units), success and parameter size at ``scale`` per image."""
    images, parameter_size = attack.scale_perturbation(
        natural, adversarial, extras, torch.as_tensor(scale, dtype=torch.float64).to(device))
    pixels = quantize_toward(natural_u8, images)
    shown = from_uint8(pixels, device)
    with torch.no_grad():
        logits = classifier(shown)
        size = parameter_size if parameter_size is not None else (
            attack.perturbation_size(natural, shown, classifier))
    success = attack.is_success(logits, labels).cpu().numpy()
    return pixels, size.double().cpu().numpy(), success, (
        None if parameter_size is None else parameter_size.double().cpu().numpy())


def fit_to_bound(attack, natural_u8: np.ndarray, natural: torch.Tensor, result,
                 labels: torch.Tensor, classifier: ImageClassifier, device: torch.device
                 ) -> Fitted:
    """Scale each pair's perturbation so that its *stored* 8-bit size is as close to
    ``attack.bound`` as possible without exceeding it (stimulus mode's last step).

    For a scale ``α`` the candidate is :meth:`Attack.scale_perturbation` (the image
    perturbation ``α·(x' − x)``; StAdv's flow / ReColorAdv's lattice ``α·θ``), rounded toward
    the natural image to 8 bits (:func:`quantize_toward`) and measured as stored. ``α`` is
    *feasible* when that size is within the bound and, if the attack's own image was
    adversarial, the candidate still is (a successful pair stays successful). Per image:

    - already in ``[AT_BOUND, 1]`` of the bound: unchanged (``α = 1``);
    - over the bound (8-bit rounding of an LPIPS ball, Fast-LPA's soft bound): the largest
      feasible ``α`` in ``[0, 1]`` by bisection on size alone (``α = 0`` is the natural image);
    - under ``AT_BOUND``: ``α`` starts at the linear guess ``bound / size``, doubles while
      still feasible (``GROW_STEPS``), then bisects between the last feasible and the first
      infeasible ``α`` (``BISECT_STEPS``; the interval shrinks to ``2^-10`` of the guess);
      still short, up to ``2·PROBE_STEPS`` probes around the bisected ``α``.

    Of all feasible candidates probed, the one with the largest stored size is kept. Every
    candidate is measured exactly as stored, so the result is within the bound after
    quantisation by construction. Sizes need not be exactly monotone in ``α`` (LPIPS; clamping
    to ``[0, 1]``), so a pair can still end below ``AT_BOUND`` — the caller flags it.
    Cost: one classifier pass and one size measurement per step, on the rows being fitted.
    """
    n = natural_u8.shape[0]
    bound = float(attack.bound)
    limit = bound * (1 + _TOLERANCE) + _ABS_TOLERANCE
    extras = dict(result.extras)
    ones = np.ones(n)
    pixels, size, success, parameter_size = _scaled(
        attack, natural_u8, natural, result.adversarial, extras, ones, labels, classifier,
        device)
    scale = ones.copy()
    need_success = success.copy()
    over = size > limit
    under = (size < AT_BOUND * bound) & (size > 0)
    rows = np.flatnonzero(over | under)
    if rows.size == 0 or bound == 0:
        return Fitted(pixels, scale, parameter_size)

    index = torch.as_tensor(rows, device=device)
    sub_extras = {k: v[index] for k, v in extras.items() if v.dim() >= 1 and v.shape[0] == n}

    def probe(alpha: np.ndarray):
        got = _scaled(attack, natural_u8[rows], natural[index], result.adversarial[index],
                      sub_extras, alpha, labels[index], classifier, device)
        feasible = (got[1] <= limit) & (got[2] | ~need_success[rows] | over[rows])
        return got, feasible

    best_pixels = pixels[rows].copy()
    best_size = np.where(over[rows], -np.inf, size[rows])  # over the bound: not a candidate
    best_parameter = None if parameter_size is None else parameter_size[rows].copy()

    def keep(alpha: np.ndarray, got, take: np.ndarray) -> None:
        take = take & (got[1] >= best_size)  # the largest feasible stored size wins
        best_pixels[take] = got[0][take]
        best_size[take] = got[1][take]
        if best_parameter is not None:
            best_parameter[take] = got[3][take]
        scale[rows[take]] = alpha[take]

    is_over = over[rows]
    low = np.where(is_over, 0.0, 1.0)
    high = np.where(is_over, 1.0, np.minimum(bound / np.maximum(size[rows], 1e-12), 1e6))
    if is_over.any():  # α = 0 (the natural image) is feasible: start there, not at α = 1
        keep(low, (natural_u8[rows], np.zeros(rows.size), None,
                   None if best_parameter is None else np.zeros(rows.size)), is_over)
    growing = ~is_over
    for _ in range(GROW_STEPS + 1):
        if not growing.any():
            break
        got, feasible = probe(high)
        grow = growing & feasible
        keep(high, got, grow)
        low = np.where(grow, high, low)
        done = grow & (got[1] >= AT_BOUND * bound)  # reached the target: stop here
        growing = grow & ~done
        high = np.where(growing, high * 2, high)
        if done.any():
            low = np.where(done, high, low)  # nothing left to bisect for these rows
    for _ in range(BISECT_STEPS):
        active = high > low * (1 + 1e-6)
        if not active.any():
            break
        middle = np.where(active, (low + high) / 2, low)
        got, feasible = probe(middle)
        take = active & feasible & (middle > 0)
        keep(middle, got, take)
        low = np.where(take, middle, low)
        high = np.where(active & ~feasible, middle, high)
    for k in (k * sign for k in range(1, PROBE_STEPS + 1) for sign in (1, -1)):
        short = best_size < AT_BOUND * bound
        if not short.any():
            break
        alpha = low * (1 + k * PROBE_SPACING)
        got, feasible = probe(alpha)
        keep(alpha, got, short & feasible & (alpha > 0))
    pixels[rows] = best_pixels
    if parameter_size is not None:
        parameter_size[rows] = best_parameter
    return Fitted(pixels, scale, parameter_size)


def size_ratio_summary(rows) -> list[dict]:
    """Per condition, the stored size ÷ bound of its pairs: ``[{condition, n, min, median,
    max, flagged}]`` in first-seen order, from ``(condition, size_ratio)`` rows (PairRecords'
    fields, or a study's stored pairs). ``flagged`` counts ratios outside ``[AT_BOUND, 1]``;
    rows without a ratio (controls, unbounded threat models) are left out."""
    by: dict[str, list[float]] = {}
    for condition, ratio in rows:
        if condition is not None and ratio is not None:
            by.setdefault(condition, []).append(float(ratio))
    return [{"condition": c, "n": len(r), "min": min(r), "median": float(np.median(r)),
             "max": max(r),
             "flagged": sum(not AT_BOUND <= x <= 1 + _RATIO_SLACK for x in r)}
            for c, r in by.items()]


def autocast_context(autocast: str | None, device: torch.device):
    """``torch.autocast`` in bfloat16 when asked, else a no-op context."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _le(size: torch.Tensor, bound: float) -> bool:
    """Is a perturbation of ``size`` within ``bound`` (relative float tolerance 1e-4)?"""
    return bool(float(size) <= bound * (1 + 1e-4))


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def generate_stimuli(
    sources: list[SourceImage],
    attack_specs: list[str],
    classifier: ImageClassifier,
    out_dir: str | Path,
    *,
    lpips_models: dict[str, LPIPS] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    sentinels: int | None = None,
    catch: int = 0,
    device: str | torch.device = "cpu",
    autocast: str | None = None,
    progress: bool = True,
    levels: dict[str, int] | None = None,
    write_manifest: bool = True,
    mode: str = STIMULUS_MODE,
) -> Manifest:
    """Attack every source under every spec and write pairs, sentinels and the manifest.

    ``sentinels`` is how many sentinel pairs to add (default: one per source image, capped by
    the number of sources), chosen reproducibly from the sources; ``catch`` how many catch
    pairs (a source and a different source image: obviously different, an attention check). Raises
    :class:`EngineError` for unknown or malformed specs before anything is written.
    Deterministic for a seed: the same inputs give byte-identical PNGs and manifest.
    ``autocast="bf16"`` runs the attacks (not the distance measurements) under bfloat16
    autocast, for GPUs. ``levels`` maps specs (as given) to their ladder level, recorded with
    the condition; labels come from the specs (``bound=small``, ``bound=0.31@human``).

    ``mode`` (recorded in the manifest's generator and every condition):

    - ``"stimulus"`` (what study generation runs): each attack runs as
      :meth:`Attack.for_mode` ``("stimulus")`` makes it (no early exit, margin unclamped; the
      condition's ``attack_spec`` records what ran), then :func:`fit_to_bound` scales every
      bounded pair's perturbation so its stored 8-bit size is as close to the bound as it can
      be without exceeding it, keeping successful pairs successful. Pairs whose stored size ÷
      bound stays below :data:`AT_BOUND` are kept and flagged (``at_bound=False``).
    - ``"evaluation"``: the attacks exactly as specified (PPGD/LPA stop at the first
      misclassified iterate), only shrinking LPIPS pairs that 8 bits push over the bound —
      the stimuli of manifests written before stimulus mode existed.
    """
    from .attacks.base import MODES

    if mode not in MODES:
        raise EngineError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if autocast not in (None, "bf16"):
        raise EngineError(f"autocast must be None or 'bf16', got {autocast!r}")
    if not sources:
        raise EngineError("no source images to build stimuli from")
    if not attack_specs:
        raise EngineError("at least one attack spec (condition) is needed")
    if batch_size < 1:
        raise EngineError(f"batch_size must be at least 1, got {batch_size}")
    attacks = [parse_attack(spec) for spec in attack_specs]  # every spec checked before work
    canonical = [a.spec for a in attacks]
    duplicates = {s for s in canonical if canonical.count(s) > 1}
    if duplicates:
        raise EngineError(f"condition given twice: {', '.join(sorted(duplicates))}")
    sizes = {s.pixels.shape for s in sources}
    if len(sizes) != 1:
        raise EngineError(f"source images must share one size, got {sorted(sizes)}")
    n_sentinels = len(sources) if sentinels is None else sentinels
    if not 0 <= n_sentinels <= len(sources):
        raise EngineError(f"sentinels must be between 0 and {len(sources)}, got {n_sentinels}")
    if not 0 <= catch <= len(sources) or (catch and len(sources) < 2):
        raise EngineError(
            f"catch pairs need two or more sources and at most one per source ({len(sources)}),"
            f" got {catch}"
        )

    out_dir = Path(out_dir)
    device = torch.device(device)
    lpips_models = {name: m.to(device).eval() for name, m in (lpips_models or {}).items()}
    classifier = classifier.to(device).eval()
    height, width = sources[0].pixels.shape[:2]

    natural_u8 = np.stack([s.pixels for s in sources])
    with torch.no_grad():
        labels = torch.cat(
            [
                classifier(from_uint8(natural_u8[i : i + batch_size], device)).argmax(1)
                for i in range(0, len(sources), batch_size)
            ]
        )
    natural_paths, natural_hashes = [], []
    for s in sources:
        rel = f"natural/{s.id}.png"
        natural_hashes.append(_write(out_dir / rel, png_bytes(s.pixels)))
        natural_paths.append(rel)

    generator_info = {
        **classifier.description,
        "lpips_models": {name: m.description for name, m in lpips_models.items()},
        "seed": seed,
        "image_size": [height, width],
        "labels": "classifier prediction on the natural image (untargeted attacks)",
        "torch": torch.__version__,
        "device": str(device),
        "autocast": autocast,
        "python": platform.python_version(),
        "mode": mode,
        "at_bound": [AT_BOUND, 1.0] if mode == STIMULUS_MODE else None,
    }
    manifest = Manifest(
        generator=generator_info,
        conditions=[
            {
                "spec": a.spec,
                "threat_model": a.name,
                "bound": float(a.bound),
                "slug": condition_slug(a.spec),
                "label": bound_label(text),
                "level": (levels or {}).get(text),
                "given": text,
                "parameters": a.describe(),
                "mode": mode,
                "attack_spec": a.for_mode(mode).spec,
            }
            for a, text in zip(attacks, attack_specs, strict=True)
        ],
    )

    running = {a.spec: a.for_mode(mode) for a in attacks}
    batches = [(a, i) for a in attacks for i in range(0, len(sources), batch_size)]
    for attack, start in tqdm(batches, desc="attacking", unit="batch", disable=not progress):
        run = running[attack.spec]
        stop = min(start + batch_size, len(sources))
        natural = from_uint8(natural_u8[start:stop], device)
        generator = torch.Generator().manual_seed(
            zlib.crc32(f"{seed}|{attack.spec}|{start}".encode())
        )
        with autocast_context(autocast, device):
            result = run(classifier, natural, labels[start:stop], generator=generator)
        size = result.size  # as the attack optimised it (float images / its own parameters)
        scale = None
        if mode == STIMULUS_MODE and size is not None:
            fitted = fit_to_bound(run, natural_u8[start:stop], natural, result,
                                  labels[start:stop], classifier, device)
            adversarial_u8, scale = fitted.pixels, fitted.scale
            if fitted.parameter_size is not None:  # the scaled flow / lattice that is shown
                size = torch.as_tensor(fitted.parameter_size)
        else:
            adversarial_u8 = quantize_toward(natural_u8[start:stop], result.adversarial)
            if attack.name in STORED_WITHIN_BOUND:
                adversarial_u8 = fit_stored(attack, natural_u8[start:stop], natural,
                                            adversarial_u8, classifier, device)
        if attack.name in PIXEL_LP:  # exactly within, not only within a float tolerance
            adversarial_u8 = clip_to_lp_bound(natural_u8[start:stop], adversarial_u8,
                                              attack.name, float(attack.bound))
        shown = from_uint8(adversarial_u8, device)  # measure what is stored and shown
        with torch.no_grad():
            predicted = classifier(shown).argmax(1)
            distances = pairwise_distances(natural, shown, lpips_models)
            stored_size = run.perturbation_size(natural, shown, classifier)
        measures = {  # per-image scalars the attack reports (flow_linf, lattice_smoothness ...)
            k: v.float().cpu().tolist() for k, v in result.extras.items() if v.dim() == 1
        }
        slug = condition_slug(attack.spec)
        shown_size = stored_size if stored_size is not None else size
        ratio = (None if shown_size is None or attack.bound == 0
                 else (shown_size.double().cpu() / attack.bound).numpy())
        for j, idx in enumerate(range(start, stop)):
            src = sources[idx]
            rel = f"{slug}/{src.id}.png"
            other_hash = _write(out_dir / rel, png_bytes(adversarial_u8[j]))
            manifest.pairs.append(
                PairRecord(
                    key=f"{src.id}|{attack.spec}",
                    source_image=src.id,
                    is_sentinel=False,
                    is_catch=False,
                    condition=attack.spec,
                    threat_model=attack.name,
                    bound=float(attack.bound),
                    natural_path=natural_paths[idx],
                    other_path=rel,
                    width=width,
                    height=height,
                    label=int(labels[idx]),
                    adversarial_label=int(predicted[j]),
                    attack_success=bool(predicted[j] != labels[idx]),
                    size=None if size is None else float(size[j]),
                    within_bound=None if size is None else _le(size[j], attack.bound),
                    stored_size=None if stored_size is None else float(stored_size[j]),
                    within_bound_stored=None
                    if stored_size is None
                    else _le(stored_size[j], attack.bound),
                    attack_measures={k: v[j] for k, v in measures.items()},
                    distances={k: float(v[j]) for k, v in distances.items()},
                    natural_sha256=natural_hashes[idx],
                    other_sha256=other_hash,
                    origin=src.origin,
                    size_ratio=None if ratio is None else float(ratio[j]),
                    at_bound=None if ratio is None
                    else bool(AT_BOUND <= ratio[j] <= 1 + _RATIO_SLACK),
                    fit_scale=None if scale is None else float(scale[j]),
                )
            )

    # Control pairs. Sentinels: a natural image twice. Catch pairs: a natural image and a
    # different one (obviously different: an attention check). Both chosen reproducibly.
    rng = np.random.default_rng(seed)
    sentinel_ids = sorted(rng.choice(len(sources), size=n_sentinels, replace=False).tolist())
    catch_ids = sorted(rng.choice(len(sources), size=catch, replace=False).tolist())
    controls = [(i, i, "sentinel") for i in sentinel_ids]
    controls += [(i, (i + 1) % len(sources), "catch") for i in catch_ids]
    for idx, other, kind in controls:
        src = sources[idx]
        with torch.no_grad():
            distances = pairwise_distances(
                from_uint8(natural_u8[idx : idx + 1], device),
                from_uint8(natural_u8[other : other + 1], device),
                lpips_models,
            )
        manifest.pairs.append(
            PairRecord(
                key=f"{src.id}|{kind}"
                if kind == "sentinel"
                else f"{src.id}|catch|{sources[other].id}",
                source_image=src.id,
                is_sentinel=kind == "sentinel",
                is_catch=kind == "catch",
                condition=None,
                threat_model=None,
                bound=None,
                natural_path=natural_paths[idx],
                other_path=natural_paths[other],
                width=width,
                height=height,
                label=int(labels[idx]),
                adversarial_label=int(labels[other]),
                attack_success=None,
                size=None,
                within_bound=None,
                stored_size=None,
                within_bound_stored=None,
                attack_measures={},
                distances={k: float(v[0]) for k, v in distances.items()},
                natural_sha256=natural_hashes[idx],
                other_sha256=natural_hashes[other],
                origin=src.origin,
            )
        )
    if write_manifest:
        manifest.write(out_dir)
    return manifest
