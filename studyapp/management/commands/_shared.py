"""What several management commands share (Django skips ``_``-prefixed modules here, so this is
not a command). Commands import from this module, never from each other."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

from django.core.management.base import CommandError

from engine.errors import EngineError
from engine.generate import GenerateRequest
from engine.provenance import code_version
from engine.stimuli import AT_BOUND, size_ratio_summary
from studyapp.models import Pair, Study

__all__ = ["add_generation_arguments", "code_version", "generation_request", "get_study",
           "print_import_summary", "print_size_ratios", "run_engine",
           "study_for_import"]


def get_study(slug: str) -> Study:
    """The study with ``slug``, or a CommandError that lists the known ones."""
    study = Study.objects.filter(slug=slug).first()
    if study is None:
        known = ", ".join(Study.objects.values_list("slug", flat=True)) or "none"
        raise CommandError(f"no study with slug {slug!r} (studies: {known})")
    return study


def run_engine(argv: list[str], nproc: int = 1) -> int:
    """Run ``python -m engine ARGV``: in this process, or under torchrun for ``nproc > 1``."""
    if nproc > 1:
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node", str(nproc), "-m", "engine", *argv])
    from engine.__main__ import main

    return main(argv)


def add_generation_arguments(parser) -> None:
    """The arguments of ``python -m engine generate`` (same names, same meaning)."""
    parser.add_argument(
        "--spec", dest="specs", action="append", required=True, metavar="SPEC",
        help="attack spec, repeatable, e.g. 'linf:bound=4/255,num_iterations=10' or"
        " 'stadv:bound=medium'; without bound= when --bounds is given")
    parser.add_argument(
        "--bounds",
        help="comma-separated bounds applied to every --spec, named (small,medium,large,"
        "cifar10: PAT tables 4 and 2; ppgd/lpa/fast_lpa then use AlexNet LPIPS), numeric,"
        " or VALUE@LABEL, e.g. --bounds small,medium,large or --bounds 0.31@human_medium;"
        " or calibrated:SLUG for the labelled presets of that study's latest `calibrate`")
    parser.add_argument(
        "--ladder", type=int, metavar="N",
        help="adaptive ladder: N log-spaced bounds per --spec between --bounds LOW,HIGH"
        " (default: half the 'small' to twice the 'large' preset); sets Pair.level")
    parser.add_argument(
        "--images", default="skimage",
        help="'skimage' (bundled photographs), a folder path, or torchvision:NAME[:ROOT]")
    parser.add_argument("--classifier", default="resnet50",
                        help="e.g. resnet50, alexnet:untrained, or a training run folder")
    parser.add_argument(
        "--lpips", action="append", metavar="NETWORK",
        help="LPIPS network(s) to measure every pair with (default: alexnet), repeatable")
    parser.add_argument("--size", type=int, default=224, help="crop side in pixels")
    parser.add_argument("--crops-per-image", type=int, default=1)
    parser.add_argument("--max-images", type=int, help="use at most this many crops")
    parser.add_argument("--sentinels", type=int, help="sentinel pairs (default: one per image)")
    parser.add_argument("--catch", type=int, default=0,
                        help="catch pairs: a photograph and a different one (attention checks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda[:N]")
    parser.add_argument("--autocast", choices=["bf16"],
                        help="run the attacks under bfloat16 autocast (GPU)")
    parser.add_argument("--no-progress", action="store_true")


def generation_request(opts: dict) -> GenerateRequest:
    """The :class:`GenerateRequest` of :func:`add_generation_arguments`' options, with the
    bounds expanded: named, numeric, ``VALUE@LABEL``, ``calibrated:SLUG`` (labelled presets
    from the database) or a ladder. CommandError naming the problem."""
    from engine.__main__ import expand_conditions
    from studyapp import adaptive

    bounds = opts.get("bounds")
    try:
        if bounds and bounds.strip().startswith("calibrated:") and opts.get("ladder") is None:
            specs = adaptive.calibrated_specs(opts["specs"], bounds.strip().partition(":")[2])
            levels = None
        else:
            specs, levels = expand_conditions(opts["specs"], bounds, opts.get("ladder"))
        request = GenerateRequest(
            specs=specs, levels=levels, images=opts["images"], classifier=opts["classifier"],
            lpips=tuple(opts["lpips"] or ["alexnet"]), size=opts["size"],
            crops_per_image=opts["crops_per_image"], max_images=opts["max_images"],
            sentinels=opts["sentinels"], catch=opts["catch"], seed=opts["seed"],
            batch_size=opts["batch_size"], device=opts["device"], autocast=opts["autocast"],
            progress=not opts["no_progress"])
        request.check()
    except (EngineError, adaptive.AdaptiveError) as exc:
        raise CommandError(str(exc)) from exc
    return request


def print_import_summary(stdout, study: Study, summary) -> None:
    """The one-line result of an import, and a loud line about untrained networks."""
    stdout.write(
        f"study {study.slug}: {summary.created} pairs created, {summary.updated} updated,"
        f" {summary.unchanged} unchanged; {summary.conditions} conditions")
    print_size_ratios(stdout, study)
    if summary.untrained:
        stdout.write(f"UNTRAINED networks used (recorded in the study's generation and"
                     f" description): {', '.join(summary.untrained)}")


def print_size_ratios(stdout, study: Study) -> None:
    """Each condition's stored size ÷ bound (stimulus mode aims at [AT_BOUND, 1])."""
    rows = Pair.objects.filter(study=study, condition__isnull=False).order_by(
        "condition__threat_model", "condition__bound", "id"
    ).values_list("condition__spec", "metadata")
    summary = size_ratio_summary((spec, (meta or {}).get("size_ratio")) for spec, meta in rows)
    if not summary:
        return
    stdout.write(f"stored size ÷ bound per condition (target {AT_BOUND:g}–1):")
    for row in summary:
        flag = "  <-- FLAGGED: not at the bound" if row["flagged"] else ""
        stdout.write(
            f"  {row['condition']}: min {row['min']:.3f}, median {row['median']:.3f},"
            f" max {row['max']:.3f} over {row['n']} pairs; {row['flagged']} outside"
            f" [{AT_BOUND:g}, 1]{flag}")


@contextmanager
def study_for_import(slug: str, title: str | None, errors: tuple[type[Exception], ...],
                     prefix: str = "", suffix: str = ""):
    """The study ``slug`` (created, validated, when missing) for an import; an error of
    ``errors`` inside the block becomes a CommandError (``prefix`` + its text + ``suffix``),
    and a study created here is deleted again, so a failed import leaves nothing behind."""
    study = Study.objects.filter(slug=slug).first()
    created = study is None
    if created:
        study = Study(slug=slug, title=title or slug)
        try:
            study.full_clean()
        except Exception as exc:
            raise CommandError(f"invalid study: {exc}") from exc
        study.save()
    try:
        yield study
    except errors as exc:
        if created:
            study.delete()
        raise CommandError(f"{prefix}{exc}{suffix}") from exc
