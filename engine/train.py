"""The training loop: SGD with the papers' schedules, exact resume, logs, DDP under torchrun.

``train(TrainConfig(...))`` (or ``python -m engine train ...``) writes a run folder::

    RUN/config.json      config, git sha (+ dirty flag), seed, devices, world size, dataset label
    RUN/metrics.csv      one row per logged step and per epoch (test accuracy)
    RUN/tensorboard/     the same scalars for TensorBoard
    RUN/checkpoint.pt    latest checkpoint: model, optimiser, scheduler, every RNG, epoch, step
    RUN/model.pt         final weights + what is needed to rebuild the classifier (load_model)

Resuming (``resume=True``, the default when ``RUN/checkpoint.pt`` exists) continues from the
exact batch: batches are a seeded permutation per epoch, augmentation and attack randomness
come from generators seeded per (seed, epoch, batch, rank), and the global torch / CUDA /
numpy / Python RNG states are restored — so an interrupted and resumed run ends with the same
weights as an uninterrupted one (bit-exact on CPU with the in-memory datasets; ImageNet's
per-sample transforms in DataLoader workers are reproducible from epoch boundaries only).

Under ``torchrun --nproc-per-node N`` each global batch of ``batch_size`` images is split
across the N processes (``batch_size`` must divide by N) and DistributedDataParallel averages
the gradients, so N processes follow the single-process run (up to float reduction order).
On CUDA the loop uses bf16 autocast and channels_last unless told otherwise.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .architectures import Classifier, build_architecture
from .datasets import DatasetBundle, augment_batch, load_dataset
from .errors import EngineError
from .objectives import StepContext, build_method

SCHEDULES = ("multistep", "cosine", "constant")

#: The papers' optimiser settings (``--preset``). Milestones are epochs.
PRESETS: dict[str, dict[str, Any]] = {
    # PAT table 12 (CIFAR-10: as TRADES; ImageNet-100: as Kang et al.)
    "pat_cifar10": dict(epochs=100, batch_size=50, lr=0.1, momentum=0.9, weight_decay=2e-4,
                        schedule="multistep", milestones=(75, 90)),
    "pat_imagenet100": dict(epochs=90, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                            schedule="multistep", milestones=(30, 60, 80)),
    # PAG appendix C: ResNet-18, 100 epochs, SGD 0.01, momentum 0.9, wd 1e-4, batch 64
    "pag_cifar10": dict(epochs=100, batch_size=64, lr=0.01, momentum=0.9, weight_decay=1e-4,
                        schedule="constant", milestones=()),
    # OA-AT section 4: cosine learning-rate schedule (TRADES-AWP base: 5e-4 weight decay)
    "oaat_cifar10": dict(epochs=110, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                         schedule="cosine", milestones=()),
    # The CPU demo and tests (digits, tiny CNN)
    "digits": dict(epochs=10, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                   schedule="multistep", milestones=(8,)),
}


@dataclass
class TrainConfig:
    """Everything a run depends on (written to ``config.json``).

    ``batch_size`` is the global batch (split across torchrun processes); ``milestones`` are
    the epochs at which the learning rate is multiplied by ``gamma`` (``multistep``);
    ``stop_after`` ends the run after that many optimiser steps with a checkpoint (to
    interrupt on purpose; ``resume`` then continues it).
    """

    out: str = "var/runs/run"
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    image_size: int | None = None
    arch: str = "tiny"
    method: str = "standard"
    method_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    milestones: tuple[int, ...] = (8,)
    gamma: float = 0.1
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    num_workers: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    eval_limit: int | None = None
    stop_after: int | None = None
    resume: bool = True
    progress: bool = True

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> TrainConfig:
        if preset not in PRESETS:
            raise EngineError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides})

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise EngineError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise EngineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise EngineError(f"lr must be > 0, got {self.lr}")
        if self.amp not in ("auto", "bf16", "off"):
            raise EngineError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        if self.channels_last not in ("auto", "on", "off"):
            raise EngineError(f"channels_last must be auto, on or off, got {self.channels_last!r}")


def lr_factor(config: TrainConfig, epoch_float: float) -> float:
    """Learning-rate multiplier at a (fractional) epoch."""
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(epoch_float / config.epochs, 1.0)))
    return config.gamma ** sum(epoch_float >= m for m in config.milestones)


def git_version() -> dict[str, Any]:
    """``{'sha': ..., 'dirty': bool}`` of the checkout holding the engine (or 'unknown')."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=here, capture_output=True, text=True, timeout=10
                                    ).stdout.strip())
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown", "dirty": None}


def step_generator(seed: int, epoch: int, batch: int, rank: int = 0, stream: int = 0
                   ) -> torch.Generator:
    """A CPU generator for one (epoch, batch, rank, stream): reproducible and resumable."""
    value = (((seed * 1_000_003 + epoch) * 1_000_033 + batch) * 1_009 + rank) * 7 + stream
    return torch.Generator().manual_seed(value % (2**63 - 1))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation, last partial batch dropped."""
    order = torch.randperm(n, generator=step_generator(seed, epoch, -1, 0, 1)).tolist()
    return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


class _Batches(torch.utils.data.Sampler):
    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _bare(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """The classifier of a run folder (``model.pt``, else ``checkpoint.pt``) or a file made by
    :func:`train`, in eval mode."""
    file = _model_file(path)
    blob = torch.load(file, map_location="cpu", weights_only=False)
    info = blob.get("model_info") or {}
    if not info:
        raise EngineError(f"{file} is not a model or checkpoint written by engine.train")
    net = build_architecture(info["arch"], info["num_classes"], mean=tuple(info["mean"]),
                             std=tuple(info["std"]))
    net.load_state_dict(blob["model"])
    net.dataset_label = info.get("dataset_label", "")
    net.weights_label = f"trained by engine.train ({info.get('method')}, {file})"
    return net.to(device).eval()


def load_model_weights(net: nn.Module, path: str | Path) -> None:
    """Load the weights of a run folder / checkpoint into ``net`` (same architecture)."""
    blob = torch.load(_model_file(path), map_location="cpu", weights_only=False)
    net.load_state_dict(blob["model"])


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in ("model.pt", "checkpoint.pt"):
            if (path / name).is_file():
                return path / name
        raise EngineError(f"no model.pt or checkpoint.pt in run folder {path}")
    if not path.is_file():
        raise EngineError(f"model not found: {path} (give a run folder or a .pt file)")
    return path


class _Logger:
    """CSV + TensorBoard, on the main process only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = out / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        rows = []
        if self.path.exists() and resume_step:  # drop rows logged after the checkpoint
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        self.rows = rows
        self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step or None)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self.writer = None

    def _rewrite(self):
        keys = sorted({k for r in self.rows for k in r} - {"step", "epoch", "kind"})
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["kind", "epoch", "step", *keys])
            writer.writeheader()
            writer.writerows(self.rows)

    def log(self, kind: str, epoch: int, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "epoch": epoch, "step": step,
               **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()}}
        new_keys = set(row) - set(self.rows[0]) if self.rows else set(row)
        self.rows.append(row)
        if new_keys - {"kind", "epoch", "step"} or len(self.rows) == 1:
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as fh:
                keys = sorted({k for r in self.rows for k in r} - {"step", "epoch", "kind"})
                csv.DictWriter(fh, ["kind", "epoch", "step", *keys]).writerow(row)
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def accuracy(net: nn.Module, data, device: torch.device, *, limit: int | None = None,
             batch_size: int = 256) -> float:
    """Clean top-1 accuracy of ``net`` on (the first ``limit`` items of) a dataset."""
    net.eval()
    n = len(data) if limit is None else min(limit, len(data))
    correct = 0
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([x for x, _ in items]).to(device)
        labels = torch.tensor([int(y) for _, y in items], device=device)
        correct += int((net(images).argmax(1) == labels).sum())
    return correct / max(n, 1)


def _collate(items):
    images = torch.stack([x for x, _ in items])
    labels = torch.tensor([int(y) for _, y in items], dtype=torch.long)
    return images, labels


def train(config: TrainConfig, bundle: DatasetBundle | None = None) -> Path:
    """Train one model; returns the run folder. See the module docstring."""
    config.check()
    info = distributed.setup(config.device)
    try:
        return _train(config, info, bundle)
    finally:
        distributed.cleanup(info)


def _train(config: TrainConfig, info: distributed.DistInfo, bundle: DatasetBundle | None
           ) -> Path:
    out = Path(config.out)
    device = info.device
    if config.batch_size % info.world_size:
        raise EngineError(f"batch_size {config.batch_size} must divide by the number of"
                          f" processes ({info.world_size})")
    use_amp = device.type == "cuda" and config.amp in ("auto", "bf16")
    if config.amp == "bf16" and device.type != "cuda":
        raise EngineError("amp=bf16 needs a CUDA device; use amp=auto or off on CPU")
    channels_last = device.type == "cuda" and config.channels_last in ("auto", "on")
    if config.channels_last == "on" and device.type != "cuda":
        channels_last = True

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    bundle = bundle or load_dataset(config.dataset, config.data_root,
                                    image_size=config.image_size, download=config.download)
    net = build_architecture(config.arch, bundle.num_classes, mean=bundle.mean, std=bundle.std)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    method = build_method(config.method, config.method_params)
    method.bind(net, bundle)
    model: nn.Module = net
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    batches_per_epoch = len(bundle.train) // config.batch_size
    if batches_per_epoch < 1:
        raise EngineError(f"batch_size {config.batch_size} exceeds the {len(bundle.train)}"
                          " training images")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step / batches_per_epoch))
    total_steps = batches_per_epoch * config.epochs

    start_epoch, start_batch, global_step = 0, 0, 0
    checkpoint_path = out / "checkpoint.pt"
    if config.resume and checkpoint_path.is_file():
        blob = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        net.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        method.load_state_dict(blob["method"])
        start_epoch, start_batch, global_step = blob["epoch"], blob["batch"], blob["global_step"]
        rng_file = out / f"rng-rank{info.rank}.pt"
        rng = (blob["rng"] if info.rank == 0 else
               torch.load(rng_file, map_location="cpu", weights_only=False))
        _set_rng_state(rng)

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "config": asdict(config), "code": git_version(), "seed": config.seed,
            "dataset_label": bundle.label, "method": method.describe(),
            "devices": {"device": str(device), "world_size": info.world_size,
                        "backend": info.backend, "cuda": torch.cuda.get_device_name(device)
                        if device.type == "cuda" else None, "bf16_autocast": use_amp,
                        "channels_last": channels_last, "cpu_count": os.cpu_count()},
            "torch": torch.__version__, "python": platform.python_version(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "resumed_from_step": global_step,
        }
        (out / "config.json").write_text(json.dumps(record, indent=1, default=str))
    distributed.barrier(info)
    logger = _Logger(out, info.is_main, global_step)

    def save(epoch: int, batch: int) -> None:
        if info.is_main:
            _atomic_save({
                "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "method": method.state_dict(),
                "epoch": epoch, "batch": batch, "global_step": global_step,
                "rng": _rng_state(device), "config": asdict(config),
                "model_info": _model_info(config, bundle),
            }, checkpoint_path)
        else:
            _atomic_save(_rng_state(device), out / f"rng-rank{info.rank}.pt")
        distributed.barrier(info)

    local = config.batch_size // info.world_size
    rows = slice(info.rank, None, info.world_size)
    for epoch in range(start_epoch, config.epochs):
        batches = epoch_batches(len(bundle.train), config.batch_size, config.seed, epoch)
        first = start_batch if epoch == start_epoch else 0
        loader = torch.utils.data.DataLoader(
            bundle.train, batch_sampler=_Batches([b[rows] for b in batches[first:]]),
            num_workers=config.num_workers, collate_fn=_collate,
            generator=step_generator(config.seed, epoch, -2),
            pin_memory=device.type == "cuda")
        bar = tqdm(loader, total=len(batches) - first, initial=0,
                   desc=f"{config.method} epoch {epoch + 1}/{config.epochs}",
                   disable=not (config.progress and info.is_main), leave=False)
        tick, seen = time.perf_counter(), 0
        for batch_index, (images, labels) in enumerate(bar, start=first):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if config.augment and bundle.augmentation == "crop_flip":
                images = augment_batch(images, step_generator(config.seed, epoch, batch_index,
                                                              0, 2),
                                       total=config.batch_size, rows=rows)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            ctx = StepContext(net=net, progress=global_step / total_steps, step=global_step,
                              generator=step_generator(config.seed, epoch, batch_index,
                                                       info.rank, 3))
            model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, metrics = method.loss(model, images, labels, ctx)
            if not torch.isfinite(loss):
                raise EngineError(f"loss became {float(loss)} at step {global_step}"
                                  f" ({config.method}); lower lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.before_optimizer_step(net)
            optimizer.step()
            scheduler.step()
            method.after_step(net)
            global_step += 1
            seen += local * info.world_size
            if global_step % config.log_every == 0 or batch_index == len(batches) - 1:
                elapsed = time.perf_counter() - tick
                logger.log("train", epoch, global_step, {
                    "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0],
                    "images_per_s": seen / max(elapsed, 1e-9), **metrics})
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if config.checkpoint_every and global_step % config.checkpoint_every == 0:
                save(epoch, batch_index + 1)
            if config.stop_after is not None and global_step >= config.stop_after:
                save(epoch, batch_index + 1)
                logger.close()
                return out
        if info.is_main:
            rng = _rng_state(device)  # evaluation must not change the training randomness
            acc = accuracy(net, bundle.test, device, limit=config.eval_limit)
            _set_rng_state(rng)
            logger.log("epoch", epoch, global_step, {"test_acc": acc})
        save(epoch + 1, 0)
    if info.is_main:
        _atomic_save({"model": net.state_dict(), "model_info": _model_info(config, bundle),
                      "config": asdict(config)}, out / "model.pt")
    distributed.barrier(info)
    logger.close()
    return out


def _model_info(config: TrainConfig, bundle: DatasetBundle) -> dict[str, Any]:
    return {"arch": config.arch, "num_classes": bundle.num_classes, "mean": list(bundle.mean),
            "std": list(bundle.std), "dataset": bundle.name, "dataset_label": bundle.label,
            "method": config.method, "method_params": dict(config.method_params)}


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
