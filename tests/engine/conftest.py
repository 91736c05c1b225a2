"""Shared engine fixtures: a small real classifier to attack, trained in a few seconds.

``digits_model`` is a tiny CNN trained on scikit-learn's handwritten digits (real labelled
images that ship with the package), upsampled to 16×16 RGB in ``[0, 1]``. Every attack test
can use ``digits_model`` + ``digits_batch`` (held-out images it classifies correctly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models import ImageClassifier, Normalize

DIGITS_SIZE = 16
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.25
DIGITS_BATCH_SIZE = 64
DIGITS_MIN_TEST_ACCURACY = 0.90


@dataclass(frozen=True)
class DigitsData:
    """scikit-learn digits as ``[N, 3, 16, 16]`` images in ``[0, 1]`` and int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def digits_to_images(pixels, size: int = DIGITS_SIZE) -> Tensor:
    """sklearn digits rows (64 values in 0..16) → ``[N, 3, size, size]`` floats in ``[0, 1]``."""
    images = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def make_digits_network() -> nn.Module:
    """A two-conv CNN for 16×16 RGB digits, returning 10 logits."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8×8
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch CPU ops on ``count`` threads, then restore the previous setting.

    The digits networks are so small that extra threads only add synchronisation; on a
    busy 2-core machine (tests running side by side) two threads made training ~5× slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Use in tests of tiny models (``pytestmark = pytest.mark.usefixtures(...)``)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits_data() -> DigitsData:
    """A fixed, stratified train/test split of scikit-learn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SEED, stratify=digits.target,
    )
    return DigitsData(
        train_images=digits_to_images(x_train),
        train_labels=torch.as_tensor(y_train, dtype=torch.long),
        test_images=digits_to_images(x_test),
        test_labels=torch.as_tensor(y_test, dtype=torch.long),
    )


@pytest.fixture(scope="session")
def digits_model(digits_data: DigitsData) -> ImageClassifier:
    """A CNN trained on digits (CPU, fixed seed, ~2 s): ``[N, 3, 16, 16]`` in ``[0, 1]`` →
    10 logits, eval mode, > 90% held-out accuracy (asserted). Do not mutate it (session
    scope); ``copy.deepcopy`` it first."""
    generator = torch.Generator().manual_seed(DIGITS_SEED)
    with torch.random.fork_rng():
        torch.manual_seed(DIGITS_SEED)
        network = make_digits_network()
    model = ImageClassifier(network, normalize=Normalize(mean=(0.5,) * 3, std=(0.5,) * 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, labels = digits_data.train_images, digits_data.train_labels
    model.train()
    with torch_threads(1):
        for _epoch in range(8):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(order), 64):
                batch = order[start:start + 64]
                loss = F.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            predictions = model(digits_data.test_images).argmax(1)
    accuracy = float((predictions == digits_data.test_labels).float().mean())
    assert accuracy > DIGITS_MIN_TEST_ACCURACY, f"digits model test accuracy {accuracy:.3f}"
    model.test_accuracy = accuracy
    return model


@pytest.fixture(scope="session")
def digits_batch(digits_model: ImageClassifier, digits_data: DigitsData) -> tuple[Tensor, Tensor]:
    """(images ``[64, 3, 16, 16]``, labels ``[64]``): held-out digits the model gets right."""
    with torch.no_grad():
        correct = digits_model(digits_data.test_images).argmax(1) == digits_data.test_labels
    index = correct.nonzero().squeeze(1)[:DIGITS_BATCH_SIZE]
    assert len(index) == DIGITS_BATCH_SIZE
    return digits_data.test_images[index].clone(), digits_data.test_labels[index].clone()
