"""The whole loop at tiny CPU scale, each step through its real command (issue 15, item 7):

1. ``python -m engine generate`` on 2 torchrun ranks (gloo);
2. ``import_pairs``;
3. ``simulate_observers``;
4. ``calibrate``;
5. ``generate_pairs --bounds calibrated:SLUG``;
6. ``train_defense``;
7. ``evaluate_defense`` at named and calibrated bounds;
8. the study's robustness page in Chromium: its numbers equal ``results.json``.

Every number checked against the step that produced it: the calibrated conditions carry the
calibration's presets and labels, the stored defense results equal ``results.json``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from engine.attacks import parse_attack
from studyapp.models import Calibration, Condition, DefenseResult, Pair, Study

ROOT = Path(__file__).resolve().parents[2]
NETS = ["--classifier", "resnet18:untrained", "--lpips", "alexnet:untrained"]
SMALL = ["--size", "32", "--max-images", "3", "--device", "cpu", "--no-progress"]
# Five bounds around the simulated observers' threshold (4/255): named ones and numbers.
BOUNDS = "0.004,small,medium,large,0.08@huge"


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.django_db(transaction=True)  # the live server thread reads what the commands wrote
def test_the_loop_from_gpu_box_folder_to_defense_results(
    settings, tmp_path, live_server, chromium_executable, monkeypatch
):
    settings.MEDIA_ROOT = tmp_path / "media"
    folder = tmp_path / "gpu-box"
    # 1. the GPU box: two ranks, gloo on CPU
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "engine", "generate", "--out", str(folder), "--spec", "linf:num_iterations=1",
         "--bounds", BOUNDS, "--batch-size", "2", *NETS, *SMALL],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "UNTRAINED networks used" in done.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["pairs"]) == 3 * 5 + 3

    # 2. the web box
    out = run("import_pairs", str(folder), "--study", "loop")
    assert "18 pairs created" in out and "UNTRAINED" in out
    study = Study.objects.get(slug="loop")
    labels = dict(Condition.objects.filter(study=study).values_list("label", "bound"))
    assert labels["small"] == pytest.approx(2 / 255) and labels["huge"] == 0.08
    study.judgments_per_pair, study.trials_per_session = 40, 16
    study.save()

    # 3. simulated observers (threshold 4/255 on the bound), 4. calibrate
    run("simulate_observers", "--study", "loop", "--n", "40", "--threshold", "linf=0.0157",
        "--slope", "3", "--seed", "1", "--no-progress")
    run("calibrate", "--study", "loop", "--include-simulated", "--n-boot", "20",
        "--lapse", "0.02")
    presets = Calibration.objects.get(study=study).presets["linf"]
    assert set(presets) == {"p10", "p25", "p50"}
    assert 0.004 < presets["p10"] < presets["p25"] < presets["p50"] < 0.08

    # 5. pairs at the calibrated bounds, labelled by the calibration's labels
    run("generate_pairs", "--study", "loop-calibrated", "--spec", "linf:num_iterations=1",
        "--bounds", "calibrated:loop", *NETS, *SMALL)
    made = {c.label: c for c in Condition.objects.filter(study__slug="loop-calibrated")}
    assert {k: c.bound for k, c in made.items()} == presets  # exact: no float matching
    for label, c in made.items():
        assert parse_attack(c.spec).bound == presets[label]
        assert Pair.objects.filter(condition=c).count() == 3

    # 6. a defense (digits, tiny network), 7. evaluated at named and calibrated bounds
    run_dir, evaluation = tmp_path / "run", tmp_path / "evaluation"
    run("train_defense", "--name", "loop-pgd", "--study", "loop", "--method", "pgd_linf",
        "--set", "bound=4/255", "--set", "num_iterations=2", "--epochs", "1",
        "--image-size", "16", "--out", str(run_dir), "--device", "cpu")
    run("evaluate_defense", "--run", "loop-pgd", "--out", str(evaluation), "--spec",
        "linf:bound=small,num_iterations=3", "--spec", "linf:bound=large,num_iterations=3",
        "--calibrated", "calibrated:loop", "--limit", "20", "--image-size", "16",
        "--device", "cpu")
    result = json.loads((evaluation / "results.json").read_text())
    stored = {r.column: r for r in DefenseResult.objects.filter(study=study)}
    row, = result["rows"]
    for column, info in result["column_info"][row["model"]].items():
        if row[column] is None:
            continue
        assert stored[column].accuracy == row[column]  # every stored number is the engine's
        assert stored[column].label == info["label"]
    named = {r.label: r for r in stored.values() if r.label in ("small", "large")}
    assert named["small"].bound == pytest.approx(2 / 255) and named["small"].threat_model == (
        "linf")
    calibrated = {r.perceptibility: r for r in stored.values() if r.perceptibility}
    assert {k: r.bound for k, r in calibrated.items()} == presets
    for item in result["perceptibility"][row["model"]]:
        assert calibrated[item["label"]].accuracy == item["accuracy"]
    # Accuracy falls (weakly) as the calibrated bound grows, within one image of 20.
    accs = [calibrated[k].accuracy for k in ("p10", "p25", "p50")]
    assert all(b <= a + 1 / 20 for a, b in zip(accs, accs[1:], strict=False))

    # 8. the robustness page in Chromium shows exactly those numbers
    from django.contrib.auth import get_user_model
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # ORM next to Playwright's loop
    get_user_model().objects.create_user("loop-staff", password="l00p-pw!", is_staff=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_executable, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{live_server.url}/staff/")
            page.fill("#id_username", "loop-staff")
            page.fill("#id_password", "l00p-pw!")
            page.click("input[type=submit]")
            page.wait_for_url(f"{live_server.url}/staff/")
            page.goto(f"{live_server.url}/dashboard/loop/robustness/")
            shown = 0
            for column, value in row.items():
                if column in ("model", "dataset", "images"):
                    continue
                text = "–" if value is None else f"{value:.4f}"
                if column in ("clean", "union", "unseen_mean"):
                    cell = f'#summary tr[data-row="loop-pgd"] td[data-col="{column}"]'
                else:
                    cell = f'#accuracy tr[data-row="loop-pgd|{column}"] td[data-col="accuracy"]'
                assert page.inner_text(cell) == text, column
                shown += 1
            assert shown >= 3
        finally:
            browser.close()
