"""Pure-PyTorch helpers shared by both sides of the attack benchmark.

Imported by ``bench/attacks.py`` (our environment) and by ``bench/_advex.py`` (the reference
environment ``bench/.venv``, which has no ``engine``): so only ``torch`` and the standard
library here.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

#: Relative slack when counting an output as inside the LPIPS ball (float rounding only; the
#: engine's attacks use the same 1e-6).
FEASIBLE_SLACK = 1e-6
#: Marks the reference worker's JSON replies on stdout (anything else there is ignored).
REPLY_PREFIX = "@@bench-reply "


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(call: Callable[[], Tensor], device: torch.device | str
          ) -> tuple[float, float, Tensor]:
    """Run ``call`` once; return (wall seconds, CPU seconds of this process, its result).

    GPU work is synchronised before both clock readings. CPU seconds add up every thread of
    the process (``time.process_time``): steadier than wall time on a shared machine.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def median(values: list[float]) -> float:
    return float(statistics.median(values))


@dataclass
class PassCounts:
    """Forward and backward passes through one network, in units of full batches.

    A pass over a subset of ``k`` of the ``n`` images counts ``k / n`` (the reference LPA and
    both Newton projections work on subsets). ``calls`` counts invocations whatever their size.
    """

    batch: int
    forward: float = 0.0
    backward: float = 0.0
    forward_calls: int = 0
    backward_calls: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"forward": self.forward, "backward": self.backward,
                "forward_calls": self.forward_calls, "backward_calls": self.backward_calls}


@dataclass
class PassCounter:
    """Counts passes through networks by hooks on their first layer.

    The first layer sees every pass whichever method runs the network (``forward``,
    ``features``, a hooked sub-trunk), so this works identically for our modules and the
    reference implementation's ``FeatureModel``s. A backward pass is counted when the gradient
    w.r.t. the first layer's output is computed (a tensor hook), i.e. when a backward pass
    went through the whole network.
    """

    batch: int
    counts: dict[str, PassCounts] = field(default_factory=dict)

    @contextlib.contextmanager
    def watch(self, layers: dict[str, nn.Module]) -> Iterator[dict[str, PassCounts]]:
        handles = []
        seen: set[int] = set()
        for name, layer in layers.items():
            if id(layer) in seen:  # self-bounded: classifier and LPIPS are one network
                continue
            seen.add(id(layer))
            counts = self.counts.setdefault(name, PassCounts(self.batch))
            handles.append(layer.register_forward_hook(self._hook(counts)))
        try:
            yield self.counts
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, counts: PassCounts):
        def on_forward(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            rows = output.shape[0]
            counts.forward += rows / self.batch
            counts.forward_calls += 1
            if output.requires_grad:
                def on_backward(grad: Tensor) -> None:
                    counts.backward += rows / self.batch
                    counts.backward_calls += 1
                output.register_hook(on_backward)

        return on_forward


def first_conv(network: nn.Module) -> nn.Module:
    """The first ``Conv2d`` of ``network`` in module order (where every pass starts)."""
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError(f"{type(network).__name__} has no Conv2d to count passes on")


def profile_table(call: Callable[[], object], rows: int = 18) -> str:
    """One call under ``torch.profiler`` (CPU activities): the operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def write_markdown_section(path, start: str, end: str, block: str) -> None:
    """Replace the text from marker ``start`` to marker ``end`` in the Markdown file ``path``
    by ``block`` (which carries both markers), or append it; everything else is kept.

    The one section writer of ``bench/``: the file is re-read just before writing and replaced
    atomically, so a concurrent edit of another section survives.
    """
    from pathlib import Path

    path = Path(path)
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nResults of the scripts in `bench/`, each written by the script itself"
        " with the command that produced it.\n"
    )
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
