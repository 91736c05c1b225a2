"""``manage.py quality``: quality-control metrics of a study's sessions; apply its exclusions."""

from __future__ import annotations

import json

import pandas as pd
from django.core.management.base import BaseCommand, CommandError

from studyapp.models import Study
from studyapp.quality import apply_exclusions, compute_quality, summary


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


class Command(BaseCommand):
    help = (
        "Per completed session: sentinel false-alarm rate, catch-trial hit rate, share of"
        " too-fast responses, and flags for an IP or browser shared by several participants."
        " With --apply, stores the metrics and excludes the sessions that break the study's"
        " rules (max_sentinel_false_alarm, min_catch_hit_rate, max_fast_share); excluded"
        " sessions stay stored, flagged with the reason. Re-running is safe. Every protocol:"
        " the control error rate (2AFC control triplets, rating anchors, label gold items;"
        " JND: the sentinel false-alarm rate) against max_sentinel_false_alarm, bot flags;"
        " rating: test-retest Spearman rho of repeated items (flag only)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True, help="study slug")
        parser.add_argument(
            "--apply", action="store_true", help="store the metrics and exclusions (else dry run)"
        )
        parser.add_argument(
            "--include-incomplete", action="store_true", help="also evaluate unfinished sessions"
        )
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def handle(self, *args, **opts):
        study = Study.objects.filter(slug=opts["study"]).first()
        if study is None:
            known = ", ".join(Study.objects.values_list("slug", flat=True)) or "none"
            raise CommandError(f"no study with slug {opts['study']!r} (studies: {known})")
        run = apply_exclusions if opts["apply"] else compute_quality
        rows = run(study, include_incomplete=opts["include_incomplete"])
        totals = summary(rows, study)
        if opts["json"]:
            payload = {**totals, "applied": opts["apply"], "sessions": [q.as_dict() for q in rows]}
            self.stdout.write(json.dumps(payload, indent=2, default=str))
            return
        rules = totals["rules"]
        self.stdout.write(
            f"Study {study.slug!r} ({study.protocol}): rules max_sentinel_false_alarm="
            f"{rules['max_sentinel_false_alarm']}, min_catch_hit_rate="
            f"{rules['min_catch_hit_rate']}, max_fast_share={rules['max_fast_share']}"
            f" (fast = RT < {rules['fast_response_ms']} ms; None = rule off)"
        )
        if rows:
            table = pd.DataFrame(
                [
                    {
                        "session": q.session_id,
                        "participant": q.participant,
                        "answered": f"{q.n_answered}/{q.n_main_trials}",
                        **({"sentinel_FA": _rate(q.sentinel_false_alarm_rate),
                            "catch_hit": _rate(q.catch_hit_rate)} if study.protocol == "jnd"
                           else {"control_error": _rate(q.control_error_rate)
                                 + f" ({q.n_control_wrong}/{q.n_control})"}),
                        **({"retest_rho": _rate(q.retest_rho) + f" (n={q.n_retest})"}
                           if study.protocol == "rating" else {}),
                        "fast": _rate(q.fast_share),
                        "flags": "; ".join(q.flags) or "-",
                        "excluded": "yes" if q.excluded else "no",
                        "reason": q.exclusion_reason or "-",
                    }
                    for q in rows
                ]
            )
            with pd.option_context("display.width", 250, "display.max_colwidth", 120):
                self.stdout.write(table.to_string(index=False))
        else:
            self.stdout.write("No completed sessions yet.")
        verb = "excluded" if opts["apply"] else "would be excluded (dry run; --apply stores it)"
        self.stdout.write(
            f"\n{totals['n_excluded']} of {totals['n_sessions']} sessions {verb}; flagged:"
            f" same IP {totals['n_flagged_ip']}, same browser {totals['n_flagged_browser']}."
        )
