"""Quality control: IP/browser hashing, per-session metrics, exclusion rules, analyze/quality."""

from __future__ import annotations

import csv
from io import StringIO

import pytest
from django.contrib.sessions.middleware import SessionMiddleware
from django.core.management import call_command
from django.http import HttpResponse
from django.test import RequestFactory
from qc_sessions import CAREFUL, DIFF, SAME, SLOPPY, C, P, S, make_answered_session

from studyapp.fingerprints import assign_request_fingerprints, browser_hash, client_ip, hash_ip
from studyapp.models import Judgment, Session
from studyapp.quality import (
    STAFF_EXCLUDE,
    STAFF_INCLUDE,
    apply_exclusions,
    compute_quality,
    set_staff_decision,
)

# ------------------------------------------------------------------------------ hashing


def test_hash_ip_is_a_salted_sha256_that_never_contains_the_address(settings):
    settings.PERCEPTLAB_IP_SALT = None
    h = hash_ip("203.0.113.7")
    assert len(h) == 64 and int(h, 16) >= 0
    assert "203" not in h and h == hash_ip(" 203.0.113.7 ")
    assert hash_ip("::1") == hash_ip("0:0::1")  # canonical form
    assert hash_ip("203.0.113.7:51234") == h  # a port some proxies append is dropped
    assert hash_ip("") == ""
    settings.SECRET_KEY = "another-secret-key-" * 3
    assert hash_ip("203.0.113.7") != h  # derived from SECRET_KEY without a salt ...
    settings.PERCEPTLAB_IP_SALT = "salt-one"
    salted = hash_ip("203.0.113.7")
    settings.SECRET_KEY = "yet-another-secret-key-" * 3
    assert hash_ip("203.0.113.7") == salted  # ... an explicit salt survives key rotation
    settings.PERCEPTLAB_IP_SALT = "salt-two"
    assert hash_ip("203.0.113.7") != salted


@pytest.mark.parametrize(
    "proxies,forwarded,remote,expected",
    [
        (0, "198.51.100.9", "10.0.0.1", "10.0.0.1"),  # header ignored without a trusted proxy
        (1, "198.51.100.9", "10.0.0.1", "198.51.100.9"),
        (1, "6.6.6.6, 198.51.100.9", "10.0.0.1", "198.51.100.9"),  # client-sent spoof ignored
        (2, "6.6.6.6, 198.51.100.9, 10.0.0.2", "10.0.0.1", "198.51.100.9"),
        (2, "198.51.100.9", "10.0.0.1", "198.51.100.9"),  # fewer hops than proxies
        (1, "not-an-ip", "10.0.0.1", "10.0.0.1"),
        (1, "", "10.0.0.1", "10.0.0.1"),
        (1, "[2001:db8::1]:443", "10.0.0.1", "2001:db8::1"),
    ],
)
def test_client_ip_trusts_x_forwarded_for_only_behind_proxies(
    settings, proxies, forwarded, remote, expected
):
    settings.PERCEPTLAB_TRUSTED_PROXIES = proxies
    request = RequestFactory().get("/", REMOTE_ADDR=remote, HTTP_X_FORWARDED_FOR=forwarded)
    assert client_ip(request) == expected


def test_browser_hash_needs_a_browser_id():
    ua = "Mozilla/5.0 (X11; Linux x86_64) Chrome/130"
    screen = {"screen_width": 1920, "screen_height": 1080, "device_pixel_ratio": 1}
    assert browser_hash(ua, screen) == ""  # UA + screen alone: shared by strangers
    a = browser_hash(ua, {**screen, "browser_id": "a" * 32})
    assert len(a) == 64 and a == browser_hash(ua, {**screen, "browser_id": "a" * 32})
    assert a != browser_hash(ua, {**screen, "browser_id": "b" * 32})
    assert a != browser_hash(ua + " Edg/130", {**screen, "browser_id": "a" * 32})


def _start_request(django_session_from=None, ip="203.0.113.7"):
    request = RequestFactory().post(
        "/study/x/", REMOTE_ADDR=ip, HTTP_USER_AGENT="Mozilla/5.0 (pytest)"
    )
    middleware = SessionMiddleware(lambda r: HttpResponse())
    if django_session_from is None:
        middleware.process_request(request)
    else:
        request.session = django_session_from.session
    return request


@pytest.mark.django_db
def test_assign_request_fingerprints_stores_hashes_only(study, new_session, settings):
    settings.PERCEPTLAB_TRUSTED_PROXIES = 0
    first_request = _start_request()
    one = assign_request_fingerprints(new_session(study), first_request)
    two = assign_request_fingerprints(new_session(study), _start_request(first_request))
    other_browser = assign_request_fingerprints(new_session(study), _start_request())
    for s in (one, two, other_browser):
        s.refresh_from_db()
        assert s.ip_hash == hash_ip("203.0.113.7")
        stored = repr(Session.objects.filter(pk=s.pk).values().get())
        assert "203.0.113.7" not in stored
    assert one.browser_hash and one.browser_hash == two.browser_hash  # same browser (cookie)
    assert other_browser.browser_hash not in ("", one.browser_hash)
    browser_id = first_request.session["perceptlab_browser_id"]
    assert browser_id not in repr(Session.objects.filter(pk=one.pk).values().get())


# ------------------------------------------------------------------------------ metrics


@pytest.mark.django_db
def test_metrics_per_session(study):
    sloppy = make_answered_session(
        study,
        SLOPPY,
        practice=[(S, DIFF, 10), (C, SAME, 10)],  # practice never counts
    )
    (q,) = compute_quality(study)
    assert q.session_id == sloppy.pk
    assert (q.n_main_trials, q.n_answered) == (10, 10)
    assert (q.n_sentinel, q.n_sentinel_different) == (5, 2)
    assert q.sentinel_false_alarm_rate == pytest.approx(0.4)
    assert (q.n_catch, q.n_catch_different, q.catch_hit_rate) == (2, 1, 0.5)
    assert (q.n_fast, q.fast_share) == (3, pytest.approx(0.3))
    assert q.violations == [] and not q.excluded  # every rule is off by default


@pytest.mark.django_db
def test_rates_without_trials_are_none_and_never_exclude(study):
    study.min_catch_hit_rate = 0.9
    study.max_sentinel_false_alarm = 0.1
    study.save()
    make_answered_session(study, [(P, DIFF, 900), (P, SAME, 800)])
    (q,) = apply_exclusions(study)
    assert q.catch_hit_rate is None and q.sentinel_false_alarm_rate is None
    assert not q.excluded


@pytest.mark.django_db
def test_apply_exclusions_names_each_rule_with_numbers_and_keeps_the_session(study):
    study.max_sentinel_false_alarm = 0.25
    study.min_catch_hit_rate = 0.8
    study.max_fast_share = 0.2
    study.save()
    sloppy = make_answered_session(study, SLOPPY)
    careful = make_answered_session(study, CAREFUL)
    unfinished = make_answered_session(study, SLOPPY[:3], completed=False)
    rows = apply_exclusions(study)
    assert [q.session_id for q in rows] == [sloppy.pk, careful.pk]  # completed sessions only
    sloppy.refresh_from_db()
    careful.refresh_from_db()
    unfinished.refresh_from_db()
    assert sloppy.excluded
    assert sloppy.exclusion_reason == (
        "sentinel false-alarm rate 0.40 > 0.25 (2/5 identical pairs answered 'different');"
        " catch-trial hit rate 0.50 < 0.80 (1/2 obviously different pairs answered"
        " 'different'); fast-response share 0.30 > 0.20 (3/10 responses faster than 150 ms)"
    )
    assert sloppy.quality["sentinel_false_alarm_rate"] == pytest.approx(0.4)
    assert sloppy.quality["rules"]["max_sentinel_false_alarm"] == 0.25
    assert sloppy.quality["excluded_by"] == "rules"
    assert not careful.excluded and careful.exclusion_reason == ""
    assert careful.quality["catch_hit_rate"] == 1.0
    assert not unfinished.excluded and unfinished.quality == {}
    assert Judgment.objects.filter(trial__session=sloppy).count() == 10  # nothing deleted


@pytest.mark.django_db
def test_apply_exclusions_is_idempotent_and_a_relaxed_rule_unexcludes(study):
    study.max_sentinel_false_alarm = 0.25
    study.save()
    sloppy = make_answered_session(study, SLOPPY)

    def state():
        sloppy.refresh_from_db()
        quality = {k: v for k, v in sloppy.quality.items() if k != "computed_at"}
        return sloppy.excluded, sloppy.exclusion_reason, quality

    apply_exclusions(study)
    first = state()
    apply_exclusions(study)
    assert state() == first and first[0]
    study.max_sentinel_false_alarm = 0.4  # 0.40 is not above 0.40
    study.save()
    apply_exclusions(study)
    assert state()[:2] == (False, "")
    study.max_sentinel_false_alarm = None
    study.save()
    apply_exclusions(study)
    assert state()[:2] == (False, "")


@pytest.mark.django_db
def test_staff_decisions_override_the_rules_until_cleared(study):
    study.max_sentinel_false_alarm = 0.25
    study.save()
    sloppy = make_answered_session(study, SLOPPY)
    careful = make_answered_session(study, CAREFUL)
    set_staff_decision(Session.objects.filter(pk=sloppy.pk), STAFF_INCLUDE)
    set_staff_decision(Session.objects.filter(pk=careful.pk), STAFF_EXCLUDE, "talked on phone")
    apply_exclusions(study)
    sloppy.refresh_from_db()
    careful.refresh_from_db()
    assert not sloppy.excluded
    assert careful.excluded and careful.exclusion_reason == "talked on phone"
    assert careful.quality["staff_decision"] == "exclude"
    set_staff_decision(Session.objects.filter(pk__in=[sloppy.pk, careful.pk]), None)
    apply_exclusions(study)
    sloppy.refresh_from_db()
    careful.refresh_from_db()
    assert sloppy.excluded and "sentinel false-alarm" in sloppy.exclusion_reason
    assert not careful.excluded


@pytest.mark.django_db
def test_a_hand_exclusion_is_never_undone_by_the_rules(study):
    careful = make_answered_session(study, CAREFUL)
    Session.objects.filter(pk=careful.pk).update(excluded=True, exclusion_reason="duplicate")
    (q,) = apply_exclusions(study)
    careful.refresh_from_db()
    assert careful.excluded and careful.exclusion_reason == "duplicate"
    assert q.staff_decision == STAFF_EXCLUDE


@pytest.mark.django_db
def test_shared_ip_or_browser_across_participants_is_flagged_not_excluded(study):
    study.allow_retakes = True
    study.save()
    same = make_answered_session(study, CAREFUL, ip_hash="i" * 64, browser_hash="b" * 64)
    make_answered_session(study, CAREFUL, ip_hash="i" * 64)
    make_answered_session(study, CAREFUL, ip_hash="j" * 64, browser_hash="b" * 64)
    alone = make_answered_session(study, CAREFUL, ip_hash="k" * 64)
    retake = make_answered_session(study, CAREFUL, ip_hash="k" * 64, participant=alone.participant)
    unknown = make_answered_session(study, CAREFUL)  # no hashes at all: never "shared"
    make_answered_session(study, CAREFUL, completed=False, ip_hash="u" * 64)
    make_answered_session(study, CAREFUL, completed=True, ip_hash="u" * 64)
    rows = {q.session_id: q for q in apply_exclusions(study)}
    assert rows[same.pk].flags == [
        "same IP as 1 other participant(s)",
        "same browser as 1 other participant(s)",
    ]
    assert rows[alone.pk].flags == [] and rows[retake.pk].flags == []  # one participant
    assert rows[unknown.pk].flags == []
    assert sum(bool(q.ip_shared_with) for q in rows.values()) == 3  # incl. the unfinished one
    assert not any(q.excluded for q in rows.values())
    assert Session.objects.get(pk=same.pk).quality["ip_shared_with"]


# ------------------------------------------------------------------------------ commands


def _analysis(tmp_path, *args) -> tuple[str, dict[str, int]]:
    out = StringIO()
    path = tmp_path / "analysis.csv"
    call_command("analyze", "--study", "jnd-demo", "--csv", str(path), *args, stdout=out)
    with path.open() as f:
        counts = {row["condition"]: int(row["n_judgments"]) for row in csv.DictReader(f)}
    return out.getvalue(), counts


@pytest.mark.django_db
def test_analyze_leaves_excluded_sessions_out_unless_asked(study, tmp_path):
    study.max_sentinel_false_alarm = 0.25
    study.save()
    make_answered_session(study, SLOPPY, practice=[(S, DIFF, 500)])
    make_answered_session(study, CAREFUL)
    apply_exclusions(study)
    text, counts = _analysis(tmp_path)
    assert "Left out 1 session(s) excluded by quality control (10 judgments)" in text
    assert counts["sentinel"] == 2 and counts["catch"] == 1
    text, counts = _analysis(tmp_path, "--include-excluded")
    assert "Including 1 session(s) excluded by quality control" in text
    assert counts["sentinel"] == 7 and counts["catch"] == 3  # practice still left out


@pytest.mark.django_db
def test_quality_command_dry_run_then_apply(study):
    study.max_fast_share = 0.2
    study.save()
    sloppy = make_answered_session(study, SLOPPY)
    out = StringIO()
    call_command("quality", "--study", study.slug, stdout=out)
    text = out.getvalue()
    assert "fast-response share 0.30 > 0.20" in text
    assert "1 of 1 sessions would be excluded (dry run" in text
    sloppy.refresh_from_db()
    assert not sloppy.excluded and sloppy.quality == {}
    out = StringIO()
    call_command("quality", "--study", study.slug, "--apply", stdout=out)
    assert "1 of 1 sessions excluded" in out.getvalue()
    sloppy.refresh_from_db()
    assert sloppy.excluded


@pytest.mark.django_db
def test_quality_command_unknown_study():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no study with slug 'nope'"):
        call_command("quality", "--study", "nope")
