"""Natural images for stimuli: a folder, a torchvision dataset, or the bundled photographs.

Sources are named by a string (the ``--images`` argument of ``generate_pairs``):

- ``skimage`` (the default): the natural colour photographs that ship inside scikit-image
  (astronaut, chelsea, coffee, rocket, hubble_deep_field, motorcycle) — real photographs
  available on every machine without a download.
- a folder path: every image file below it (ImageFolder layout; class sub-folders give
  ``dataset_label``). Every file must be a readable RGB image.
- ``torchvision:NAME[:ROOT]``: a torchvision dataset already on disk (e.g. ``CIFAR10``, the
  test split), never downloaded; a clear error says where it was looked for.

Every image becomes one or more square crops of ``size`` × ``size`` pixels, reproducibly for a
seed: crop 0 is the centred largest square, later crops are random squares covering 60–100 % of
the shorter side. Crops are resized with Pillow's antialiased bicubic filter and stay uint8,
so the stored PNG of the natural image is exactly what the attack started from.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import EngineError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")

#: scikit-image's bundled natural colour photographs (loader name → file-safe name).
BUNDLED_PHOTOGRAPHS = {
    "astronaut": "astronaut",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "hubble_deep_field": "hubble",
    "stereo_motorcycle": "motorcycle",
}


@dataclass(frozen=True)
class NaturalImage:
    """A natural image before cropping: ``pixels`` is ``[H, W, 3]`` uint8 RGB."""

    name: str
    pixels: np.ndarray
    origin: str
    dataset_label: int | None = None


@dataclass(frozen=True)
class SourceImage:
    """A crop ready for stimuli: ``pixels`` ``[size, size, 3]`` uint8; ``id`` is file-safe."""

    id: str
    pixels: np.ndarray
    origin: str
    dataset_label: int | None = None

    def tensor(self) -> torch.Tensor:
        """``[3, H, W]`` float32 in [0, 1]."""
        return torch.from_numpy(self.pixels).permute(2, 0, 1).float().div(255)


def _bundled() -> Iterator[NaturalImage]:
    import skimage.data

    for loader, name in BUNDLED_PHOTOGRAPHS.items():
        pixels = getattr(skimage.data, loader)()
        if isinstance(pixels, tuple):  # stereo_motorcycle returns (left, right, disparity)
            pixels = pixels[0]
        yield NaturalImage(name, np.ascontiguousarray(pixels), f"skimage.data.{loader}")


def read_rgb(path: Path) -> np.ndarray:
    """Read an RGB image file to ``[H, W, 3]`` uint8; :class:`EngineError` if corrupt/non-RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode != "RGB":
                raise EngineError(
                    f"{path} is not an RGB image (Pillow mode {img.mode!r}); convert it to"
                    " 8-bit RGB first, e.g. Image.open(p).convert('RGB').save(p)"
                )
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, EngineError):
            raise
        raise EngineError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from exc


def _folder(root: Path) -> Iterator[NaturalImage]:
    if not root.exists():
        raise EngineError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise EngineError(f"{root} is not a folder of images")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise EngineError(
            f"image folder {root} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files} - {"."})
    class_index = {c: i for i, c in enumerate(classes)}
    for path in files:
        rel = path.relative_to(root)
        name = _safe_name(rel.with_suffix("").as_posix())
        label = class_index.get(rel.parent.as_posix())
        yield NaturalImage(name, read_rgb(path), str(path), label)


def _torchvision(name: str, root: str) -> Iterator[NaturalImage]:
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise EngineError(f"torchvision has no dataset called {name!r}")
    try:
        dataset = cls(root=root, train=False, download=False)
    except TypeError:
        dataset = cls(root=root, download=False)
    except RuntimeError as exc:
        raise EngineError(
            f"torchvision dataset {name} not found under {os.path.abspath(root)} ({exc});"
            f" download it on a machine with internet (torchvision.datasets.{name}(root,"
            " download=True)) and copy the folder here, or pass ROOT: torchvision:NAME:ROOT"
        ) from exc
    for i in range(len(dataset)):
        img, label = dataset[i]
        yield NaturalImage(
            f"{name.lower()}-{i:06d}", np.asarray(img.convert("RGB")), f"{name}[{i}]", int(label)
        )


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "image"


def natural_images(source: str = "skimage") -> Iterator[NaturalImage]:
    """Iterate the natural images of ``source`` (see module docstring)."""
    if source == "skimage":
        return _bundled()
    if source.startswith("torchvision:"):
        _, name, *rest = source.split(":", 2)
        return _torchvision(name, rest[0] if rest else os.path.join("var", "datasets"))
    return _folder(Path(source).expanduser())


def crop_boxes(height: int, width: int, n_crops: int, rng: np.random.Generator):
    """``n_crops`` square boxes ``(top, left, side)``: centred largest first, then random."""
    short = min(height, width)
    boxes = [((height - short) // 2, (width - short) // 2, short)]
    for _ in range(n_crops - 1):
        side = int(rng.integers(int(0.6 * short), short + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        boxes.append((top, left, side))
    return boxes


def load_sources(
    source: str = "skimage",
    *,
    size: int = 224,
    crops_per_image: int = 1,
    max_images: int | None = None,
    seed: int = 0,
) -> list[SourceImage]:
    """Load, validate and crop every image of ``source`` before anything is written.

    ``size`` is the side of the square crops in pixels. Raises :class:`EngineError` for a
    missing folder, a corrupt or non-RGB file, or images smaller than 8×8 pixels.
    """
    if size < 8:
        raise EngineError(f"size must be at least 8 pixels, got {size}")
    if crops_per_image < 1:
        raise EngineError(f"crops_per_image must be at least 1, got {crops_per_image}")
    if max_images is not None and max_images < 1:
        raise EngineError(f"max_images must be at least 1, got {max_images}")
    out: list[SourceImage] = []
    for natural in natural_images(source):
        if max_images is not None and len(out) >= max_images:
            break
        h, w = natural.pixels.shape[:2]
        if min(h, w) < 8:
            raise EngineError(f"{natural.origin} is too small ({w}×{h}) to crop")
        rng = np.random.default_rng([seed, zlib.crc32(natural.name.encode())])
        image = Image.fromarray(natural.pixels)
        for k, (top, left, side) in enumerate(crop_boxes(h, w, crops_per_image, rng)):
            crop = image.crop((left, top, left + side, top + side))
            crop = crop.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
            out.append(
                SourceImage(
                    id=f"{natural.name}-c{k}-{size}",
                    pixels=np.asarray(crop, dtype=np.uint8).copy(),
                    origin=f"{natural.origin} crop {k} (top={top}, left={left}, side={side})",
                    dataset_label=natural.dataset_label,
                )
            )
    if max_images is not None:
        out = out[:max_images]
    return out
