"""Training and evaluation datasets, by name.

- ``digits``: scikit-learn's 8×8 handwritten digits (1797 images, bundled with
  scikit-learn, no download), grey levels scaled to ``[0, 1]``, bilinearly upsampled to
  ``image_size`` (32 px by default) and repeated to 3 channels. A fixed, seeded 80/20
  train/test split. For tests and the CPU demo only — results on it are labelled *digits*.
- ``cifar10``: torchvision's CIFAR-10 under ``root`` (``download=True`` only when asked).
- ``imagenet100``: every 10th ImageNet class in sorted WordNet-ID order (``n01440764``,
  ``n01530575``, ...: 100 classes), from a local ImageNet folder with ``train/`` and ``val/``
  sub-folders of WordNet-ID class folders (the ``ILSVRC2012`` layout after the usual val
  reorganisation). 224 px: random-resized crop + flip for training, resize 256 + centre
  crop for evaluation.
- ``folder:PATH``: any ImageFolder tree; ``PATH/train`` and ``PATH/val`` (or ``PATH/test``)
  if present, else PATH for both (then use it for evaluation only).

Images are float tensors ``[3, H, W]`` in ``[0, 1]`` (no normalisation: the classifier
normalises, see :class:`engine.architectures.Classifier`). Training-time augmentation of
32 px data (random crop with 4 px padding + horizontal flip) is done on batches by
:func:`augment_batch` with an explicit generator, so runs are reproducible and resumable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .architectures import CIFAR10_MEAN, CIFAR10_STD
from .errors import EngineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_SPLIT_SEED = 0
DATASET_NAMES = ("digits", "cifar10", "imagenet100", "folder:PATH")


@dataclass
class DatasetBundle:
    """A train and a test split plus what a model needs to know about them."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: ``crop_flip``: :func:`augment_batch` on training batches; ``none``: the dataset's own
    #: transforms (ImageNet) or no augmentation.
    augmentation: str = "none"
    classes: list[str] = field(default_factory=list)
    #: Shown in every output made from this data (``digits``: a toy dataset).
    label: str = ""


def default_root() -> Path:
    """``$PERCEPTLAB_DATA`` or ``./var/data``: where datasets are looked for."""
    return Path(os.environ.get("PERCEPTLAB_DATA", "var/data"))


def load_dataset(name: str, root: str | Path | None = None, *, image_size: int | None = None,
                 download: bool = False) -> DatasetBundle:
    """Load a dataset by name (see the module docstring for the names).

    ``root``: folder holding the data (default :func:`default_root`). A missing dataset raises
    :class:`EngineError` saying where it was looked for and how to provide it.
    """
    if not isinstance(name, str) or not name:
        raise EngineError(f"dataset must be one of {', '.join(DATASET_NAMES)}, got {name!r}")
    root = Path(root) if root is not None else default_root()
    key = name.lower()
    if key == "digits":
        return load_digits(image_size or 32)
    if key == "cifar10":
        return load_cifar10(root, download=download)
    if key == "imagenet100":
        return load_imagenet100(root, image_size=image_size or 224)
    if key.startswith("folder:"):
        return load_folder(Path(name.split(":", 1)[1]), image_size=image_size or 224)
    raise EngineError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")


def load_digits(image_size: int = 32) -> DatasetBundle:
    """scikit-learn digits as ``[3, image_size, image_size]`` images in ``[0, 1]``."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:  # pragma: no cover - scikit-learn is a test dependency
        raise EngineError(
            "the digits dataset needs scikit-learn; install it with pip install scikit-learn"
        ) from None
    if image_size < 8:
        raise EngineError(f"digits image_size must be >= 8 px, got {image_size}")
    data = sk_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False).clamp(0, 1)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return DatasetBundle(
        name="digits", train=TensorDataset(images[train], labels[train]),
        test=TensorDataset(images[test], labels[test]), num_classes=10,
        image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        augmentation="none", classes=[str(i) for i in range(10)],
        label="digits (scikit-learn 8x8 handwritten digits upsampled; a toy dataset, not CIFAR)",
    )


def load_cifar10(root: Path, *, download: bool = False) -> DatasetBundle:
    """CIFAR-10 from ``root`` (torchvision's ``cifar-10-batches-py`` folder)."""
    import torchvision
    from torchvision import transforms

    folder = root / "cifar-10-batches-py"
    if not folder.is_dir() and not download:
        raise EngineError(
            f"CIFAR-10 not found: looked for {folder.resolve()}. Provide it with"
            f" `python -m engine train --dataset cifar10 --data-root {root} --download`, or"
            " put torchvision's cifar-10-batches-py folder there (set --data-root or"
            " $PERCEPTLAB_DATA)"
        )
    to_tensor = transforms.ToTensor()
    train = torchvision.datasets.CIFAR10(str(root), train=True, transform=to_tensor,
                                         download=download)
    test = torchvision.datasets.CIFAR10(str(root), train=False, transform=to_tensor,
                                        download=download)
    return DatasetBundle(name="cifar10", train=train, test=test, num_classes=10, image_size=32,
                         mean=CIFAR10_MEAN, std=CIFAR10_STD, augmentation="crop_flip",
                         classes=list(train.classes), label="CIFAR-10")


def imagenet100_classes(wnids: list[str]) -> list[str]:
    """Every 10th WordNet ID of the sorted ImageNet-1k IDs (PAT's ImageNet-100)."""
    ordered = sorted(wnids)
    if len(ordered) != 1000:
        raise EngineError(
            f"ImageNet-100 is every 10th of the 1000 ImageNet classes, but found {len(ordered)}"
            " class folders; point --data-root at a full ImageNet-1k folder"
        )
    return ordered[::10]


def _imagenet_root(root: Path) -> Path:
    for candidate in (root / "imagenet", root / "ILSVRC2012", root):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise EngineError(
        f"ImageNet not found: looked for train/ and val/ folders of WordNet-ID class folders in"
        f" {(root / 'imagenet').resolve()}, {(root / 'ILSVRC2012').resolve()} and"
        f" {root.resolve()}. Download ILSVRC2012 from image-net.org (it cannot be downloaded"
        " automatically), arrange val/ into class folders, and pass --data-root"
    )


def load_imagenet100(root: Path, *, image_size: int = 224) -> DatasetBundle:
    """ImageNet-100 (PAT): every 10th ImageNet class by sorted WordNet ID."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    base = _imagenet_root(root)
    wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    chosen = imagenet100_classes(wnids)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    test_tf = transforms.Compose([transforms.Resize(int(image_size * 256 / 224)),
                                  transforms.CenterCrop(image_size), transforms.ToTensor()])
    train = _SubsetImageFolder(ImageFolder, base / "train", chosen, train_tf)
    test = _SubsetImageFolder(ImageFolder, base / "val", chosen, test_tf)
    return DatasetBundle(name="imagenet100", train=train, test=test, num_classes=100,
                         image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         classes=chosen, label="ImageNet-100")


def _SubsetImageFolder(image_folder, path: Path, classes: list[str], transform):  # noqa: N802
    """An ImageFolder restricted to ``classes`` (labels 0..len-1 in that order)."""
    missing = [c for c in classes if not (path / c).is_dir()]
    if missing:
        raise EngineError(f"{path} lacks class folders {missing[:5]} ({len(missing)} missing)")

    class Subset(image_folder):
        def find_classes(self, directory):
            return list(classes), {c: i for i, c in enumerate(classes)}

    return Subset(str(path), transform=transform)


def load_folder(path: Path, *, image_size: int = 224) -> DatasetBundle:
    """Any ImageFolder tree (see the module docstring)."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise EngineError(
            f"image folder not found: {path.resolve()}; give folder:PATH with class"
            " sub-folders (optionally PATH/train and PATH/val)"
        )
    train_dir = path / "train" if (path / "train").is_dir() else path
    test_dir = next((path / s for s in ("val", "test") if (path / s).is_dir()), train_dir)
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                             transforms.ToTensor()])
    try:
        train, test = ImageFolder(str(train_dir), transform=tf), ImageFolder(str(test_dir),
                                                                             transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise EngineError(f"cannot read image folder {path}: {exc}") from None
    if train.classes != test.classes:
        raise EngineError(f"{train_dir} and {test_dir} have different class folders")
    return DatasetBundle(name=f"folder:{path}", train=train, test=test,
                         num_classes=len(train.classes), image_size=image_size,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=list(train.classes),
                         label=f"image folder {path}")


def augment_batch(images: torch.Tensor, generator: torch.Generator, *, padding: int = 4,
                  total: int | None = None, rows: slice | None = None) -> torch.Tensor:
    """Random crop (zero padding ``padding`` px) + horizontal flip of each image of a batch
    ``[N, 3, H, W]``, drawing from ``generator`` (CPU) only — the CIFAR-10 augmentation of the
    PAT / PGD-AT papers.

    Under DistributedDataParallel each rank holds ``rows`` of a global batch of ``total``
    images: the random parameters are drawn for all ``total`` and the rank's rows kept, so the
    augmentation does not depend on the number of processes.
    """
    n, _, h, w = images.shape
    total = n if total is None else total
    offsets = torch.randint(0, 2 * padding + 1, (total, 2), generator=generator)
    flips = torch.rand(total, generator=generator) < 0.5
    if rows is not None:
        offsets, flips = offsets[rows], flips[rows]
    if len(flips) != n:
        raise EngineError(f"augment_batch: {len(flips)} parameter rows for {n} images")
    padded = F.pad(images, (padding,) * 4)
    rows_ix = offsets[:, 0].to(images.device)[:, None] + torch.arange(h, device=images.device)
    cols_ix = offsets[:, 1].to(images.device)[:, None] + torch.arange(w, device=images.device)
    idx = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows_ix[:, :, None], cols_ix[:, None, :]]
    out = out.permute(0, 3, 1, 2)
    flips = flips.to(images.device)
    return torch.where(flips[:, None, None, None], out.flip(3), out).contiguous()


# --------------------------------------------------------------------------------------------
# Class names of stimulus sources (the label protocol, issue 18)
# --------------------------------------------------------------------------------------------

#: The documented class of each scikit-image photograph behind ``--images skimage``
#: (:data:`engine.data.BUNDLED_PHOTOGRAPHS`; what a person names when asked "what is in the
#: image?"): scikit-image's own descriptions — an astronaut (Eileen Collins), Chelsea the cat,
#: a cup of coffee, a rocket (Falcon 9) on its pad, galaxies (the Hubble deep field) and a
#: motorcycle.
SKIMAGE_CLASS_NAMES = {
    "astronaut": "astronaut",
    "chelsea": "cat",
    "coffee": "coffee",
    "rocket": "rocket",
    "hubble_deep_field": "galaxy",
    "stereo_motorcycle": "motorcycle",
}
#: Names ``--label-set`` understands besides a list or a file.
NAMED_LABEL_SETS = ("dataset", "imagenet100", "digits")


def imagenet_category_names() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (= sorted WordNet ID), as
    torchvision ships them with its weights' metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet100_class_names() -> list[str]:
    """ImageNet-100's 100 class names: every 10th ImageNet class by sorted WordNet ID (the
    classes of :func:`imagenet100_classes`), named as torchvision names them."""
    return imagenet_category_names()[::10]


def folder_class_names(root: str | Path) -> list[str]:
    """The class names of an image folder: its class sub-folders (relative POSIX paths of
    the folders holding images, sorted), i.e. the names behind :class:`engine.data.SourceImage`
    ``dataset_label`` indices of a folder source. A folder of 1000 ImageNet WordNet-ID class
    folders is named with the ImageNet class names (``n01440764`` → ``tench``)."""
    import re

    from .data import IMAGE_EXTENSIONS

    root = Path(root).expanduser()
    classes = sorted({p.parent.relative_to(root).as_posix() for p in root.rglob("*")
                      if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS} - {"."})
    if len(classes) == 1000 and all(re.fullmatch(r"n\d{8}", c) for c in classes):
        return imagenet_category_names()
    return classes


def _torchvision_classes(images: str) -> list[str]:
    """``classes`` of the torchvision dataset ``torchvision:NAME[:ROOT]`` (never downloaded;
    the test split, as :func:`engine.data.load_sources` reads it)."""
    import torchvision

    _, name, *rest = images.split(":", 2)
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise EngineError(f"torchvision has no dataset called {name!r}")
    root = rest[0] if rest else os.path.join("var", "datasets")
    try:
        try:
            dataset = cls(root=root, train=False, download=False)
        except TypeError:
            dataset = cls(root=root, download=False)
    except RuntimeError as exc:
        raise EngineError(f"torchvision dataset {name} not found under {os.path.abspath(root)}"
                          f" ({exc}); its classes are the label set") from exc
    classes = list(getattr(dataset, "classes", []))
    if not classes:
        raise EngineError(f"torchvision dataset {name} names no classes; give --label-set")
    return classes


def source_class_names(images: str, sources) -> dict[str, str | None]:
    """``{source id: true class name or None}`` for the sources of ``--images images``
    (:func:`engine.data.load_sources`): a folder's class sub-folders, a torchvision
    dataset's ``classes``, the scikit-image photographs' :data:`SKIMAGE_CLASS_NAMES`.
    ``None``: the source has no class (an image directly in the folder's root)."""
    out: dict[str, str | None] = {}
    if images == "skimage":
        for s in sources:
            loader = s.origin.removeprefix("skimage.data.").split(" ", 1)[0]
            out[s.id] = SKIMAGE_CLASS_NAMES.get(loader)
        return out
    if images.startswith("torchvision:"):
        classes = _torchvision_classes(images)
    else:
        classes = folder_class_names(images)
    for s in sources:
        label = s.dataset_label
        out[s.id] = classes[label] if label is not None and 0 <= label < len(classes) else None
    return out


def resolve_label_set(text: str | None, images: str = "skimage") -> tuple[str, ...]:
    """The label protocol's answers from ``--label-set``: ``a,b,c`` (a comma-separated
    list), a path to a text file (one class name a line; blank lines and ``#`` comments
    skipped), ``imagenet100`` (:func:`imagenet100_class_names`), ``digits`` (``0`` … ``9``)
    or ``dataset`` / ``None`` (the classes of ``images``: a folder's class sub-folders, a
    torchvision dataset's classes, the scikit-image photographs' documented names).
    :class:`EngineError` for an empty set, an empty name or a name given twice."""
    text = None if text is None else text.strip()
    if text in (None, "", "dataset"):
        if images == "skimage":
            names = list(SKIMAGE_CLASS_NAMES.values())
        elif images.startswith("torchvision:"):
            names = _torchvision_classes(images)
        else:
            if not Path(images).expanduser().is_dir():
                raise EngineError(f"image folder {images} does not exist (its class"
                                  " sub-folders would be the label set)")
            names = folder_class_names(images)
            if not names:
                raise EngineError(f"image folder {images} has no class sub-folders, so it"
                                  " has no label set: put each image in a folder named by its"
                                  " class, or give --label-set")
    elif text == "imagenet100":
        names = imagenet100_class_names()
    elif text == "digits":
        names = [str(i) for i in range(10)]
    elif Path(text).expanduser().is_file():
        lines = Path(text).expanduser().read_text().splitlines()
        names = [line.strip() for line in lines if line.strip() and not
                 line.strip().startswith("#")]
    else:
        names = [n.strip() for n in text.split(",")]
    return check_label_set(names)


def check_label_set(names) -> tuple[str, ...]:
    """``names`` as a tuple if it is a usable label set (non-empty, each name a non-empty
    string of at most 200 characters — ``Pair.class_name``, ``Judgment.response`` — without
    NUL characters, given once), else
    :class:`EngineError` naming the problem."""
    names = list(names)
    if not names:
        raise EngineError("the label set is empty: give class names (--label-set a,b,c)")
    for n in names:
        if not isinstance(n, str) or not n.strip() or n != n.strip():
            raise EngineError(f"label set entry {n!r} is not a class name (a non-empty"
                              " string without surrounding spaces)")
        if len(n) > 200:
            raise EngineError(f"class name {n[:40]!r}… is longer than 200 characters (a"
                              " judgment's response holds 200)")
        if "\x00" in n:
            raise EngineError(f"class name {n!r} contains a NUL character")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EngineError(f"class name(s) given twice in the label set: {', '.join(twice)}")
    return tuple(names)
