"""A robust (PGD-AT) torchvision AlexNet on scikit-learn digits at 64 px, for the attack bench.

    .venv/bin/python bench/_trained.py              # train (or reuse the cache) and report
    .venv/bin/python bench/_trained.py --retrain    # train again

Why: timing perceptual attacks on an untrained network measures almost nothing but the first
step (every image falls at once, so early exit decides the cost). Against an adversarially
trained classifier the attacks need their iterations. No pretrained weights or data sets can
be downloaded here, so the classifier is trained in a few CPU minutes on a data set that ships
inside a package: scikit-learn's 8×8 handwritten digits (1,797 images), upsampled bilinearly to
``SIZE`` px and repeated over 3 channels (engine.datasets.load_digits; 80/20 split, fixed seed).

Model: torchvision's AlexNet with 10 classes behind the ImageNet normalisation (an
:class:`engine.models.ImageClassifier`), so the PAT authors' code can load the very same state
dict (their ``AlexNetFeatureModel`` wraps a torchvision AlexNet) and the self-bounded case (the
classifier's own 5 ReLUs define LPIPS) exists on both sides. Training: ``STANDARD_EPOCHS``
epochs of plain cross-entropy, then ``ADV_EPOCHS`` epochs of PGD-AT (Madry et al.): L∞ PGD at
``ADV_BOUND`` with ``ADV_ITERATIONS`` steps (the engine's ``linf`` attack), Adam,
batch 64, one thread. Cached in ``bench/out/trained/`` (ignored by git) with its accuracies;
the cache key holds every setting, so changing one retrains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from engine.attacks import parse_attack  # noqa: E402
from engine.datasets import load_digits  # noqa: E402
from engine.models import ImageClassifier  # noqa: E402

SIZE = 64
STANDARD_EPOCHS = 4
ADV_EPOCHS = 4
ADV_BOUND = "16/255"
ADV_ITERATIONS = 3
BATCH = 64
LR = 1e-3
SEED = 0
HIDDEN = 512
CACHE = BENCH / "out" / "trained"
LABEL = (f"AlexNet (torchvision features, 256-512-512-10 head) PGD-AT on scikit-learn digits"
         f" at {SIZE} px"
         f" (L∞ {ADV_BOUND}, {ADV_ITERATIONS} steps; {STANDARD_EPOCHS}+{ADV_EPOCHS} epochs,"
         " trained by bench/_trained.py)")


def _key() -> str:
    return (f"alexnet{HIDDEN}_digits{SIZE}_pgdat_{ADV_BOUND.replace('/', 'o')}_{ADV_ITERATIONS}it_"
            f"{STANDARD_EPOCHS}+{ADV_EPOCHS}ep_b{BATCH}_adam{LR:g}_s{SEED}")


def build() -> ImageClassifier:
    """The untrained architecture (the state dict's layout): torchvision's AlexNet whose
    ``features`` (the 5 convolutions, ReLUs and pools) are unchanged and whose head is sized
    for 64 px digits. At 64 px the features end at 256×1×1, which torchvision's
    ``AdaptiveAvgPool2d(6)`` would copy 36 times into a 9216-wide, 58M-parameter head — 60 %
    of the compute for nothing. Here ``avgpool`` keeps the 1×1 map and the head is
    256 → 512 → 512 → 10 (dropout as torchvision's). Built from torch/torchvision classes only,
    so the PAT authors' ``AlexNetFeatureModel`` (which calls ``model.avgpool`` and
    ``model.classifier``) runs the same network."""
    torch.manual_seed(SEED)
    network = torchvision.models.alexnet(weights=None, num_classes=10)
    network.avgpool = nn.AdaptiveAvgPool2d(1)
    network.classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256, HIDDEN), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(inplace=True),
        nn.Linear(HIDDEN, 10),
    )
    return ImageClassifier(network)


@torch.no_grad()
def accuracy(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def robust_accuracy(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor,
                    spec: str) -> float:
    result = parse_attack(spec)(model, images, labels, generator=torch.Generator().manual_seed(1))
    return float((result.logits.argmax(1) == labels).float().mean())


def train(progress: bool = True) -> tuple[ImageClassifier, dict]:
    torch.manual_seed(SEED)
    data = load_digits(SIZE)
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    attack = parse_attack(f"linf:bound={ADV_BOUND},num_iterations={ADV_ITERATIONS}")
    generator = torch.Generator().manual_seed(SEED)
    started = time.process_time()
    epochs = STANDARD_EPOCHS + ADV_EPOCHS
    for epoch in range(epochs):
        order = torch.randperm(len(y_train), generator=generator)
        batches = order.split(BATCH)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                   dynamic_ncols=True)
        for rows in bar:
            x, y = x_train[rows], y_train[rows]
            if epoch >= STANDARD_EPOCHS:
                x = attack(model, x, y, generator=generator).adversarial
            model.train()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    info = {
        "label": LABEL,
        "clean_accuracy": accuracy(model, x_test, y_test),
        "train_cpu_s": time.process_time() - started,
        "test_images": len(y_test),
    }
    info["pgd10_accuracy"] = robust_accuracy(
        model, x_test[:128], y_test[:128], f"linf:bound={ADV_BOUND},num_iterations=10")
    return model, info


def load_trained(*, retrain: bool = False, progress: bool = True
                 ) -> tuple[ImageClassifier, dict]:
    """The cached robust classifier (eval mode, parameters frozen) and its facts; trains it
    first when the cache is missing (about 5–15 CPU minutes on one thread)."""
    path = CACHE / f"{_key()}.pt"
    if path.exists() and not retrain:
        saved = torch.load(path, weights_only=False)
        model = build()
        model.network.load_state_dict(saved["state"])
        info = saved["info"]
    else:
        model, info = train(progress)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.network.state_dict(), "info": info}, path)
        (CACHE / f"{_key()}.json").write_text(json.dumps(info, indent=1))
    model.eval().requires_grad_(False)
    return model, info


def digits_test_batch(n: int, model: ImageClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test digits that ``model`` classifies correctly, and their labels (an
    attack on an image already misclassified has nothing to do)."""
    data = load_digits(SIZE)
    x, y = data.test.tensors
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    x, y = x[correct][:n], y[correct][:n]
    if len(y) < n:
        raise SystemExit(f"only {len(y)} correctly classified test digits for a batch of {n}")
    return x.contiguous(), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, info = load_trained(retrain=args.retrain)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
