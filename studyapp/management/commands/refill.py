"""``manage.py refill``: more pairs at the ladder levels of an adaptive study running short."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from engine.errors import EngineError, WeightsUnavailableError
from engine.generate import GenerateRequest
from studyapp import adaptive
from studyapp.models import Pair, Study
from studyapp.services import StimulusImportError, generate_into_study

from ._shared import get_study


class Command(BaseCommand):
    help = (
        "For each ladder level (threat model × level, generate_pairs --ladder) with fewer open"
        " judgment slots than --min-open, generate more pairs at that level through the engine"
        " (new crops of the same images, same classifier, networks and seed) and give them the"
        " level. Existing pairs are never changed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True)
        parser.add_argument(
            "--min-open", type=int,
            help="refill levels with fewer open slots than this (default: 2 sessions' worth,"
            " 2 × trials_per_session)",
        )
        parser.add_argument("--extra-crops", type=int, default=1,
                            help="new crops per source image for each short level")
        parser.add_argument("--dry-run", action="store_true", help="list short levels only")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **opts):
        study: Study = get_study(opts["study"])
        ladder = study.adaptive_config.get("ladder")
        generation = study.adaptive_config.get("generation")
        if not ladder or not generation:
            raise CommandError(
                f"study {study.slug!r} has no ladder; make one with generate_pairs --ladder N"
            )
        if opts["extra_crops"] < 1:
            raise CommandError("--extra-crops must be at least 1")
        min_open = opts["min_open"] or 2 * study.trials_per_session
        short = adaptive.short_levels(study, min_open)
        slots = adaptive.open_slots(study)
        if not short:
            self.stdout.write(f"No level has fewer than {min_open} open slots; nothing to do.")
            return
        for tm, level in short:
            self.stdout.write(f"{tm} level {level}: {slots[(tm, level)]} open slot(s)")
        if opts["dry_run"]:
            return
        # The specs as first requested (with their @L<level> labels): the levels travel through
        # the engine's manifest to Pair.level, as in generate_pairs --ladder.
        given = {ladder[tm][str(level)]["given"]: level for tm, level in short}
        crops = int(generation["crops_per_image"]) + opts["extra_crops"]
        try:
            request = GenerateRequest.from_record(
                generation, specs=tuple(given), levels=given, crops_per_image=crops,
                sentinels=0, catch=0, progress=not opts["no_progress"], device="cpu",
                max_images=None if generation.get("max_images") is None
                else int(generation["max_images"]) * crops // int(generation["crops_per_image"]))
        except (TypeError, KeyError) as exc:
            raise CommandError(f"study {study.slug!r}: its recorded generation request is"
                               f" unusable ({exc}); generate the ladder again") from exc
        before = Pair.objects.filter(study=study).count()
        try:
            summary = generate_into_study(study, request, progress=not opts["no_progress"])
        except (EngineError, WeightsUnavailableError, StimulusImportError) as exc:
            raise CommandError(str(exc)) from exc
        # The import recorded this request (crops_per_image included) for the next refill.
        self.stdout.write(
            f"study {study.slug}: {summary.created} new pair(s) at {len(short)} level(s)"
            f" ({before} → {Pair.objects.filter(study=study).count()} pairs)"
        )
