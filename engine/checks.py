"""Input validation shared by distances, attacks and stimuli."""

from __future__ import annotations

import torch

from .errors import EngineError

# Float rounding in colour conversions or interpolation can leave values a hair outside [0, 1].
RANGE_TOLERANCE = 1e-6


def check_images(x: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Check that ``x`` is a float batch ``[N, 3, H, W]`` with values in ``[0, 1]``.

    Returns ``x`` unchanged so the call can be used inline. Raises :class:`EngineError`
    naming the tensor and what is wrong with it.
    """
    if not isinstance(x, torch.Tensor):
        raise EngineError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise EngineError(
            f"{name} must have shape [N, 3, H, W] (RGB batch), got {list(x.shape)}"
        )
    if not x.is_floating_point():
        raise EngineError(f"{name} must be a float tensor with values in [0, 1], got {x.dtype}")
    if x.numel() == 0:
        raise EngineError(f"{name} is empty (shape {list(x.shape)})")
    with torch.no_grad():
        lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE or lo != lo or hi != hi:
        raise EngineError(
            f"{name} must have values in [0, 1], got range [{lo:.4g}, {hi:.4g}]"
            " (images in [0, 255] must be divided by 255 first)"
        )
    return x


def check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    """Check two image batches that are compared element by element."""
    check_images(x, "first images")
    check_images(y, "second images")
    if x.shape != y.shape:
        raise EngineError(
            f"image batches to compare must have the same shape, got {list(x.shape)}"
            f" and {list(y.shape)}"
        )
