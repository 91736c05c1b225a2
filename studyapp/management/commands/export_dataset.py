"""``manage.py export_dataset``: a study as a self-describing release, or in BAPPS JND layout."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from studyapp.releases import ReleaseError, export_bapps_jnd, export_release

from ._shared import code_version, get_study


class Command(BaseCommand):
    help = (
        "Write a study as a release folder: pairs as PNG; judgments, pairs, conditions,"
        " sessions and pseudonymised participants as CSV; the fits; a datasheet README"
        " describing every column, the exclusions and the provenance. --bapps-jnd writes the"
        " LPIPS repository's JND layout (p0/, p1/, same/) instead."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True)
        parser.add_argument("out", help="output folder (new or empty)")
        parser.add_argument("--bapps-jnd", action="store_true",
                            help="BAPPS JND layout: p0/ p1/ same/ (fraction answering same)")
        parser.add_argument("--include-simulated", action="store_true",
                            help="with --bapps-jnd: count simulated observers' judgments")

    def handle(self, *args, **opts):
        study = get_study(opts["study"])
        out = Path(opts["out"])
        try:
            if opts["bapps_jnd"]:
                n = export_bapps_jnd(study, out, include_simulated=opts["include_simulated"])
                self.stdout.write(f"Wrote {n} pairs in BAPPS JND layout to {out}")
                return
            counts = export_release(study, out, code_version=code_version())
        except ReleaseError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Wrote release of {study.slug} to {out}: "
            + ", ".join(f"{v} {k}" for k, v in counts.items())
        )
