"""``manage.py evaluate_defense``: evaluate recorded defenses with ``python -m engine evaluate``
and store the accuracies (:class:`studyapp.models.DefenseResult`), attached to a study."""

from __future__ import annotations

import json
import re
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from studyapp.models import DefenseResult, DefenseRun, Study
from studyapp.robustness import store_checks

from .train_defense import run_engine

SKIP = {"model", "dataset", "images"}


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
        parser.add_argument("--calibrated", help="JSON {threat_model: {label: bound}}")
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
            argv += ["--calibrated", opts["calibrated"]]
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


def _bound(column: str) -> float | None:
    match = re.search(r" ([0-9.eE+-]+)$", column)
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None


@transaction.atomic
def store_results(result: dict, runs: list[DefenseRun], study, out: Path) -> int:
    created = 0
    for run, row in zip(runs, result["rows"], strict=True):
        specs = result["columns"].get(row["model"], {})
        for column, value in row.items():
            if column in SKIP or value is None:
                continue
            DefenseResult.objects.create(
                run=run, study=study, column=column, threat_model=column.split(" ")[0],
                bound=_bound(column), spec=specs.get(column, ""), accuracy=value,
                n_images=row["images"], evaluation_dir=str(out))
            created += 1
        for item in result["perceptibility"].get(row["model"], []):
            DefenseResult.objects.create(
                run=run, study=study, column=f"{item['threat_model']} {item['level']}",
                threat_model=item["threat_model"], bound=item["bound"],
                perceptibility=item["level"], accuracy=item["accuracy"],
                n_images=row["images"], evaluation_dir=str(out))
            created += 1
    return created
