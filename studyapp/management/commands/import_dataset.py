"""``manage.py import_dataset``: a release folder (or a BAPPS JND, BAPPS 2AFC or NIGHTS folder)
into a new study."""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from studyapp.releases import (
    ReleaseError,
    import_bapps_2afc,
    import_bapps_jnd,
    import_nights,
    import_release,
)


class Command(BaseCommand):
    help = (
        "Read a release written by export_dataset into a new study (every row, image and fit;"
        " export again gives byte-identical tables), or with --bapps-jnd a BAPPS JND folder"
        " (p0/, p1/, same/) as a study to analyse here; --bapps-2afc (ref/, p0/, p1/, judge/)"
        " and --nights (DreamSim's data.csv, ref/, distort/) read 2AFC folders as 2AFC"
        " studies. A `python -m engine generate` folder"
        " (manifest.json) goes to import_pairs (with --slug as the study). Nothing is written"
        " on any error."
    )

    def add_arguments(self, parser):
        parser.add_argument("folder")
        parser.add_argument("--slug", help="slug of the new study (default: the release's"
                            " slug + '-imported', or the folder name for BAPPS)")
        layout = parser.add_mutually_exclusive_group()
        layout.add_argument("--bapps-jnd", action="store_true")
        layout.add_argument("--bapps-2afc", action="store_true")
        layout.add_argument("--nights", action="store_true")
        parser.add_argument("--raters", type=int, default=None,
                            help="raters per item to reconstruct: --bapps-jnd (default 3, as"
                            " BAPPS JND), --bapps-2afc (default: the counts in triplets.csv,"
                            " else 5 as BAPPS 2AFC validation)")
        parser.add_argument("--split", default=None,
                            help="with --nights: train, val, test, test_imagenet or"
                            " test_no_imagenet (default: every item)")
        parser.add_argument("--min-votes", type=int, default=1,
                            help="with --nights: keep items with at least this many votes"
                            " (DreamSim's loader keeps 6)")

    def handle(self, *args, **opts):
        folder = Path(opts["folder"])
        if not folder.is_dir():
            raise CommandError(f"{folder} is not a folder")
        if (folder / "manifest.json").is_file() and not (folder / "study.json").exists():
            # A folder of `python -m engine generate`: import_pairs reads those.
            if not opts["slug"]:
                raise CommandError(
                    f"{folder} holds engine pairs (manifest.json), not a release: import them"
                    f" with `manage.py import_pairs {folder} --study SLUG` (or give --slug)")
            call_command("import_pairs", str(folder), "--study", opts["slug"],
                         stdout=self.stdout)
            return
        try:
            if opts["raters"] is not None and not (opts["bapps_jnd"] or opts["bapps_2afc"]):
                raise CommandError("--raters goes with --bapps-jnd or --bapps-2afc")
            if (opts["split"] is not None or opts["min_votes"] != 1) and not opts["nights"]:
                raise CommandError("--split and --min-votes go with --nights")
            default_slug = opts["slug"] or folder.resolve().name.replace("_", "-")
            if opts["bapps_jnd"]:
                study = import_bapps_jnd(folder, default_slug, raters=opts["raters"] or 3)
            elif opts["bapps_2afc"]:
                study = import_bapps_2afc(folder, default_slug, raters=opts["raters"])
            elif opts["nights"]:
                study = import_nights(folder, default_slug, split=opts["split"],
                                      min_votes=opts["min_votes"])
            else:
                slug = opts["slug"]
                if slug is None:
                    try:
                        slug = json.loads((folder / "study.json").read_text())["slug"]
                        slug += "-imported"
                    except (OSError, ValueError, KeyError) as exc:
                        raise CommandError(f"{folder} is not a release: {exc}") from exc
                study = import_release(folder, slug)
        except ReleaseError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Imported {folder} as study {study.slug}: {study.pairs.count()} pairs"
        )
