"""``manage.py export_dataset``: a study as a self-describing release, or in a published layout
(BAPPS JND; for 2AFC studies BAPPS 2AFC or DreamSim's NIGHTS)."""

from __future__ import annotations

import warnings
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from engine.release_formats import NightsVotesWarning
from studyapp.releases import (
    ReleaseError,
    export_bapps_2afc,
    export_bapps_jnd,
    export_nights,
    export_release,
)

from ._shared import code_version, get_study


class Command(BaseCommand):
    help = (
        "Write a study as a release folder: pairs as PNG; judgments, pairs, conditions,"
        " sessions and pseudonymised participants as CSV; the fits; a datasheet README"
        " describing every column, the exclusions and the provenance. --bapps-jnd writes the"
        " LPIPS repository's JND layout (p0/, p1/, same/) instead; for a 2AFC study"
        " --bapps-2afc writes BAPPS 2AFC (ref/, p0/, p1/, judge/) and --nights DreamSim's"
        " NIGHTS layout (data.csv, ref/, distort/)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True)
        parser.add_argument("out", help="output folder (new or empty)")
        layout = parser.add_mutually_exclusive_group()
        layout.add_argument("--bapps-jnd", action="store_true",
                            help="BAPPS JND layout: p0/ p1/ same/ (fraction answering same)")
        layout.add_argument("--bapps-2afc", action="store_true",
                            help="2AFC study: BAPPS 2AFC layout ref/ p0/ (copy A) p1/ (copy B)"
                            " judge/ (fraction choosing B)")
        layout.add_argument("--nights", action="store_true",
                            help="2AFC study: NIGHTS layout data.csv ref/ distort/ (A left,"
                            " B right)")
        parser.add_argument("--include-simulated", action="store_true",
                            help="with --bapps-jnd/--bapps-2afc/--nights: count simulated"
                            " observers' judgments")
        parser.add_argument("--min-votes", type=int, default=None,
                            help="with --nights: write the triplets with at least this many"
                            " votes (true counts). Without it a triplet with fewer than 6 votes"
                            " is refused: DreamSim's loader keeps votes >= 6 only")

    def handle(self, *args, **opts):
        study = get_study(opts["study"])
        out = Path(opts["out"])
        layouts = {"bapps_jnd": (export_bapps_jnd, "pairs in BAPPS JND"),
                   "bapps_2afc": (export_bapps_2afc, "triplets in BAPPS 2AFC"),
                   "nights": (export_nights, "triplets in NIGHTS")}
        if opts["min_votes"] is not None and not opts["nights"]:
            raise CommandError("--min-votes goes with --nights")
        try:
            for flag, (export, what) in layouts.items():
                if opts[flag]:
                    extra = {"min_votes": opts["min_votes"]} if flag == "nights" else {}
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", NightsVotesWarning)
                        n = export(study, out, include_simulated=opts["include_simulated"],
                                   **extra)
                    for w in caught:
                        if issubclass(w.category, NightsVotesWarning):
                            self.stderr.write(f"Warning: {w.message}")
                        else:
                            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                    self.stdout.write(f"Wrote {n} {what} layout to {out}")
                    return
            counts = export_release(study, out, code_version=code_version())
        except ReleaseError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Wrote release of {study.slug} to {out}: "
            + ", ".join(f"{v} {k}" for k, v in counts.items())
        )
