"""``manage.py import_dataset``: a release folder (or a BAPPS JND folder) into a new study."""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from studyapp.releases import ReleaseError, import_bapps_jnd, import_release


class Command(BaseCommand):
    help = (
        "Read a release written by export_dataset into a new study (every row, image and fit;"
        " export again gives byte-identical tables), or with --bapps-jnd a BAPPS JND folder"
        " (p0/, p1/, same/) as a study to analyse here. A `python -m engine generate` folder"
        " (manifest.json) goes to import_pairs (with --slug as the study). Nothing is written"
        " on any error."
    )

    def add_arguments(self, parser):
        parser.add_argument("folder")
        parser.add_argument("--slug", help="slug of the new study (default: the release's"
                            " slug + '-imported', or the folder name for BAPPS)")
        parser.add_argument("--bapps-jnd", action="store_true")
        parser.add_argument("--raters", type=int, default=3,
                            help="with --bapps-jnd: raters per pair to reconstruct (BAPPS: 3)")

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
            if opts["bapps_jnd"]:
                slug = opts["slug"] or folder.name.replace("_", "-")
                study = import_bapps_jnd(folder, slug, raters=opts["raters"])
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
