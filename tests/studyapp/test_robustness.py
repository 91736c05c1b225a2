"""Defense results in the staff's hands: the robustness tables, page, figures and staff API
equal what the engine's ``evaluate`` wrote (results.json) and what ``manage.py analyze``
says about the study's people; the admin shows runs, results and checks read-only.

The engine trains a tiny defense on the toy digits dataset once per module (1 epoch, 16 px)
and evaluates it at a named bound, at numeric bounds, at "calibrated" bounds labelled like
the study's conditions, with the masking sanity checks; each test stores that real output
through ``evaluate_defense``'s own functions.
"""

from __future__ import annotations

import csv
import io
import json
import re
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.management import call_command

from engine.attacks.spec import condition_title
from studyapp.management.commands.evaluate_defense import store_results
from studyapp.management.commands.train_defense import run_engine
from studyapp.models import DefenseCheck, DefenseResult, DefenseRun, Participant
from studyapp.robustness import robustness_tables, store_checks
from studyapp.simulation import simulate

pytestmark = pytest.mark.django_db

#: The study's conditions (tests/studyapp/conftest.py CONDITIONS): labels small and large.
CALIBRATED = {"linf": {"small": 8 / 255, "large": 32 / 255}}


@pytest.fixture(scope="module")
def engine_output(tmp_path_factory) -> tuple[Path, Path, dict]:
    """``(run_dir, evaluation_dir, results.json)`` of a real tiny train + evaluate."""
    root = tmp_path_factory.mktemp("defense")
    run_dir, out = root / "run", root / "eval"
    assert run_engine(["train", "--out", str(run_dir), "--dataset", "digits", "--epochs", "1",
                       "--image-size", "16", "--device", "cpu", "--no-progress"]) == 0
    bounds = root / "bounds.json"
    bounds.write_text(json.dumps(CALIBRATED))
    assert run_engine(["evaluate", "--run", str(run_dir), "--out", str(out), "--spec",
                       "linf:bound=small,num_iterations=3", "--spec",
                       "l2:bound=1.5,num_iterations=3", "--calibrated", str(bounds),
                       "--calibrated-params", "linf=num_iterations=3", "--sanity",
                       "--limit", "10", "--image-size", "16", "--device", "cpu",
                       "--no-progress"]) == 0
    return run_dir, out, json.loads((out / "results.json").read_text())


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def evaluated(make_study, engine_output, settings, tmp_path):
    """A study with people's judgments and the engine's results stored against it."""
    settings.VAR_DIR = tmp_path
    run_dir, out, result = engine_output
    study = make_study(judgments_per_pair=3, trials_per_session=5)
    simulate(study, 4, seed=2)
    Participant.objects.filter(study=study).update(is_simulated=False)  # count as people
    run = DefenseRun.objects.create(name="digits-std", study=study, method="standard",
                                    arch="small", dataset="digits", run_dir=str(run_dir),
                                    dataset_label=result["dataset_label"], status="finished")
    store_results(result, [run], study, out)
    store_checks(result, [run], study, out)
    return study, run, result


@pytest.fixture
def staff_client(client):
    client.force_login(get_user_model().objects.create_user("boss", password="pw",
                                                            is_staff=True))
    return client


def analyze_json(study) -> dict:
    out = StringIO()
    call_command("analyze", "--study", study.slug, "--json", stdout=out, stderr=StringIO())
    return json.loads(out.getvalue())


def _engine_accuracies(result: dict) -> dict[str, float]:
    """``{column: accuracy}`` of results.json: table columns and calibrated levels."""
    (row,) = result["rows"]
    out = {k: v for k, v in row.items() if k not in ("model", "dataset", "images")}
    for item in result["perceptibility"][row["model"]]:
        out[f"{item['threat_model']} {item['level']}"] = item["accuracy"]
    return out


def test_tables_equal_the_engines_results_and_analyze(evaluated):
    study, run, result = evaluated
    from studyapp import dashboard_figures

    tables = robustness_tables(study, dashboard_figures.cached_summary(study)[0]["report"])
    engine = _engine_accuracies(result)
    acc = tables["accuracy"]
    summary = tables["summary"].iloc[0]
    (row,) = result["rows"]
    for name in ("clean", "union", "unseen_mean"):
        assert summary[name] == pytest.approx(row[name]), name
    assert summary["n_images"] == row["images"] == 10
    shown = dict(zip(acc["column"], acc["accuracy"], strict=True))
    assert shown == pytest.approx({k: v for k, v in engine.items()
                                   if k not in ("clean", "union", "unseen_mean")})
    # named, numeric and calibrated bounds, each labelled from its structured fields
    kinds = dict(zip(acc["column"], acc["kind"], strict=True))
    assert kinds["linf small"] == kinds["linf large"] == "calibrated"
    assert kinds["l2 1.5"] == "numeric"
    small = acc[acc["column"] == "linf small"].iloc[0]
    assert small["condition"] == condition_title("linf", 8 / 255, "small") == \
        "L∞ · small (ε = 0.0314)"
    assert small["units"] == "L∞ norm, pixels in [0, 1]"
    # the masking checks as the engine wrote them
    checks = result["sanity"][row["model"]]
    assert len(checks) >= 3
    assert tables["sanity"][["check", "detail", "value", "passed"]].to_dict("records") == [
        {k: c[k] for k in ("check", "detail", "value", "passed")} for c in checks]
    # equal perceptibility: analyze's number for the condition beside the engine's accuracy
    human = {r["label"]: r for r in analyze_json(study)["perceptibility"] if r["label"]}
    equal = tables["equal_perceptibility"]
    assert sorted(equal["label"]) == ["large", "small"]
    for r in equal.to_dict("records"):
        assert r["perceptibility"] == pytest.approx(human[r["label"]]["perceptibility"])
        assert r["boot_low"] == pytest.approx(human[r["label"]]["boot_low"])
        assert r["n_judgments"] == human[r["label"]]["n_judgments"]
        assert r["accuracy"] == pytest.approx(engine[f"linf {r['label']}"])
        assert r["condition_spec"] == human[r["label"]]["condition"]


def _cells(html: str, table_id: str) -> dict[tuple[str, str], str]:
    body = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    out = {}
    for row, content in re.findall(r'<tr data-row="([^"]*)">(.*?)</tr>', body, re.S):
        for col, text in re.findall(r'<td data-col="([^"]*)"[^>]*>([^<]*)(?=<)', content):
            out[(row, col)] = text
    return out


def test_robustness_page_api_and_downloads_show_the_same_numbers(evaluated, staff_client,
                                                                 client):
    study, run, result = evaluated
    engine = _engine_accuracies(result)
    html = staff_client.get(f"/dashboard/{study.slug}/robustness/").content.decode()
    acc = _cells(html, "accuracy")
    for column, value in engine.items():
        if column in ("clean", "union", "unseen_mean"):
            assert _cells(html, "summary")[(run.name, column)] == f"{value:.4f}", column
        else:
            assert acc[(f"{run.name}|{column}", "accuracy")] == f"{value:.4f}", column
    assert 'title="linf:bound=0.00784313725490196' in html  # the spec the engine ran, on hover
    assert "boot_low" not in re.findall(r"<th[^>]*>([^<]*)<", html)
    api = staff_client.get(f"/api/staff/studies/{study.slug}/robustness/").json()
    assert {r["column"]: r["accuracy"] for r in api["accuracy"]} == pytest.approx(
        {k: v for k, v in engine.items() if k not in ("clean", "union", "unseen_mean")})
    assert api["summary"][0]["union"] == pytest.approx(result["rows"][0]["union"])
    assert [c["passed"] for c in api["sanity"]] == [
        c["passed"] for c in result["sanity"][result["rows"][0]["model"]]]
    assert sorted(r["label"] for r in api["equal_perceptibility"]) == ["large", "small"]
    for name in ("robust_accuracy", "union", "equal_perceptibility"):
        base = f"/dashboard/{study.slug}/robustness/{name}"
        png = staff_client.get(f"{base}.png?download=1")
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert png["Content-Disposition"] == f'attachment; filename="{study.slug}-{name}.png"'
        assert b"<svg" in staff_client.get(f"{base}.svg").content
        rows = list(csv.DictReader(io.StringIO(staff_client.get(f"{base}.csv").content
                                               .decode())))
        assert rows, name
        if name == "equal_perceptibility":
            assert {r["label"]: float(r["accuracy"]) for r in rows} == pytest.approx(
                {r["label"]: r["accuracy"] for r in api["equal_perceptibility"]})
    assert staff_client.get(f"/dashboard/{study.slug}/robustness/nope.png").status_code == 404
    paths = staff_client.get("/api/schema/", {"format": "json"}).json()["paths"]
    assert "get" in paths["/api/staff/studies/{slug}/robustness/"]
    # staff only
    client.logout()
    assert client.get(f"/dashboard/{study.slug}/robustness/").status_code == 302
    assert client.get(f"/api/staff/studies/{study.slug}/robustness/").status_code == 403


def test_evaluate_defense_stores_the_sanity_checks(make_study, engine_output, tmp_path):
    """The command itself (engine run included) stores the checks next to the results."""
    run_dir, _, _ = engine_output
    study = make_study(with_pairs=False)
    DefenseRun.objects.create(name="r1", study=study, method="standard", arch="small",
                              dataset="digits", run_dir=str(run_dir), status="finished")
    out = StringIO()
    call_command("evaluate_defense", "--run", "r1", "--out", str(tmp_path / "e"), "--spec",
                 "linf:bound=0.05,num_iterations=2", "--sanity", "--limit", "4",
                 "--image-size", "16", "--device", "cpu", stdout=out)
    written = json.loads((tmp_path / "e" / "results.json").read_text())
    stored = list(DefenseCheck.objects.filter(study=study).values_list("name", "passed"))
    model = written["rows"][0]["model"]
    assert stored == [(c["check"], c["passed"]) for c in written["sanity"][model]]
    assert f"{len(stored)} sanity checks" in out.getvalue()


def test_admin_shows_defense_records_read_only(evaluated, client):
    study, run, _ = evaluated
    admin = get_user_model().objects.create_superuser("root", password="pw")
    client.force_login(admin)
    result = DefenseResult.objects.filter(run=run).first()
    check = DefenseCheck.objects.filter(run=run).first()
    for model, obj in (("defenserun", run), ("defenseresult", result),
                       ("defensecheck", check)):
        listing = client.get(f"/admin/studyapp/{model}/")
        assert listing.status_code == 200, model
        assert client.get(f"/admin/studyapp/{model}/add/").status_code == 403, model
        page = client.get(f"/admin/studyapp/{model}/{obj.pk}/change/")
        assert page.status_code == 200 and b'name="_save"' not in page.content, model
        assert client.post(f"/admin/studyapp/{model}/{obj.pk}/delete/",
                           {"post": "yes"}).status_code == 403, model
    before = DefenseResult.objects.get(pk=result.pk).accuracy
    client.post(f"/admin/studyapp/defenseresult/{result.pk}/change/", {"accuracy": "0.99"})
    assert DefenseResult.objects.get(pk=result.pk).accuracy == before
    assert DefenseRun.objects.filter(pk=run.pk).exists()


def test_a_study_without_defenses_has_an_empty_page_api_and_placeholder_figures(
        make_study, staff_client):
    study = make_study(with_pairs=False)
    html = staff_client.get(f"/dashboard/{study.slug}/robustness/").content.decode()
    assert 'id="accuracy">Nothing yet.' in html and "run <code>evaluate_defense --sanity" in html
    api = staff_client.get(f"/api/staff/studies/{study.slug}/robustness/").json()
    assert api == {"study": study.slug, "accuracy": [], "summary": [], "sanity": [],
                   "equal_perceptibility": []}
    for name in ("robust_accuracy", "union", "equal_perceptibility"):
        base = f"/dashboard/{study.slug}/robustness/{name}"
        assert staff_client.get(f"{base}.png").content[:4] == b"\x89PNG"
        header = staff_client.get(f"{base}.csv").content.decode().strip()
        assert header and "\n" not in header  # the columns, no rows
    assert staff_client.get("/api/staff/studies/nope/robustness/").status_code == 404
