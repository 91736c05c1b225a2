"""Training loop: exact resume, DDP (2 CPU processes under torchrun) vs one process, logs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.datasets import load_dataset
from engine.errors import EngineError
from engine.train import PRESETS, TrainConfig, load_model, lr_factor, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=16)


def _config(out, **kw):
    base = dict(out=str(out), epochs=2, batch_size=64, milestones=(1,), progress=False,
                log_every=5)
    return TrainConfig(**{**base, **kw})


def _weights(run):
    return load_model(run).state_dict()


@pytest.mark.parametrize("method,params", [
    ("standard", {}),
    ("pgd_linf", {"bound": 0.1, "num_iterations": 2}),  # attack randomness and dropout-free
])
def test_resume_reproduces_uninterrupted_weights_exactly(tmp_path, digits, method, params):
    full = train(_config(tmp_path / "full", method=method, method_params=params), digits)
    part = tmp_path / "part"
    train(_config(part, method=method, method_params=params, stop_after=30), digits)
    assert not (part / "model.pt").exists()
    blob = torch.load(part / "checkpoint.pt", weights_only=False)
    assert (blob["epoch"], blob["batch"], blob["global_step"]) == (1, 8, 30)
    assert {"torch", "numpy", "python"} <= set(blob["rng"])
    train(_config(part, method=method, method_params=params), digits)
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader(open(part / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r["kind"] == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_resume_with_dropout_architecture_is_exact(tmp_path):
    """AlexNetCIFAR has dropout: the global torch RNG must be restored too."""
    bundle = load_dataset("digits", image_size=32)  # AlexNetCIFAR is a 32 px network
    bundle.train = torch.utils.data.Subset(bundle.train, range(256))
    bundle.test = torch.utils.data.Subset(bundle.test, range(32))
    kw = dict(arch="alexnet_cifar", epochs=2, batch_size=32, lr=0.01)
    full = train(_config(tmp_path / "full", **kw), bundle)
    train(_config(tmp_path / "part", stop_after=5, **kw), bundle)
    part = train(_config(tmp_path / "part", **kw), bundle)
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_records_config_code_seed_devices(tmp_path, digits):
    run = train(_config(tmp_path / "r", epochs=1, seed=3), digits)
    record = json.loads((run / "config.json").read_text())
    assert record["seed"] == 3 and record["config"]["seed"] == 3
    assert len(record["code"]["sha"]) == 40
    assert record["devices"]["device"] == "cpu" and record["devices"]["world_size"] == 1
    assert "digits" in record["dataset_label"]
    assert any((run / "tensorboard").iterdir())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r["kind"] == "epoch" and r["test_acc"] for r in rows)


def test_schedules_and_bad_config():
    pat = TrainConfig.from_preset("pat_cifar10")
    assert (pat.epochs, pat.batch_size, pat.weight_decay) == (100, 50, 2e-4)
    assert lr_factor(pat, 74.9) == 1 and lr_factor(pat, 75) == pytest.approx(0.1)
    assert lr_factor(pat, 95) == pytest.approx(0.01)
    cos = TrainConfig.from_preset("oaat_cifar10")
    assert lr_factor(cos, 0) == 1 and lr_factor(cos, cos.epochs) == pytest.approx(0)
    assert set(PRESETS) >= {"pat_cifar10", "pat_imagenet100"}
    with pytest.raises(EngineError, match="unknown preset"):
        TrainConfig.from_preset("nope")
    with pytest.raises(EngineError, match="schedule"):
        train(TrainConfig(schedule="linear"))
    with pytest.raises(EngineError, match="amp=bf16 needs a CUDA"):
        train(TrainConfig(amp="bf16", device="cpu"))


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    args = ["train", "--method", "standard", "--epochs", "1", "--image-size", "16",
            "--batch-size", "64", "--no-progress", "--device", "cpu", "--log-every", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "engine", *args, "--out", str(single)], check=True,
                   env=env, cwd=ROOT, timeout=300)
    ddp = tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2", "-m", "engine", *args, "--out", str(ddp)],
                   check=True, env=env, cwd=ROOT, timeout=300)
    record = json.loads((ddp / "config.json").read_text())
    assert record["devices"]["world_size"] == 2 and record["devices"]["backend"] == "gloo"
    a, b = _weights(single), _weights(ddp)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert any(not torch.equal(a[k], load_model(single).state_dict()[k] * 0) for k in a)
