"""Architectures that torchvision does not ship: the small-image networks of the seed papers.

Every network here takes raw images in ``[0, 1]`` (``[N, 3, H, W]``) unless it is wrapped by
the caller with a normalisation; weight loading lives in :mod:`engine.models`.
"""

from __future__ import annotations

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class AlexNetCIFAR(nn.Module):
    """The CIFAR-10 AlexNet of the PAT paper (perceptual-advex's ``CifarAlexNet``).

    PAT uses it as the LPIPS network for its CIFAR-10 bounds (table 2: 0.5 is measured with
    *this* network, trained on CIFAR-10). Layer layout is identical to the authors' so that a
    state dict trained with their code loads here (keys ``features.*`` and ``classifier.*``).
    Input: ``[N, 3, 32, 32]``; the five ReLU outputs of ``features`` are the LPIPS layers.
    """

    #: Indices in ``features`` of the five ReLUs whose outputs LPIPS compares.
    lpips_relu_indices = (1, 4, 7, 9, 11)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
