"""``manage.py evaluate_defense``: evaluate recorded defenses with ``python -m engine evaluate``
and store the accuracies (:class:`studyapp.models.DefenseResult`), attached to a study."""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from studyapp.adaptive import AdaptiveError, calibrated_bounds
from studyapp.models import DefenseResult, DefenseRun, Study
from studyapp.robustness import store_checks

from ._shared import run_engine


class Command(BaseCommand):
    help = ("Evaluate trained defenses (accuracy under attack specs, AutoAttack, union,"
            " perceptibility-matched bounds) and record the results against a study.")

    def add_arguments(self, parser):
        parser.add_argument("--run", dest="runs", action="append", required=True,
                            help="DefenseRun name, repeatable")
        parser.add_argument("--study", help="study slug to attach results to (default: the"
                            " run's study)")
        parser.add_argument("--out", help="evaluation folder (default var/evaluations/RUNS)")
        parser.add_argument("--spec", dest="specs", action="append", default=[])
        parser.add_argument("--autoattack", action="append", default=[], metavar="NORM:EPS")
        parser.add_argument("--autoattack-version", choices=["standard", "fast"],
                            default="standard")
        parser.add_argument("--calibrated", help="calibrated:SLUG (the latest calibration of a"
                            " study) or a JSON file {threat_model: {label: bound}}")
        parser.add_argument("--sanity", action="store_true")
        parser.add_argument("--limit", type=int, default=500)
        parser.add_argument("--image-size", type=int)
        parser.add_argument("--device", default="auto")

    def handle(self, *args, **opts):
        runs = []
        for name in opts["runs"]:
            run = DefenseRun.objects.filter(name=name).first()
            if run is None:
                raise CommandError(f"no defense run named {name!r}; train it with"
                                   " `manage.py train_defense --name ...`")
            runs.append(run)
        study = runs[0].study
        if opts["study"]:
            study = Study.objects.filter(slug=opts["study"]).first()
            if study is None:
                raise CommandError(f"no study with slug {opts['study']!r}")
        out = Path(opts["out"] or Path("var/evaluations") / "+".join(opts["runs"]))
        argv = ["evaluate", "--out", str(out), "--limit", str(opts["limit"]),
                "--device", opts["device"], "--autoattack-version", opts["autoattack_version"],
                "--no-progress"]
        for run in runs:
            argv += ["--run", run.run_dir]
        for spec in opts.get("specs") or []:
            argv += ["--spec", spec]
        for aa in opts.get("autoattack") or []:
            argv += ["--autoattack", aa]
        if opts["calibrated"]:
            argv += ["--calibrated", str(calibrated_file(opts["calibrated"], out))]
        if opts["sanity"]:
            argv.append("--sanity")
        if opts["image_size"]:
            argv += ["--image-size", str(opts["image_size"])]
        code = run_engine(argv)
        if code != 0:
            raise CommandError(f"`python -m engine {' '.join(argv)}` failed (exit {code})")
        result = json.loads((out / "results.json").read_text())
        with transaction.atomic():  # results and their masking checks (--sanity) together
            created = store_results(result, runs, study, out)
            checks = store_checks(result, runs, study, out)
        self.stdout.write(f"stored {created} results and {checks} sanity checks"
                          f" ({result['dataset_label']}) in {out}")
        if result.get("untrained"):
            self.stdout.write("UNTRAINED networks used by the attacks (recorded in"
                              f" {out / 'results.json'}): {', '.join(result['untrained'])}")


def calibrated_file(text: str, out: Path) -> Path:
    """``calibrated:SLUG`` → the study's latest calibration presets written to
    ``OUT/calibrated.json`` (with the calibration's id); a path is returned unchanged."""
    if not text.startswith("calibrated:"):
        return Path(text)
    try:
        row, presets = calibrated_bounds(text.partition(":")[2])
    except AdaptiveError as exc:
        raise CommandError(str(exc)) from exc
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibrated.json"
    path.write_text(json.dumps({"presets": presets, "note": f"Calibration {row.pk} of study"
                                f" {row.study.slug} ({row.code_version})."}, indent=1))
    return path


@transaction.atomic
def store_results(result: dict, runs: list[DefenseRun], study, out: Path) -> int:
    """One :class:`DefenseResult` per model and accuracy column, from the structured columns
    the engine writes (``column_info``: kind, threat model, bound, label, spec); no column
    name or spec text is parsed here."""
    created = 0
    for run, row in zip(runs, result["rows"], strict=True):
        info = result["column_info"][row["model"]]
        for column, value in row.items():
            if column not in info or value is None:
                continue
            c = info[column]
            threat = c["threat_model"] if c["kind"] in ("attack", "autoattack") else c["kind"]
            DefenseResult.objects.create(
                run=run, study=study, column=column, threat_model=threat, bound=c["bound"],
                label=c["label"], spec=c["spec"], accuracy=value, n_images=row["images"],
                evaluation_dir=str(out))
            created += 1
        for item in result["perceptibility"].get(row["model"], []):
            DefenseResult.objects.create(
                run=run, study=study, column=f"{item['threat_model']} {item['label']}",
                threat_model=item["threat_model"], bound=item["bound"], label=item["label"],
                perceptibility=item["label"], spec=item["spec"], accuracy=item["accuracy"],
                n_images=row["images"], evaluation_dir=str(out))
            created += 1
    return created
