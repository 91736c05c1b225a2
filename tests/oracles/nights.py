"""NIGHTS as the DreamSim repository loads and scores it. Tests only.

Source: github.com/ssundaram21/dreamsim (the authors' repository) at commit
db4d16c6948314e36e2e62f0bae2ee23bc974bf3 (2025-11-24): ``dataset/dataset.py``
(``TwoAFCDataset``), ``util/utils.py`` (``get_preprocess_fn``) and ``evaluation/score.py``
(``score_nights_dataset``). None of these ship in the ``dreamsim`` PyPI package (it packages the
model only), so they are restated below step for step, in the authors' order. Kept as they
are on purpose: ``data.csv`` is read with pandas and indexed by *position* (``iloc`` 0 = id,
2 = the right image's vote fraction, 4/5/6 = reference/left/right paths), rows with
``votes < 6`` are dropped, then the split is selected; scoring is
``(d0 < d1)·(1 − p) + (d1 < d0)·p + (d1 == d0)·½`` with d0 = distance to the left image.
Only ``logging``/``print``/``tqdm`` output is left out.

Checked again on 2026-12-02 against a mirror of that commit (``git show db4d16c:`` of
``dataset/dataset.py``, ``util/utils.py``, ``evaluation/score.py``): the restatement matches
theirs step for step. Their first release (077b5571, 2023-06-15) accepted only
``train``/``val`` among the plain splits (``test`` raised ``ValueError``);
``test_imagenet``/``test_no_imagenet``, which ``evaluation/eval_percep.py`` uses, behave the
same in both.

The column *names* of ``data.csv`` are not in the authors' code beyond ``votes``, ``split`` and
``is_imagenet``. The other names come from readers of the released file by name:
TIGER-AI-Lab/UniIR @ 669475c ``src/data/preprocessing/nights_data_preprocessor.py`` (``id``,
``right_vote`` as the text ``"0"``/``"1"``, ``ref_path``, ``left_path``, ``right_path``,
``split``, ``is_imagenet``), TIGER-AI-Lab/Mantis @ 44d20bf ``data/dream_sim/prepare.py``
(``left_vote``, ``right_vote``, ``prompt`` and the paths) and candemircan/naturalcogsci @
5739738 ``bin/analyse_nights.py`` (``votes >= 6``, ``~is_imagenet``, ``left_vote == 1``).
They agree with the positions above; positions 1 and 3 (``left_vote``, ``votes`` in our
header) are read by no code we found. ``tests/engine/test_release_formats.py`` checks our
files against those by-name uses too (without copying that code).

Licence of the original (MIT):

Copyright (c) 2023 Shobhita Sundaram, Netanel Tamir, Stephanie Fu, Richard Zhang

Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

__all__ = ["TwoAFCDataset", "get_preprocess_fn", "score_nights_dataset"]


def get_preprocess_fn(preprocess, load_size, interpolation):
    """util/utils.py."""
    if preprocess == "LPIPS":
        t = transforms.ToTensor()
        return lambda pil_img: t(pil_img.convert("RGB")) / 0.5 - 1.0
    if preprocess == "DEFAULT":
        t = transforms.Compose([
            transforms.Resize((load_size, load_size), interpolation=interpolation),
            transforms.ToTensor(),
        ])
    elif preprocess == "DISTS":
        t = transforms.Compose([transforms.Resize((256, 256)), transforms.ToTensor()])
    elif preprocess == "SSIM" or preprocess == "PSNR":
        t = transforms.ToTensor()
    else:
        raise ValueError(f"Unknown preprocessing method: {preprocess}")
    return lambda pil_img: t(pil_img.convert("RGB"))


class TwoAFCDataset(Dataset):
    """dataset/dataset.py."""

    def __init__(self, root_dir: str, split: str = "train", load_size: int = 224,
                 interpolation=transforms.InterpolationMode.BICUBIC, preprocess: str = "DEFAULT",
                 **kwargs):
        self.root_dir = root_dir
        self.csv = pd.read_csv(os.path.join(self.root_dir, "data.csv"))
        self.csv = self.csv[self.csv["votes"] >= 6]  # their filter: at least 6 unanimous votes
        self.split = split
        self.load_size = load_size
        self.interpolation = interpolation
        self.preprocess_fn = get_preprocess_fn(preprocess, self.load_size, self.interpolation)
        if split in ("train", "val", "test"):
            self.csv = self.csv[self.csv["split"] == split]
        elif split == "test_imagenet":
            self.csv = self.csv[self.csv["split"] == "test"]
            self.csv = self.csv[self.csv["is_imagenet"] == True]  # noqa: E712 (theirs)
        elif split == "test_no_imagenet":
            self.csv = self.csv[self.csv["split"] == "test"]
            self.csv = self.csv[self.csv["is_imagenet"] == False]  # noqa: E712 (theirs)
        else:
            raise ValueError(f"Invalid split: {split}")

    def __len__(self):
        return len(self.csv)

    def __getitem__(self, idx):
        id = self.csv.iloc[idx, 0]  # noqa: A001 (theirs)
        p = self.csv.iloc[idx, 2].astype(np.float32)
        img_ref = self.preprocess_fn(Image.open(os.path.join(self.root_dir,
                                                             self.csv.iloc[idx, 4])))
        img_left = self.preprocess_fn(Image.open(os.path.join(self.root_dir,
                                                              self.csv.iloc[idx, 5])))
        img_right = self.preprocess_fn(Image.open(os.path.join(self.root_dir,
                                                               self.csv.iloc[idx, 6])))
        return img_ref, img_left, img_right, p, id


def score_nights_dataset(model, test_loader, device):
    """evaluation/score.py: the 2AFC score of ``model(img_ref, img_other)`` distances."""
    d0s, d1s, targets = [], [], []
    with torch.no_grad():
        for img_ref, img_left, img_right, target, _idx in test_loader:
            img_ref, img_left, img_right, target = (img_ref.to(device), img_left.to(device),
                                                    img_right.to(device), target.to(device))
            dist_0 = model(img_ref, img_left)
            dist_1 = model(img_ref, img_right)
            if len(dist_0.shape) < 1:
                dist_0 = dist_0.unsqueeze(0)
                dist_1 = dist_1.unsqueeze(0)
            d0s.append(dist_0.unsqueeze(1))
            d1s.append(dist_1.unsqueeze(1))
            targets.append(target.unsqueeze(1))
    d0s = torch.cat(d0s, dim=0)
    d1s = torch.cat(d1s, dim=0)
    targets = torch.cat(targets, dim=0)
    scores = (d0s < d1s) * (1.0 - targets) + (d1s < d0s) * targets + (d1s == d0s) * 0.5
    return torch.mean(scores, dim=0)
