"""``manage.py analyze``: a study's statistics (engine.analysis) as tables, CSV, JSON, figures.

The study's counts and progress come from :mod:`studyapp.reports` (``study_overview``: the
numbers of ``study_counts`` and ``study_progress`` from two aggregate queries), as on
``/staff/`` and in the staff API, so the three agree by construction.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from django.core.management.base import BaseCommand, CommandError

from engine.analysis import analyze
from studyapp import dashboard_figures
from studyapp.frames import judgments_frame, pairs_frame
from studyapp.protocol_rows import MAIN_TABLE, labelled, protocol_report
from studyapp.reports import study_overview

from ._shared import get_study


class Command(BaseCommand):
    help = (
        "Statistics of a study (engine.analysis): perceptibility per condition with Wilson and"
        " participant-bootstrap 95% intervals, sentinel false-alarm and catch hit rates,"
        " distance correlations, per-participant rates, the table-4 view. Prints tables and"
        " writes CSV; --json and --figures add a JSON report and the paper's figures."
        " Simulated observers and excluded sessions are left out unless asked."
        " Other protocols (engine.protocol_analysis): 2AFC choice rates per condition pair,"
        " each distance's BAPPS 2AFC score with its participant-bootstrap interval, the"
        " human-human ceiling and the distance-choice slope; rating MOS/z-MOS (DMOS in pair"
        " mode) per item, SROCC/PLCC/KROCC of each distance, test-retest and the anchors;"
        " label accuracy against bound per threat model, the label-flip bound, inter-rater"
        " agreement and Dawid-Skene labels. The main CSV holds the 2AFC table, the MOS or the"
        " accuracy table; the others go beside it."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True, help="study slug")
        parser.add_argument(
            "--csv",
            help="output CSV (default var/analysis/<slug>.csv); the other tables go to"
            " <name>_<table>.csv beside it (e.g. <name>_correlations.csv)",
        )
        parser.add_argument(
            "--completed-only", action="store_true", help="ignore sessions not completed"
        )
        parser.add_argument(
            "--include-excluded",
            action="store_true",
            help="keep sessions excluded by quality control (left out by default)",
        )
        parser.add_argument(
            "--include-simulated",
            action="store_true",
            help="keep simulated observers (simulate_observers; left out by default)",
        )
        parser.add_argument(
            "--json",
            nargs="?",
            const="-",
            metavar="PATH",
            help="also write the whole report as JSON to PATH ('-' or no PATH: stdout, and"
            " nothing else is printed)",
        )
        parser.add_argument(
            "--figures",
            metavar="DIR",
            help="write Fig. 4a/4b/4c, Fig. 5 and the psychometric curves to DIR as PNG, SVG"
            " and the CSV behind each",
        )
        parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
        parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    def handle(self, *args, **opts):
        from django.conf import settings

        if opts["n_boot"] < 0:
            raise CommandError(f"--n-boot must be >= 0, got {opts['n_boot']}")
        study = get_study(opts["study"])
        if study.protocol != "jnd":
            return self._handle_protocol(study, opts, settings)
        pairs = pairs_frame(study)
        if pairs.empty:
            raise CommandError(f"study {study.slug!r} has no pairs; run generate_pairs first")
        judgments = judgments_frame(study, completed_only=opts["completed_only"])
        # Counts of everything stored (every session, practice apart): the numbers of /staff/
        # (study_counts) and of the staff API's progress (study_progress).
        counts, progress = study_overview(study)
        calibration = dashboard_figures.latest_calibration(study)
        report = analyze(
            pairs,
            judgments,
            n_boot=opts["n_boot"],
            seed=opts["seed"],
            include_excluded=opts["include_excluded"],
            include_simulated=opts["include_simulated"],
        )
        table = report.perceptibility
        out = Path(opts["csv"] or Path(settings.VAR_DIR) / "analysis" / f"{study.slug}.csv")
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
        written = [out]
        for name, frame in report.tables().items():
            if name != "perceptibility":
                path = out.with_name(f"{out.stem}_{name}.csv")
                frame.to_csv(path, index=False)
                written.append(path)

        to_stdout = opts["json"] == "-"
        if opts["json"]:
            text = json.dumps(
                {"study": study.slug, "counts": counts, "progress": progress, **report.to_json(),
                 "fit_flags": calibration.flags() if calibration is not None else None},
                indent=1,
                allow_nan=False,
                default=str,
            )
            if to_stdout:
                self.stdout.write(text)
            else:
                Path(opts["json"]).parent.mkdir(parents=True, exist_ok=True)
                Path(opts["json"]).write_text(text + "\n")
                written.append(Path(opts["json"]))
        if opts["figures"]:
            context = dashboard_figures.FigureContext(
                study, pairs, judgments, report,
                calibration=calibration,
                include_excluded=opts["include_excluded"],
                include_simulated=opts["include_simulated"],
            )
            written += dashboard_figures.write_all(context, Path(opts["figures"]))
        if not to_stdout:
            self._print_header(study, counts, progress)
            self._print(study, judgments, report, opts)
            self._print_fits(study, calibration)
            self.stdout.write("\nWrote " + ", ".join(str(p) for p in written))
        else:
            print(f"Wrote {', '.join(str(p) for p in written)}", file=sys.stderr)

    def _print_header(self, study, counts: dict, progress: dict) -> None:
        """The stored counts and progress, as ``/staff/`` and the staff API show them."""
        s = progress["sessions"]
        self.stdout.write(
            f"Study {study.slug!r} (studyapp.reports, as /staff/ and the staff API):"
            f" {counts['n_pairs']} data pairs, {counts['n_sentinel_pairs']} sentinel and"
            f" {counts['n_catch_pairs']} catch pairs; sessions {s['started']} started,"
            f" {s['completed']} completed, {s['in_progress']} in progress, {s['abandoned']}"
            f" abandoned, {s['excluded']} excluded; {counts['n_judgments']} main-trial"
            f" judgments (+{counts['n_practice_judgments']} practice, never analysed);"
            f" {progress['n_judgments_valid']}/{progress['n_judgments_needed']} judgments"
            f" towards K={progress['judgments_per_pair']} per pair.\n"
        )

    def _print_fits(self, study, calibration) -> None:
        """The latest stored calibration's psychometric fits, with their warnings."""
        if calibration is None:
            self.stdout.write(f"\nNo calibration stored: `manage.py calibrate --study {study.slug}`"
                              " fits the psychometric functions (and flags saturated or poorly"
                              " identified fits).")
            return
        self.stdout.write("\nPsychometric fits (latest calibrate run):")
        flags = calibration.flags()
        for tm, cal in sorted(calibration.threat_models.items()):
            fit = cal.fit
            pv = f"{fit.p_value:.3g}" if fit.df > 0 else "n/a"
            self.stdout.write(f"  {tm}: deviance {fit.deviance:.3g} on {fit.df} df,"
                              f" goodness-of-fit p {pv}")
            for flag in flags.get(tm, []):
                self.stdout.write(f"  WARNING {tm}: {flag}")

    def _print(self, study, judgments, report, opts) -> None:
        table = report.perceptibility
        excluded = judgments[judgments["excluded"]]
        simulated = judgments[judgments["simulated"]]
        used = judgments
        if not opts["include_excluded"]:
            used = used[~used["excluded"]]
        if not opts["include_simulated"]:
            used = used[~used["simulated"]]
        shown = ["condition", "label", "n_pairs", "n_judgments", "perceptibility", "ci_low",
                 "ci_high", "boot_low", "boot_high"]
        shown = [c for c in shown if c in table] + [
            c for c in table.columns if c.startswith("mean_")
        ]
        with pd.option_context(
            "display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4f}".format
        ):
            self.stdout.write(f"Analysed: {len(used)} judgments")
            n_sessions, n_j = excluded["session"].nunique(), len(excluded)
            if opts["include_excluded"]:
                self.stdout.write(
                    f"Including {n_sessions} session(s) excluded by quality control"
                    f" ({n_j} judgments)."
                )
            else:
                self.stdout.write(
                    f"Left out {n_sessions} session(s) excluded by quality control"
                    f" ({n_j} judgments); --include-excluded keeps them."
                )
            if len(simulated):
                verb = "Including" if opts["include_simulated"] else "Left out"
                self.stdout.write(
                    f"{verb} {simulated['participant'].nunique()} simulated observer(s)"
                    f" ({len(simulated)} judgments)"
                    + ("." if opts["include_simulated"] else "; --include-simulated keeps them.")
                )
            self.stdout.write("")
            if not table.empty:
                self.stdout.write(table[shown].to_string(index=False))
            for control, what in (
                ("sentinel", "Sentinel false-alarm rate"),
                ("catch", "Catch-trial hit rate"),
            ):
                rows = table[table["condition"] == control] if not table.empty else table
                if not rows.empty and rows.iloc[0]["n_judgments"]:
                    row = rows.iloc[0]
                    self.stdout.write(
                        f"\n{what}: {row['perceptibility']:.4f}"
                        f" ({int(row['n_different'])}/{int(row['n_judgments'])})"
                    )
            self.stdout.write(
                "\nPearson r and Spearman rho across conditions, mean distance vs"
                " perceptibility (transform 1-x: SSIM enters as 1 − SSIM, so for every"
                " distance a good predictor has a positive r):"
            )
            self.stdout.write(report.correlations.to_string(index=False))
            if not report.table4.empty:
                self.stdout.write("\nTable 4 (per threat model × bound):")
                self.stdout.write(report.table4.to_string(index=False))

    # ------------------------------------------------------------- 2afc, rating, label

    def _handle_protocol(self, study, opts, settings) -> None:
        if not study.pairs.exists():
            raise CommandError(f"study {study.slug!r} has no items; import them first")
        try:
            report = protocol_report(
                study, n_boot=opts["n_boot"], seed=opts["seed"],
                include_excluded=opts["include_excluded"],
                include_simulated=opts["include_simulated"],
                completed_only=opts["completed_only"])
        except ValueError as exc:
            hint = ("" if opts["include_simulated"]
                    else " (simulated observers' judgments need --include-simulated)")
            raise CommandError(f"cannot analyse study {study.slug!r}: {exc}{hint}") from None
        counts, progress = study_overview(study)
        out = Path(opts["csv"] or Path(settings.VAR_DIR) / "analysis" / f"{study.slug}.csv")
        out.parent.mkdir(parents=True, exist_ok=True)
        main = MAIN_TABLE[study.protocol]
        written = []
        for name, frame in report.tables.items():
            path = out if name == main else out.with_name(f"{out.stem}_{name}.csv")
            frame.to_csv(path, index=False)
            written.append(path)
        to_stdout = opts["json"] == "-"
        if opts["json"]:
            text = json.dumps({"study": study.slug, "counts": counts, "progress": progress,
                               **report.to_dict()}, indent=1, allow_nan=False, default=str)
            if to_stdout:
                self.stdout.write(text)
            else:
                Path(opts["json"]).parent.mkdir(parents=True, exist_ok=True)
                Path(opts["json"]).write_text(text + "\n")
                written.append(Path(opts["json"]))
        if opts["figures"]:
            written += dashboard_figures.write_protocol_figures(report, Path(opts["figures"]))
        if to_stdout:
            print(f"Wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
            return
        self._print_header(study, counts, progress)
        self._print_protocol(study, report)
        self.stdout.write("\nWrote " + ", ".join(str(p) for p in written))

    def _print_protocol(self, study, report) -> None:
        e = report.exclusions
        self.stdout.write(
            f"Protocol {study.protocol}: analysed {e.get('judgments_kept', 0)} judgments of"
            f" {e.get('participants_kept', 0)} participant(s); left out"
            f" {e.get('judgments_dropped_excluded', 0)} judgments of sessions excluded by"
            f" quality control and {e.get('judgments_dropped_simulated', 0)} of simulated"
            " observers (--include-excluded, --include-simulated keep them).")
        distances = [c[2:] for t in report.tables.values() for c in t.columns
                     if c.startswith(("a_", "d_"))]
        distances += [v for t in report.tables.values() for c in ("distance", "metric")
                      if c in t for v in t[c] if isinstance(v, str)]
        distances = set(distances)
        with pd.option_context("display.width", 250, "display.max_columns", 40,
                               "display.float_format", "{:.4f}".format):
            for name, title in PROTOCOL_TABLES[study.protocol]:
                frame = report.tables.get(name)
                if frame is None:
                    continue
                self.stdout.write(f"\n{title}:")
                self.stdout.write(labelled(frame, distances).to_string(index=False)
                                  if len(frame) else "(none)")
            if report.meta.get("slope_skipped"):
                self.stdout.write(f"\nNo distance-choice slope: {report.meta['slope_skipped']}")


#: What ``analyze`` prints per protocol: (table, title).
PROTOCOL_TABLES = {
    "2afc": [
        ("choice_rates", "Human choice rates of copy B per condition pair (Wilson and"
         " participant-bootstrap 95% intervals)"),
        ("table", "2AFC score of each distance (BAPPS: agreement with people's choices,"
         " participant-bootstrap 95%) and the human-human ceiling"),
        ("slope", "Distance-choice slope (probit of P(chose B) on d_A - d_B; sigma = 1/beta)"),
        ("controls", "Control triplets (rate of choosing the side not identical to the"
         " reference: the control error rate)"),
    ],
    "rating": [
        ("mos", "MOS per item (DMOS in pair mode: 1 = no difference; t and participant-"
         "bootstrap 95%) and z-scored MOS"),
        ("correlations", "SROCC / PLCC / KROCC of each distance with the MOS (participant"
         " bootstrap 95%)"),
        ("test_retest", "Test-retest (first against repeat rating of the same item)"),
        ("anchors", "Identical-pair anchors (error = rated above the lowest point)"),
    ],
    "label": [
        ("accuracy", "Human accuracy (true label) against bound per threat model (Wilson and"
         " participant-bootstrap 95%)"),
        ("flip_bound", "Label-flip bound per threat model (accuracy midway between clean and"
         " chance; participant-bootstrap 95%)"),
        ("agreement", "Inter-rater agreement (Krippendorff's alpha, Fleiss' kappa)"),
        ("aggregation", "Aggregated labels (Dawid-Skene)"),
    ],
}
