"""``manage.py power``: how many judgments a target 95% interval width needs."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from studyapp._engine_shim import power  # TEMPORARY: engine.observers.power after merge
from studyapp.frames import study_frames
from studyapp.management.commands.analyze import get_study


class Command(BaseCommand):
    help = (
        "Judgments needed per condition for a 95% interval of perceptibility no wider than"
        " --width: at --p, or at each condition's observed perceptibility (--study)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--width", type=float, required=True, help="full interval width")
        parser.add_argument("--p", type=float, help="assumed perceptibility (default 0.5)")
        parser.add_argument("--study", help="use each condition's observed perceptibility")
        parser.add_argument("--include-simulated", action="store_true")

    def handle(self, *args, **opts):
        width = opts["width"]
        if not 0 < width < 1:
            raise CommandError(f"--width must be between 0 and 1, got {width}")
        if opts["p"] is not None and not 0 <= opts["p"] <= 1:
            raise CommandError(f"--p must be between 0 and 1, got {opts['p']}")
        if not opts["study"]:
            p = 0.5 if opts["p"] is None else opts["p"]
            self.stdout.write(f"p={p:.3f}: {power(p, width)} judgments for width {width}")
            return
        study = get_study(opts["study"])
        pairs, judgments = study_frames(study, include_simulated=opts["include_simulated"])
        merged = judgments.merge(pairs[["pair", "condition"]], on="pair").dropna(
            subset=["condition"])
        if merged.empty:
            raise CommandError(f"study {study.slug!r} has no judgments of perturbed pairs yet")
        for condition, g in merged.groupby("condition", sort=True):
            p = float(g["different"].mean()) if opts["p"] is None else opts["p"]
            need = power(p, width)
            self.stdout.write(
                f"{condition}: p={p:.3f}, have {len(g)}, need {need}"
                f" ({max(need - len(g), 0)} more)"
            )
