"""python -m engine generate: 2 torchrun ranks write the same manifest and PNGs as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["generate", "--spec", "linf:bound=4/255,num_iterations=2", "--spec",
        "l2:bound=0.5,num_iterations=2", "--classifier", "resnet18:untrained", "--lpips",
        "alexnet:untrained", "--size", "32", "--max-images", "5", "--batch-size", "2",
        "--sentinels", "2", "--catch", "1", "--device", "cpu", "--no-progress"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_ranks_give_the_same_manifest_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # The two runs are independent (own folders; torchrun's store on a free port): run them
    # side by side, which on two cores takes about the time of the longer one.
    runs = [
        subprocess.Popen([sys.executable, "-m", "engine", *ARGS, "--out", str(one)],
                         env=_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "engine", *ARGS, "--out", str(two)],
                         env=_env(), cwd=ROOT, stderr=subprocess.PIPE, text=True),
    ]
    try:
        errors = [run.communicate(timeout=300)[1] for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    for run, error in zip(runs, errors, strict=True):
        assert run.returncode == 0, f"{run.args}: {error[-3000:]}"
    a = json.loads((one / "manifest.json").read_text())
    b = json.loads((two / "manifest.json").read_text())
    assert a == b
    assert (one / "manifest.csv").read_bytes() == (two / "manifest.csv").read_bytes()
    pairs = a["pairs"]
    assert sum(p["is_sentinel"] for p in pairs) == 2 and sum(p["is_catch"] for p in pairs) == 1
    assert sum(p["condition"] is not None for p in pairs) == 10  # 5 images × 2 specs
    for p in pairs:
        assert (two / p["other_path"]).read_bytes() == (one / p["other_path"]).read_bytes()


def test_bad_generate_input_is_a_clear_error(tmp_path):
    from engine.__main__ import main

    code = main(["generate", "--out", str(tmp_path), "--spec", "nope:bound=1", "--classifier",
                 "resnet18:untrained", "--lpips", "alexnet:untrained", "--size", "32",
                 "--max-images", "2", "--device", "cpu", "--no-progress"])
    assert code == 2


def test_the_manifest_carries_hashes_labels_networks_and_versions(tmp_path, capsys):
    import hashlib

    from engine.__main__ import main
    from engine.stimuli import Manifest

    out = tmp_path / "out"
    code = main(["generate", "--out", str(out), "--spec", "linf:num_iterations=1", "--bounds",
                 "small,0.05@mine", "--classifier", "resnet18:untrained", "--lpips",
                 "alexnet:untrained", "--size", "32", "--max-images", "2", "--device", "cpu",
                 "--seed", "3", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "UNTRAINED networks used" in printed and "classifier resnet18" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    assert sorted(c["label"] for c in manifest["conditions"]) == ["mine", "small"]
    assert all(c["level"] is None for c in manifest["conditions"])
    gen = manifest["generator"]
    assert [(n["role"], n["weights"]) for n in gen["networks"]] == [
        ("classifier", "untrained"), ("lpips", "untrained")]
    assert gen["untrained"] == ["classifier resnet18", "LPIPS alexnet"]
    assert gen["seed"] == 3 and gen["request"]["seed"] == 3
    assert gen["code_version"].startswith("perceptlab ")
    # The untrained LPIPS network's distances are stored under a name that says so.
    assert all("lpips_alexnet_untrained" in p["distances"] for p in manifest["pairs"])
    read = Manifest.read(out)
    assert read.to_json() == manifest


def test_ladder_levels_are_recorded_in_the_manifest(tmp_path):
    from engine.__main__ import main

    out = tmp_path / "out"
    assert main(["generate", "--out", str(out), "--spec", "linf:num_iterations=1", "--bounds",
                 "0.01,0.04", "--ladder", "3", "--classifier", "resnet18:untrained",
                 "--lpips", "alexnet:untrained", "--size", "32", "--max-images", "1",
                 "--sentinels", "0", "--device", "cpu", "--no-progress"]) == 0
    conditions = json.loads((out / "manifest.json").read_text())["conditions"]
    assert [(c["label"], c["level"]) for c in conditions] == [("L0", 0), ("L1", 1), ("L2", 2)]
    assert [c["bound"] for c in conditions] == pytest.approx([0.01, 0.02, 0.04])
