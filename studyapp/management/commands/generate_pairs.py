"""``manage.py generate_pairs``: attack natural images under conditions and store the pairs."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from engine.errors import EngineError, WeightsUnavailableError
from engine.stimuli import AT_BOUND, size_ratio_summary
from studyapp import adaptive
from studyapp.models import Pair, Study
from studyapp.services import (
    GenerationRequest,
    StimulusImportError,
    expand_specs,
    generate_into_study,
)


class Command(BaseCommand):
    help = (
        "Generate adversarial image pairs (one per source image and attack spec) plus sentinel"
        " pairs, store them as lossless PNGs and rows of a study. Re-running with the same"
        " arguments updates rows in place and never duplicates them."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True, help="study slug (created if missing)")
        parser.add_argument("--title", help="title of a new study (default: the slug)")
        parser.add_argument(
            "--spec",
            dest="specs",
            action="append",
            required=True,
            metavar="SPEC",
            help="attack spec, repeatable, e.g. 'linf:bound=4/255,num_iterations=10' or"
            " 'stadv:bound=medium'; without bound= when --bounds is given",
        )
        parser.add_argument(
            "--bounds",
            help="comma-separated bounds applied to every --spec, named (small,medium,large,"
            "cifar10: PAT tables 4 and 2; ppgd/lpa/fast_lpa then use AlexNet LPIPS), numeric,"
            " or VALUE@LABEL, e.g. --bounds small,medium,large or --bounds 0.31@human_medium;"
            " or calibrated:SLUG for the presets of that study's latest `calibrate`",
        )
        parser.add_argument(
            "--ladder",
            type=int,
            metavar="N",
            help="adaptive ladder: N log-spaced bounds per --spec between --bounds LOW,HIGH"
            " (default: half the 'small' to twice the 'large' preset); sets Pair.level",
        )
        parser.add_argument(
            "--images",
            default="skimage",
            help="'skimage' (bundled photographs), a folder path, or torchvision:NAME[:ROOT]",
        )
        parser.add_argument(
            "--classifier", default="resnet50", help="e.g. resnet50, alexnet:untrained"
        )
        parser.add_argument(
            "--lpips",
            action="append",
            metavar="NETWORK",
            help="LPIPS network(s) to measure every pair with (default: alexnet), repeatable",
        )
        parser.add_argument("--size", type=int, default=224, help="crop side in pixels")
        parser.add_argument("--crops-per-image", type=int, default=1)
        parser.add_argument("--max-images", type=int, help="use at most this many crops")
        parser.add_argument("--sentinels", type=int, help="sentinel pairs (default: one per image)")
        parser.add_argument(
            "--catch",
            type=int,
            default=0,
            help="catch pairs: a photograph and a different one (attention checks)",
        )
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
        parser.add_argument(
            "--autocast", choices=["bf16"], help="run the attacks under bfloat16 autocast (GPU)"
        )
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **opts):
        bounds = [b.strip() for b in opts["bounds"].split(",")] if opts["bounds"] else None
        labels: dict[str, str] = {}  # issue 8: calibrated presets and ladders (studyapp.adaptive)
        try:
            if opts["ladder"] is not None:
                specs, labels = adaptive.ladder_specs(opts["specs"], bounds, opts["ladder"])
            elif bounds and bounds[0].startswith("calibrated:"):
                slug = bounds[0].partition(":")[2]
                specs, labels = adaptive.calibrated_specs(opts["specs"], slug)
            else:
                specs = expand_specs(opts["specs"], bounds)
        except (EngineError, adaptive.AdaptiveError) as exc:
            raise CommandError(str(exc)) from exc
        request = GenerationRequest(
            specs=specs,
            images=opts["images"],
            classifier=opts["classifier"],
            lpips=tuple(opts["lpips"] or ["alexnet"]),
            size=opts["size"],
            crops_per_image=opts["crops_per_image"],
            max_images=opts["max_images"],
            sentinels=opts["sentinels"],
            catch=opts["catch"],
            seed=opts["seed"],
            batch_size=opts["batch_size"],
            device=opts["device"],
            autocast=opts["autocast"],
        )
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
            summary = generate_into_study(study, request, progress=not opts["no_progress"])
        except (EngineError, WeightsUnavailableError, StimulusImportError) as exc:
            if created:
                study.delete()
            raise CommandError(str(exc)) from exc
        if labels:
            adaptive.label_conditions(
                study, labels, ladder_levels=opts["ladder"] is not None, request=request
            )
        self.stdout.write(
            f"study {study.slug}: {summary.created} pairs created, {summary.updated} updated,"
            f" {summary.unchanged} unchanged; {summary.conditions} conditions"
        )
        self.print_size_ratios(study)
        if summary.untrained:
            self.stdout.write(f"UNTRAINED networks used: {', '.join(summary.untrained)}")

    def print_size_ratios(self, study: Study) -> None:
        """Each condition's stored size ÷ bound (stimulus mode aims at [0.95, 1])."""
        rows = Pair.objects.filter(study=study, condition__isnull=False).order_by(
            "condition__threat_model", "condition__bound", "id"
        ).values_list("condition__spec", "metadata")
        summary = size_ratio_summary((spec, (meta or {}).get("size_ratio")) for spec, meta in rows)
        if not summary:
            return
        self.stdout.write(f"stored size ÷ bound per condition (target {AT_BOUND:g}–1):")
        for row in summary:
            flag = "  <-- FLAGGED: not at the bound" if row["flagged"] else ""
            self.stdout.write(
                f"  {row['condition']}: min {row['min']:.3f}, median {row['median']:.3f},"
                f" max {row['max']:.3f} over {row['n']} pairs; {row['flagged']} outside"
                f" [{AT_BOUND:g}, 1]{flag}"
            )
