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
           "print_import_summary", "print_size_ratios", "request_settings", "run_engine",
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
        "--spec", dest="specs", action="append", metavar="SPEC",
        help="attack spec, repeatable, e.g. 'linf:bound=4/255,num_iterations=10' or"
        " 'stadv:bound=medium'; without bound= when --bounds is given (needed unless"
        " --versus names the specs)")
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
    from engine.__main__ import add_protocol_arguments

    add_protocol_arguments(parser)


def _calibrated_versus(versus: list[list[str]], slug: str
                       ) -> tuple[tuple[str, str], ...]:
    """``--versus A B --bounds calibrated:SLUG``: A and B at each calibrated label both have
    (sides that set ``bound=`` themselves are kept)."""
    from engine.attacks.spec import bound_label, has_param
    from studyapp import adaptive

    out: list[tuple[str, str]] = []
    for a, b in versus:
        sides = [None if has_param(x, "bound") else
                 {bound_label(s): s for s in adaptive.calibrated_specs([x], slug)}
                 for x in (a, b)]
        labels = [list(x) for x in sides if x is not None]
        if not labels:
            out.append((a, b))
            continue
        common = [label for label in labels[0] if all(label in x for x in labels)]
        if not common:
            raise EngineError(f"--versus {a} {b}: the calibration of {slug!r} has no bound"
                              " label both threat models share")
        out += [(a if sides[0] is None else sides[0][label],
                 b if sides[1] is None else sides[1][label]) for label in common]
    return tuple(out)


def generation_request(opts: dict) -> GenerateRequest:
    """The :class:`GenerateRequest` of :func:`add_generation_arguments`' options, with the
    bounds expanded: named, numeric, ``VALUE@LABEL``, ``calibrated:SLUG`` (labelled presets
    from the database) or a ladder. CommandError naming the problem."""
    from engine.__main__ import expand_conditions, expand_versus, protocol_conditions
    from engine.datasets import resolve_label_set
    from studyapp import adaptive

    bounds = opts.get("bounds")
    given = opts.get("specs") or []
    try:
        if bounds and bounds.strip().startswith("calibrated:") and opts.get("ladder") is None:
            slug = bounds.strip().partition(":")[2]
            specs = adaptive.calibrated_specs(given, slug)
            levels = None
            versus = _calibrated_versus(opts.get("versus"), slug) if opts.get(
                "versus") else None
            versus_levels = None
        else:
            specs, levels = expand_conditions(given, bounds, opts.get("ladder"))
            versus, versus_levels = expand_versus(opts.get("versus"), bounds, opts.get("ladder"))
        specs, levels = protocol_conditions(specs, levels, versus, versus_levels)
        label_set = (resolve_label_set(opts["label_set"], opts["images"])
                     if opts.get("label_set") is not None else None)
        request = GenerateRequest(
            specs=specs, levels=levels, images=opts["images"], classifier=opts["classifier"],
            lpips=tuple(opts["lpips"] or ["alexnet"]), size=opts["size"],
            crops_per_image=opts["crops_per_image"], max_images=opts["max_images"],
            sentinels=opts["sentinels"], catch=opts["catch"], seed=opts["seed"],
            batch_size=opts["batch_size"], device=opts["device"], autocast=opts["autocast"],
            progress=not opts["no_progress"], protocol=opts.get("protocol") or "jnd",
            versus=versus, rating_shows=opts.get("rating_shows") or "pair",
            label_set=label_set)
        request.check()
    except (EngineError, adaptive.AdaptiveError) as exc:
        raise CommandError(str(exc)) from exc
    return request


def print_import_summary(stdout, study: Study, summary) -> None:
    """The one-line result of an import, and a loud line about untrained networks."""
    protocol = "" if study.protocol == "jnd" else f" ({study.protocol} items)"
    stdout.write(
        f"study {study.slug}: {summary.created} pairs created, {summary.updated} updated,"
        f" {summary.unchanged} unchanged; {summary.conditions} conditions{protocol}")
    if study.protocol == "label":
        stdout.write(f"label set ({len(study.label_set)}): {', '.join(study.label_set)}")
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


def request_settings(request: GenerateRequest) -> dict:
    """The Study fields a study created for ``request``'s items takes (its protocol, and
    the rating / label settings it names)."""
    out: dict = {"protocol": request.protocol}
    if request.protocol == "rating":
        out["rating_shows"] = request.rating_shows
    if request.protocol == "label" and request.label_set is not None:
        out["label_set"] = list(request.label_set)
    return out


@contextmanager
def study_for_import(slug: str, title: str | None, errors: tuple[type[Exception], ...],
                     prefix: str = "", suffix: str = "", settings: dict | None = None):
    """The study ``slug`` (created, validated, when missing) for an import; an error of
    ``errors`` inside the block becomes a CommandError (``prefix`` + its text + ``suffix``),
    and a study created here is deleted again, so a failed import leaves nothing behind.
    ``settings``: further Study fields of a study created here (its ``protocol``,
    ``rating_shows``, ``label_set``: :func:`request_settings`,
    :func:`studyapp.services.manifest_settings`)."""
    study = Study.objects.filter(slug=slug).first()
    created = study is None
    if created:
        study = Study(slug=slug, title=title or slug, **(settings or {}))
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
