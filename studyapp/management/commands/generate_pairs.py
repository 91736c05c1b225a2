"""``manage.py generate_pairs``: ``python -m engine generate`` then ``import_pairs``, in one
process (:func:`studyapp.services.generate_into_study`)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from engine.errors import EngineError, WeightsUnavailableError
from studyapp.services import StimulusImportError, generate_into_study

from ._shared import (
    add_generation_arguments,
    generation_request,
    print_import_summary,
    study_for_import,
)


class Command(BaseCommand):
    help = (
        "Generate adversarial image pairs (one per source image and attack spec) plus sentinel"
        " pairs exactly as `python -m engine generate` does, then import them as"
        " `import_pairs` does: lossless PNGs and rows of a study. Re-running with the same"
        " arguments changes nothing; pairs already shown to participants are never changed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True, help="study slug (created if missing)")
        parser.add_argument("--title", help="title of a new study (default: the slug)")
        add_generation_arguments(parser)

    def handle(self, *args, **opts):
        request = generation_request(opts)
        with study_for_import(opts["study"], opts["title"],
                              (EngineError, WeightsUnavailableError, StimulusImportError)) as study:
            summary = generate_into_study(study, request, progress=request.progress)
        print_import_summary(self.stdout, study, summary)
