"""``manage.py generate_pairs``: ``python -m engine generate`` then ``import_pairs``, in one
process (:func:`studyapp.services.generate_into_study`)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from engine.errors import EngineError, WeightsUnavailableError
from studyapp.models import Study
from studyapp.services import StimulusImportError, generate_into_study

from ._shared import add_generation_arguments, generation_request, print_import_summary


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
        study = Study.objects.filter(slug=opts["study"]).first()
        created = study is None
        if created:
            study = Study(slug=opts["study"], title=opts["title"] or opts["study"])
            try:
                study.full_clean()
            except Exception as exc:
                raise CommandError(f"invalid study: {exc}") from exc
            study.save()
        try:
            summary = generate_into_study(study, request, progress=request.progress)
        except (EngineError, WeightsUnavailableError, StimulusImportError) as exc:
            if created:
                study.delete()
            raise CommandError(str(exc)) from exc
        print_import_summary(self.stdout, study, summary)
