"""``manage.py import_pairs DIR --study SLUG``: a folder written by ``python -m engine generate``
(on this machine or a GPU box) into a study."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from engine.errors import EngineError
from engine.stimuli import Manifest
from studyapp.services import StimulusImportError, import_folder, manifest_settings

from ._shared import print_import_summary, study_for_import


class Command(BaseCommand):
    help = (
        "Import the pairs of a `python -m engine generate --out DIR` folder into a study"
        " (created if missing). Every file's SHA-256, the specs, labels, bounds and networks"
        " are checked first; any mismatch is an error and nothing is written. Re-importing"
        " the same folder changes nothing; pairs already shown to participants never change."
    )

    def add_arguments(self, parser):
        parser.add_argument("folder", help="the folder with manifest.json")
        parser.add_argument("--study", required=True, help="study slug (created if missing)")
        parser.add_argument("--title", help="title of a new study (default: the slug)")

    def handle(self, *args, **opts):
        folder = Path(opts["folder"])
        if not folder.is_dir():
            raise CommandError(f"{folder} is not a folder")
        try:  # a study created here takes the folder's protocol (and label set)
            settings = manifest_settings(Manifest.read(folder))
        except EngineError as exc:
            raise CommandError(f"{folder}: {exc}; nothing was imported") from exc
        with study_for_import(opts["study"], opts["title"], (StimulusImportError,),
                              prefix=f"{folder}: ", suffix="; nothing was imported",
                              settings=settings) as study:
            summary = import_folder(study, folder)
        print_import_summary(self.stdout, study, summary)
