"""manage.py train_defense / evaluate_defense delegate to the engine and record the results."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from studyapp.models import DefenseResult, DefenseRun, Study


@pytest.mark.django_db
def test_train_then_evaluate_records_results_attached_to_a_study(tmp_path):
    study = Study.objects.create(slug="s1", title="S1")
    run_dir = tmp_path / "run"
    call_command("train_defense", "--name", "digits-std", "--study", "s1", "--out",
                 str(run_dir), "--epochs", "1", "--image-size", "16", "--device", "cpu",
                 stdout=io.StringIO())
    run = DefenseRun.objects.get(name="digits-std")
    assert run.status == "finished" and run.study == study
    assert "digits" in run.dataset_label and (run_dir / "model.pt").is_file()
    calibrated = tmp_path / "bounds.json"
    calibrated.write_text(json.dumps({"linf": {"p10": 0.02, "p50": 0.08}}))
    out = tmp_path / "eval"
    call_command("evaluate_defense", "--run", "digits-std", "--out", str(out), "--spec",
                 "linf:bound=0.05,num_iterations=3", "--spec", "l2:bound=small,num_iterations=3",
                 "--calibrated", str(calibrated),
                 "--limit", "20", "--image-size", "16", "--device", "cpu",
                 stdout=io.StringIO())
    results = {r.column: r for r in DefenseResult.objects.filter(run=run)}
    assert {"clean", "linf 0.05", "union", "linf p10", "linf p50"} <= set(results)
    assert all(r.study == study for r in results.values())
    assert results["linf 0.05"].bound == pytest.approx(0.05)
    assert results["linf p50"].perceptibility == "p50"
    # Structured columns from the engine, not parsed from text: threat model, bound, label.
    named = results[next(c for c in results if c.startswith("l2 "))]
    assert (named.threat_model, named.label) == ("l2", "small")
    assert named.bound == pytest.approx(600 / 255) and named.spec.startswith("l2:bound=")
    plain = results["linf 0.05"]
    assert (plain.threat_model, plain.label) == ("linf", "")
    assert plain.spec.startswith("linf:bound=0.05,num_iterations=3")
    p50 = results["linf p50"]
    assert (p50.threat_model, p50.label, p50.bound) == ("linf", "p50", 0.08)
    assert p50.spec.startswith("linf:bound=0.08,")
    assert (results["union"].threat_model, results["union"].bound) == ("union", None)
    assert results["union"].accuracy <= results["linf 0.05"].accuracy
    assert (out / "results.md").is_file() and (out / "perceptibility.png").is_file()


@pytest.mark.django_db
def test_unknown_run_or_study_is_a_clear_error():
    with pytest.raises(CommandError, match="no defense run named 'nope'"):
        call_command("evaluate_defense", "--run", "nope", "--spec", "linf:bound=0.1")
    with pytest.raises(CommandError, match="no study with slug 'nope'"):
        call_command("train_defense", "--name", "x", "--study", "nope")
