"""``manage.py analyze``: perceptibility per condition and distance–perceptibility correlations."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from django.core.management.base import BaseCommand, CommandError

from engine.analysis import distance_correlations, perceptibility_table
from studyapp.models import Judgment, Session, Study


def study_frames(
    study: Study, *, completed_only: bool = False, include_excluded: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's pairs and judgments as the DataFrames ``engine.analysis`` expects.

    Judgments of practice trials are never included; those of sessions excluded by quality
    control (``manage.py quality --apply``) only with ``include_excluded``.
    """
    pairs = pd.DataFrame(
        [
            {
                "pair": p.id,
                "condition": p.condition.spec if p.condition else None,
                "threat_model": p.condition.threat_model if p.condition else None,
                "bound": p.condition.bound if p.condition else None,
                "label": p.condition.label if p.condition else "",
                "is_sentinel": p.is_sentinel,
                "is_catch": p.is_catch,
                **p.distances,
            }
            for p in study.pairs.select_related("condition")
        ]
    )
    judgments = Judgment.objects.filter(
        trial__session__participant__study=study, trial__is_practice=False
    )
    if not include_excluded:
        judgments = judgments.filter(trial__session__excluded=False)
    if completed_only:
        judgments = judgments.filter(trial__session__completed_at__isnull=False)
    judged = pd.DataFrame(
        [
            {"pair": pair, "different": response == "different"}
            for pair, response in judgments.values_list("trial__pair_id", "response")
        ],
        columns=["pair", "different"],
    )
    return pairs, judged


class Command(BaseCommand):
    help = (
        "Perceptibility (fraction 'different') per condition with 95% Wilson intervals, the"
        " sentinel false-alarm rate, and the Pearson correlation across conditions between each"
        " distance's mean and perceptibility. Prints tables and writes CSV."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True, help="study slug")
        parser.add_argument(
            "--csv",
            help="output CSV (default var/analysis/<slug>.csv); correlations go to"
            " <name>_correlations.csv beside it",
        )
        parser.add_argument(
            "--completed-only", action="store_true", help="ignore sessions not completed"
        )
        parser.add_argument(
            "--include-excluded",
            action="store_true",
            help="keep sessions excluded by quality control (left out by default)",
        )

    def handle(self, *args, **opts):
        from django.conf import settings

        study = Study.objects.filter(slug=opts["study"]).first()
        if study is None:
            known = ", ".join(Study.objects.values_list("slug", flat=True)) or "none"
            raise CommandError(f"no study with slug {opts['study']!r} (studies: {known})")
        pairs, judgments = study_frames(
            study,
            completed_only=opts["completed_only"],
            include_excluded=opts["include_excluded"],
        )
        excluded = Session.objects.filter(participant__study=study, excluded=True)
        n_excluded_judgments = Judgment.objects.filter(
            trial__session__in=excluded, trial__is_practice=False
        ).count()
        if pairs.empty:
            raise CommandError(f"study {study.slug!r} has no pairs; run generate_pairs first")
        table = perceptibility_table(pairs, judgments)
        correlations = distance_correlations(table)
        out = Path(opts["csv"] or Path(settings.VAR_DIR) / "analysis" / f"{study.slug}.csv")
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
        corr_path = out.with_name(out.stem + "_correlations.csv")
        correlations.to_csv(corr_path, index=False)

        shown = [
            "condition",
            "label",
            "n_pairs",
            "n_judgments",
            "perceptibility",
            "ci_low",
            "ci_high",
        ]
        shown += [c for c in table.columns if c.startswith("mean_")]
        with pd.option_context(
            "display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4f}".format
        ):
            self.stdout.write(f"Study {study.slug!r}: {len(judgments)} judgments")
            n_sessions = excluded.count()
            if opts["include_excluded"]:
                self.stdout.write(
                    f"Including {n_sessions} session(s) excluded by quality control"
                    f" ({n_excluded_judgments} judgments)."
                )
            else:
                self.stdout.write(
                    f"Left out {n_sessions} session(s) excluded by quality control"
                    f" ({n_excluded_judgments} judgments); --include-excluded keeps them."
                )
            self.stdout.write("")
            self.stdout.write(table[shown].to_string(index=False))
            for control, what in (
                ("sentinel", "Sentinel false-alarm rate"),
                ("catch", "Catch-trial hit rate"),
            ):
                rows = table[table["condition"] == control]
                if not rows.empty and rows.iloc[0]["n_judgments"]:
                    row = rows.iloc[0]
                    self.stdout.write(
                        f"\n{what}: {row['perceptibility']:.4f}"
                        f" ({int(row['n_different'])}/{int(row['n_judgments'])})"
                    )
            self.stdout.write(
                "\nPearson r across conditions, mean distance vs perceptibility"
                " (SSIM is a similarity: good means negative r):"
            )
            self.stdout.write(correlations.to_string(index=False))
        self.stdout.write(f"\nWrote {out} and {corr_path}")
