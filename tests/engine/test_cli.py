"""python -m engine: subcommands, options and errors (in-process, no subprocess)."""

from __future__ import annotations

import json

import pytest

from engine.__main__ import main


def test_list_methods(capsys):
    assert main(["train", "--out", "unused", "--list-methods"]) == 0
    listed = capsys.readouterr().out
    for name in ("standard", "pgd_linf", "pgd_l2", "trades", "pat_self", "pat_alexnet",
                 "multi_random", "multi_average", "multi_max", "lagrangian",
                 "perceptual_prior", "pag", "oaat"):
        assert name in listed


def test_train_and_evaluate_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--method", "trades", "--set", "bound=0.05",
                 "--set", "num_iterations=2", "--epochs", "1", "--image-size", "16",
                 "--stop-after", "3", "--no-progress"]) == 0
    assert (run / "checkpoint.pt").is_file()  # stopped early: evaluate from the checkpoint
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--out", str(out), "--spec",
                 "linf:bound=0.05,num_iterations=2", "--limit", "16", "--image-size", "16",
                 "--logit-distances", "0.05", "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert "digits" in result["dataset_label"]
    row = result["rows"][0]
    assert row["model"].startswith("trades") and row["unseen_mean"] is None  # linf is seen
    assert "digits" in (out / "results.md").read_text()
    (distances,) = result["logit_distances"]
    assert 0 < distances["d_per"] and distances["d_intra"] > 0 and distances["xi"] == 0.05


@pytest.mark.parametrize("argv,message", [
    (["train", "--out", "x", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--out", "x", "--set", "bound"], "key=value"),
    (["train", "--out", "x", "--preset", "nope"], "unknown preset"),
    (["evaluate", "--run", "nowhere", "--out", "x", "--spec", "linf:bound=0.1"],
     "model not found"),
])
def test_errors_name_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
