"""``manage.py generate_pairs``: ``python -m engine generate`` then ``import_pairs``, in one
process (:func:`studyapp.services.generate_into_study`)."""

from __future__ import annotations

from dataclasses import replace

from django.core.management.base import BaseCommand, CommandError

from engine.errors import EngineError, WeightsUnavailableError
from studyapp.models import Study
from studyapp.services import StimulusImportError, generate_into_study

from ._shared import (
    add_generation_arguments,
    generation_request,
    print_import_summary,
    request_settings,
    study_for_import,
)


class Command(BaseCommand):
    help = (
        "Generate adversarial image pairs (one per source image and attack spec) plus sentinel"
        " pairs (or, with --protocol, 2AFC triplets, rating or label items and their controls)"
        " exactly as `python -m engine generate` does, then import them as"
        " `import_pairs` does: lossless PNGs and rows of a study. Re-running with the same"
        " arguments changes nothing; pairs already shown to participants are never changed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True, help="study slug (created if missing)")
        parser.add_argument("--title", help="title of a new study (default: the slug)")
        add_generation_arguments(parser)

    def handle(self, *args, **opts):
        request = generation_request(opts)
        existing = Study.objects.filter(slug=opts["study"]).first()
        if existing is not None and existing.protocol != request.protocol:
            raise CommandError(
                f"study {existing.slug!r} is a {existing.protocol} study; --protocol"
                f" {request.protocol} items cannot be added to it (use a new study slug)")
        if (existing is not None and request.protocol == "label" and request.label_set is None
                and existing.label_set):  # the study's answers are the label set
            request = replace(request, label_set=tuple(existing.label_set))
        with study_for_import(opts["study"], opts["title"],
                              (EngineError, WeightsUnavailableError, StimulusImportError),
                              settings=request_settings(request)) as study:
            summary = generate_into_study(study, request, progress=request.progress)
        print_import_summary(self.stdout, study, summary)
