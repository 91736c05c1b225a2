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
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import platform
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .attacks import parse_attack
from .attacks.spec import bound_label
from .data import SourceImage
from .distances import LPIPS, pairwise_distances
from .errors import EngineError
from .models import ImageClassifier

#: 2: adds ``files`` (path → SHA-256), each condition's ``level`` and ``given`` spec, and the
#: generator's ``networks`` / ``untrained`` / ``request`` / ``code_version`` (engine.generate).
MANIFEST_VERSION = 2


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


@dataclass
class Manifest:
    """What was generated and how: enough to regenerate it bit for bit."""

    generator: dict
    conditions: list[dict]
    pairs: list[PairRecord] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    @property
    def files(self) -> dict[str, str]:
        """``{path relative to the folder: SHA-256}`` of every PNG the pairs name, sorted."""
        out: dict[str, str] = {}
        for p in self.pairs:
            out[p.natural_path] = p.natural_sha256
            out[p.other_path] = p.other_sha256
        return dict(sorted(out.items()))

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "generator": self.generator,
            "conditions": self.conditions,
            "files": self.files,
            "pairs": [asdict(p) for p in self.pairs],
        }

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
        if data.get("version") != MANIFEST_VERSION:
            raise EngineError(f"{path}: manifest version {data.get('version')!r}, this code"
                              f" reads version {MANIFEST_VERSION}: generate the folder again"
                              " with this code's `python -m engine generate`")
        for key, kind in (("generator", dict), ("conditions", list), ("pairs", list),
                          ("files", dict)):
            if not isinstance(data.get(key), kind):
                raise EngineError(f"{path}: {key!r} must be a JSON {kind.__name__}")
        names = set(PairRecord.__dataclass_fields__)
        pairs = []
        for i, row in enumerate(data["pairs"]):
            if not isinstance(row, dict) or set(row) != names:
                got = set(row) if isinstance(row, dict) else set()
                raise EngineError(
                    f"{path}: pair {i} does not have the manifest's fields (missing:"
                    f" {sorted(names - got)}, unknown: {sorted(got - names)})")
            pairs.append(PairRecord(**row))
        manifest = cls(generator=data["generator"], conditions=data["conditions"],
                       pairs=pairs, version=data["version"])
        if manifest.files != data["files"]:
            raise EngineError(f"{path}: its 'files' list does not match its pairs' hashes")
        return manifest

    def write(self, out_dir: Path) -> None:
        (out_dir / "manifest.json").write_text(json.dumps(self.to_json(), indent=1))
        distance_keys = sorted({k for p in self.pairs for k in p.distances})
        columns = [
            k for k in PairRecord.__dataclass_fields__ if k not in ("distances", "attack_measures")
        ]
        with open(out_dir / "manifest.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns + distance_keys)
            for p in self.pairs:
                row = asdict(p)
                writer.writerow(
                    [row[c] for c in columns] + [p.distances.get(k) for k in distance_keys]
                )


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
    """
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
            }
            for a, text in zip(attacks, attack_specs, strict=True)
        ],
    )

    batches = [(a, i) for a in attacks for i in range(0, len(sources), batch_size)]
    for attack, start in tqdm(batches, desc="attacking", unit="batch", disable=not progress):
        stop = min(start + batch_size, len(sources))
        natural = from_uint8(natural_u8[start:stop], device)
        generator = torch.Generator().manual_seed(
            zlib.crc32(f"{seed}|{attack.spec}|{start}".encode())
        )
        with autocast_context(autocast, device):
            result = attack(classifier, natural, labels[start:stop], generator=generator)
        adversarial_u8 = quantize_toward(natural_u8[start:stop], result.adversarial)
        if attack.name in STORED_WITHIN_BOUND:
            adversarial_u8 = fit_stored(attack, natural_u8[start:stop], natural, adversarial_u8,
                                        classifier, device)
        shown = from_uint8(adversarial_u8, device)  # measure what is stored and shown
        with torch.no_grad():
            predicted = classifier(shown).argmax(1)
            distances = pairwise_distances(natural, shown, lpips_models)
            stored_size = attack.perturbation_size(natural, shown, classifier)
        size = result.size  # as the attack optimised it (float images / its own parameters)
        measures = {  # per-image scalars the attack reports (flow_linf, lattice_smoothness ...)
            k: v.float().cpu().tolist() for k, v in result.extras.items() if v.dim() == 1
        }
        slug = condition_slug(attack.spec)
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
