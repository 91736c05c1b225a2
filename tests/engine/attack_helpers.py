"""Helpers shared by the attack test modules (imported by name: tests/engine is on sys.path)."""

from __future__ import annotations

from torch import nn


class ModeRecorder(nn.Module):
    """Wraps a model and records ``self.training`` at every forward pass."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.inner(x)
