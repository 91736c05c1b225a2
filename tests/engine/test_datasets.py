"""engine.datasets: digits, missing-data errors, ImageNet-100 classes, ImageFolder, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.datasets import augment_batch, imagenet100_classes, load_dataset
from engine.errors import EngineError


def test_digits_are_32px_rgb_in_unit_range_with_a_fixed_disjoint_split():
    a, b = load_dataset("digits"), load_dataset("digits")
    image, label = a.train[0]
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
    assert a.num_classes == 10 and 0 <= int(label) < 10
    assert len(a.train) + len(a.test) == 1797
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    train_set = {t.numpy().tobytes() for t in a.train.tensors[0][:200]}
    assert not train_set & {t.numpy().tobytes() for t in a.test.tensors[0]}
    assert "digits" in a.label


def test_missing_datasets_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(EngineError, match=f"looked for {tmp_path}.*--download"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(EngineError, match="ImageNet not found.*image-net.org"):
        load_dataset("imagenet100", tmp_path)
    with pytest.raises(EngineError, match="image folder not found"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(EngineError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_imagenet100_is_every_tenth_sorted_wordnet_id():
    wnids = [f"n{i:08d}" for i in range(1000, 0, -1)]
    chosen = imagenet100_classes(wnids)
    assert len(chosen) == 100 and chosen[0] == "n00000001" and chosen[1] == "n00000011"
    with pytest.raises(EngineError, match="found 5 class folders"):
        imagenet100_classes(wnids[:5])


def test_image_folder(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((20, 24, 3), 99, np.uint8)).save(
                tmp_path / split / cls / "a.png")
    bundle = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert bundle.num_classes == 2 and bundle.classes == ["cat", "dog"]
    image, label = bundle.test[1]
    assert image.shape == (3, 16, 16) and label == 1


def test_augmentation_is_seeded_and_independent_of_the_process_split():
    images = torch.rand(8, 3, 16, 16)
    full = augment_batch(images, torch.Generator().manual_seed(1))
    again = augment_batch(images, torch.Generator().manual_seed(1))
    assert torch.equal(full, again) and not torch.equal(full, images)
    half = augment_batch(images[1::2], torch.Generator().manual_seed(1), total=8,
                         rows=slice(1, None, 2))
    assert torch.equal(half, full[1::2])
