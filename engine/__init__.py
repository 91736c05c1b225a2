"""PyTorch engine of the perceptual-study platform.

Pure PyTorch + numpy/pandas/scipy: this package never imports Django, so it runs alone on a
GPU box (``python -m engine ...``). Images everywhere are float tensors ``[N, 3, H, W]`` with
values in ``[0, 1]``; bounds are stated in those units unless a docstring says otherwise.
"""
