"""BAPPS 2AFC as the PerceptualSimilarity (LPIPS) repository loads and scores it. Tests only.

Source: github.com/richzhang/PerceptualSimilarity at commit 082bb24f84c091ea94de2867d34c4544f68e0963
(2023-12-19): ``data/image_folder.py`` (``make_dataset``), ``data/dataset/twoafc_dataset.py``
(``TwoAFCDataset``), ``data/custom_dataset_data_loader.py`` (``CustomDatasetDataLoader``) and
``lpips/trainer.py`` (``score_2afc_dataset``).

- ``score_2afc_dataset`` is imported unchanged from the authors' ``lpips`` package (PyPI
  ``lpips`` 0.1.4, a dependency already), which ships that function.
- The loader is not in the package: it is restated below step for step, in the authors' order
  (recursive sorted walk per folder, every folder sorted independently and paired by position,
  ``Resize(load_size)`` → ``ToTensor`` → ``Normalize(0.5, 0.5)``, judge ``np.load`` →
  ``reshape((1, 1, 1))`` → ``FloatTensor``). Only the repository's package plumbing
  (``BaseDataset.initialize``, ``BaseDataLoader``) is folded in, and the DataLoader runs in the
  test process (``num_workers=0``) instead of 4 worker processes.

Licence of the original (BSD 2-clause):

Copyright (c) 2018, Richard Zhang, Phillip Isola, Alexei A. Efros, Eli Shechtman, Oliver Wang
All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met:

* Redistributions of source code must retain the above copyright notice, this list of
  conditions and the following disclaimer.

* Redistributions in binary form must reproduce the above copyright notice, this list of
  conditions and the following disclaimer in the documentation and/or other materials provided
  with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR
IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY
THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
POSSIBILITY OF SUCH DAMAGE.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.utils.data
import torchvision.transforms as transforms
from lpips import score_2afc_dataset  # the authors' function, unchanged
from PIL import Image

__all__ = ["CreateDataLoader", "TwoAFCDataset", "make_dataset", "score_2afc_dataset"]

IMG_EXTENSIONS = [".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG", ".ppm", ".PPM", ".bmp",
                  ".BMP"]
NP_EXTENSIONS = [".npy"]


def is_image_file(filename, mode="img"):
    extensions = IMG_EXTENSIONS if mode == "img" else NP_EXTENSIONS
    return any(filename.endswith(extension) for extension in extensions)


def make_dataset(dirs, mode="img"):
    """data/image_folder.py: every matching file under each dir, walk order (not sorted)."""
    if not isinstance(dirs, list):
        dirs = [dirs]
    images = []
    for folder in dirs:
        assert os.path.isdir(folder), f"{folder} is not a valid directory"
        for root, _, fnames in sorted(os.walk(folder)):
            for fname in fnames:
                if is_image_file(fname, mode=mode):
                    images.append(os.path.join(root, fname))
    return images


class TwoAFCDataset(torch.utils.data.Dataset):
    """data/dataset/twoafc_dataset.py (``initialize`` folded into ``__init__``)."""

    def __init__(self, dataroots, load_size=64):
        if not isinstance(dataroots, list):
            dataroots = [dataroots]
        self.roots = dataroots
        self.load_size = load_size
        self.ref_paths = sorted(make_dataset([os.path.join(r, "ref") for r in self.roots]))
        self.p0_paths = sorted(make_dataset([os.path.join(r, "p0") for r in self.roots]))
        self.p1_paths = sorted(make_dataset([os.path.join(r, "p1") for r in self.roots]))
        self.transform = transforms.Compose([
            transforms.Resize(load_size),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])
        self.judge_paths = sorted(make_dataset([os.path.join(r, "judge") for r in self.roots],
                                               mode="np"))

    def __getitem__(self, index):
        p0_path = self.p0_paths[index]
        p0_img = self.transform(Image.open(p0_path).convert("RGB"))
        p1_path = self.p1_paths[index]
        p1_img = self.transform(Image.open(p1_path).convert("RGB"))
        ref_path = self.ref_paths[index]
        ref_img = self.transform(Image.open(ref_path).convert("RGB"))
        judge_path = self.judge_paths[index]
        judge_img = torch.FloatTensor(np.load(judge_path).reshape((1, 1, 1)))  # [0,1]
        return {"p0": p0_img, "p1": p1_img, "ref": ref_img, "judge": judge_img,
                "p0_path": p0_path, "p1_path": p1_path, "ref_path": ref_path,
                "judge_path": judge_path}

    def __len__(self):
        return len(self.p0_paths)


class CustomDatasetDataLoader:
    """data/custom_dataset_data_loader.py: ``load_data()`` is what ``score_2afc_dataset`` uses."""

    def __init__(self, dataroots, load_size=64, batch_size=1, serial_batches=True):
        self.dataset = TwoAFCDataset(dataroots, load_size=load_size)
        self.dataloader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, shuffle=not serial_batches, num_workers=0)

    def load_data(self):
        return self.dataloader

    def __len__(self):
        return len(self.dataset)


def CreateDataLoader(dataroot, load_size=64, batch_size=1):  # noqa: N802 (the authors' name)
    """data/data_loader.py for one 2AFC folder (their ``dataroot/2afc/<datafolder>``)."""
    return CustomDatasetDataLoader(str(dataroot), load_size=load_size, batch_size=batch_size)
