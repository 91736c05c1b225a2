"""studyapp.frames (the DataFrames the engine reads) and analyze's --json/--figures/simulated;
analyze's counts and progress are the staff API's (studyapp.reports)."""

from __future__ import annotations

import json
from io import StringIO

import numpy as np
import pandas as pd
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from studyapp.frames import JUDGMENT_COLUMNS, judgments_frame, pairs_frame, study_frames
from studyapp.models import Judgment, Participant, Session
from studyapp.reports import study_counts, study_progress
from studyapp.scheduler import complete_session, record_judgment, start_session
from studyapp.simulation import simulate

pytestmark = pytest.mark.django_db


def answer_all(session: Session, pattern) -> None:
    for trial in session.trials.order_by("position"):
        record_judgment(session, {
            "position": trial.position,
            "response": "different" if pattern(trial) else "same",
            "response_time_ms": 500.0 + trial.position,
            "durations": {"first_ms": 1000.0, "blank_ms": 250.0, "second_ms": 1000.0},
            "idempotency_key": f"{session.pk}-{trial.position}",
        })
    complete_session(session)


@pytest.fixture
def answered(make_study):
    study = make_study(trials_per_session=5, practice_trials=2, judgments_per_pair=3,
                       catch_pairs=1, catch_fraction=0.2)
    people = []
    for i in range(3):
        p = Participant.objects.create(study=study, external_id=f"p{i}")
        s = start_session(p)
        answer_all(s, lambda t, i=i: (t.pair_id + i) % 2 == 0)
        people.append(s)
    Session.objects.filter(pk=people[0].pk).update(excluded=True, exclusion_reason="test")
    simulate(study, 2, seed=1)
    return study, people


def test_frames_hold_every_main_judgment_with_its_flags(answered):
    study, people = answered
    pairs, judgments = pairs_frame(study), judgments_frame(study)
    assert list(judgments.columns) == JUDGMENT_COLUMNS
    main = Judgment.objects.filter(
        trial__is_practice=False, trial__session__participant__study=study
    )
    assert len(judgments) == main.count() > 0
    assert Judgment.objects.filter(trial__is_practice=True).count() > 0  # practice left out
    truth = {
        j.trial.pair_id * 10_000 + j.trial.session_id: (
            j.response == "different", j.trial.session.excluded,
            j.trial.session.participant.is_simulated, j.response_time_ms,
            j.trial.session.participant_id,
        )
        for j in main.select_related("trial__session__participant")
    }
    got = {
        int(r.pair) * 10_000 + int(r.session): (
            bool(r.different), bool(r.excluded), bool(r.simulated), r.response_ms,
            int(r.participant))
        for r in judgments.itertuples()
    }
    assert got == truth
    assert judgments["excluded"].sum() == main.filter(trial__session__excluded=True).count()
    assert judgments.loc[judgments["simulated"], "participant"].nunique() == 2
    # pairs: one row per pair, distances expanded, controls without condition
    assert len(pairs) == study.pairs.count() and pairs["pair"].is_unique
    data = pairs[pairs["condition"].notna()]
    assert np.allclose(data["linf"], data["bound"])
    assert pairs.loc[pairs["is_sentinel"] | pairs["is_catch"], "condition"].isna().all()
    assert pairs["success"].isna().all() and pairs["level"].isna().all()


def test_study_frames_leave_out_excluded_and_simulated_by_default(answered):
    study, people = answered
    _, default = study_frames(study)
    assert not default["excluded"].any() and not default["simulated"].any()
    _, everything = study_frames(study, include_excluded=True, include_simulated=True)
    assert len(everything) == len(judgments_frame(study)) > len(default)


def _json(study, *args) -> dict:
    out = StringIO()
    call_command("analyze", "--study", study.slug, "--json", "--n-boot", "50", *args, stdout=out)
    return json.loads(out.getvalue())


def test_analyze_json_counts_match_an_independent_count(answered, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    study, _ = answered
    report = _json(study)
    table = pd.DataFrame(report["perceptibility"]).set_index("condition")
    main = Judgment.objects.filter(
        trial__is_practice=False, trial__session__excluded=False,
        trial__session__participant__is_simulated=False,
    )
    for condition in study.conditions.all():
        rows = main.filter(trial__pair__condition=condition)
        n, k = rows.count(), rows.filter(response="different").count()
        assert table.loc[condition.spec, "n_judgments"] == n
        if n:
            assert table.loc[condition.spec, "perceptibility"] == pytest.approx(k / n)
            assert table.loc[condition.spec, "boot_low"] <= k / n <= table.loc[
                condition.spec, "boot_high"]
    sentinel = main.filter(trial__pair__is_sentinel=True)
    assert table.loc["sentinel", "n_judgments"] == sentinel.count()
    with_sim = pd.DataFrame(_json(study, "--include-simulated")["perceptibility"])
    simulated = Judgment.objects.filter(trial__is_practice=False,
                                        trial__session__participant__is_simulated=True).count()
    assert with_sim["n_judgments"].sum() == table["n_judgments"].sum() + simulated
    assert simulated > 0


def test_analyze_counts_and_progress_are_the_staff_apis(answered, make_study, settings,
                                                       tmp_path, client):
    settings.VAR_DIR = tmp_path
    study, _ = answered
    # a session still running, with its practice trials answered only; and another study
    running = start_session(Participant.objects.create(study=study, external_id="late"))
    practice = running.trials.filter(is_practice=True).order_by("position")
    assert practice.count() == 2
    for trial in practice:
        record_judgment(running, {
            "position": trial.position, "response": "same", "response_time_ms": 600.0,
            "durations": {"first_ms": 1000.0, "blank_ms": 250.0, "second_ms": 1000.0},
            "idempotency_key": f"late-{trial.position}",
        })
    other = make_study(slug="other", practice_trials=1)
    answer_all(start_session(Participant.objects.create(study=other, external_id="o")),
               lambda t: True)

    report = _json(study)
    client.force_login(get_user_model().objects.create_user("s", password="pw", is_staff=True))
    api_progress = client.get(f"/api/staff/studies/{study.slug}/progress/").json()
    api_row = next(r for r in client.get("/api/staff/studies/").json()
                   if r["slug"] == study.slug)
    assert report["progress"] == api_progress == json.loads(json.dumps(study_progress(study)))
    assert report["counts"] == {k: v for k, v in api_row.items() if k in report["counts"]}
    assert report["counts"] == study_counts()[study.pk] == study_counts(study)[study.pk]
    assert set(study_counts(study)) == {study.pk}
    # practice judgments and control pairs counted apart, the same way on every surface
    main = Judgment.objects.filter(trial__session__participant__study=study)
    n_practice = main.filter(trial__is_practice=True).count()
    assert report["counts"]["n_practice_judgments"] == n_practice == 3 * 2 + 2 * 2 + 2
    assert report["counts"]["n_judgments"] == main.count() - n_practice
    by = {row["condition"]: row for row in report["progress"]["conditions"]}
    assert by["sentinel"]["n_pairs_at_k"] is None and by["catch"]["n_pairs_at_k"] is None
    assert by["sentinel"]["n_pairs"] == report["counts"]["n_sentinel_pairs"] == 3
    assert by["catch"]["n_pairs"] == report["counts"]["n_catch_pairs"] == 1
    assert sum(r["n_judgments"] for r in by.values()) == report["counts"]["n_judgments"]
    assert report["progress"]["sessions"] == {
        "started": 6, "completed": 5, "in_progress": 1, "abandoned": 0, "excluded": 1}
    # the printed header says the same
    out = StringIO()
    call_command("analyze", "--study", study.slug, "--n-boot", "0", "--csv",
                 str(tmp_path / "a.csv"), stdout=out)
    header = out.getvalue().splitlines()[0]
    assert f"{report['counts']['n_judgments']} main-trial judgments" in header
    assert f"+{n_practice} practice" in header and "6 started, 5 completed" in header


def test_analyze_writes_figures_and_tables(answered, tmp_path):
    study, _ = answered
    out = StringIO()
    call_command("analyze", "--study", study.slug, "--csv", str(tmp_path / "a.csv"),
                 "--figures", str(tmp_path / "fig"), "--n-boot", "20", stdout=out)
    text = out.getvalue()
    assert "Left out 1 session(s) excluded" in text and "Left out 2 simulated" in text
    for name in ("fig4a", "fig4b", "fig4c", "fig5", "psychometric"):
        assert (tmp_path / "fig" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (tmp_path / "fig" / f"{name}.svg").read_bytes()[:1000]
        pd.read_csv(tmp_path / "fig" / f"{name}.csv")  # parses
    assert (tmp_path / "a_correlations.csv").exists() and (tmp_path / "a_participants.csv").exists()
    parts = pd.read_csv(tmp_path / "a_participants.csv")
    assert len(parts) == 2  # 3 people, one excluded; simulated left out


def test_analyze_refuses_a_negative_bootstrap(answered):
    with pytest.raises(CommandError, match="--n-boot must be >= 0"):
        call_command("analyze", "--study", answered[0].slug, "--n-boot", "-1")


def test_analyze_figures_follow_the_include_flags(answered, tmp_path):
    study, _ = answered
    data = Judgment.objects.filter(trial__is_practice=False, trial__session__excluded=False,
                                   trial__pair__condition__isnull=False)
    for flag, expected in (([], data.filter(trial__session__participant__is_simulated=False)),
                           (["--include-simulated"], data)):
        out = tmp_path / f"fig{len(flag)}"
        call_command("analyze", "--study", study.slug, "--csv", str(tmp_path / "a.csv"),
                     "--figures", str(out), "--n-boot", "0", *flag, stdout=StringIO())
        curve = pd.read_csv(out / "psychometric.csv")
        assert curve.loc[curve["kind"] == "data", "n_judgments"].sum() == expected.count() > 0
