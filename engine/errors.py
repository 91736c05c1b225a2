"""Exceptions raised by the engine. Each names the problem and, where possible, the fix."""


class EngineError(ValueError):
    """Bad input to the engine: an unknown name, a malformed spec, a tensor of the wrong shape."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but could not be loaded (offline, no cache)."""
