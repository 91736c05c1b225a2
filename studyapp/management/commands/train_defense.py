"""``manage.py train_defense``: train a defense with ``python -m engine train`` and record it.

The engine does the work (in this process, or under ``torchrun`` with ``--nproc-per-node``);
Django only records the run (:class:`studyapp.models.DefenseRun`).
"""

from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from engine.provenance import untrained_in_params
from studyapp.models import DefenseRun, Study

from ._shared import run_engine


class Command(BaseCommand):
    help = ("Train a defense (engine.objectives method) through `python -m engine train` and"
            " record the run; re-running with the same --name resumes it.")

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True, help="run name (slug); the run folder is"
                            " var/runs/NAME unless --out is given")
        parser.add_argument("--out", help="run folder")
        parser.add_argument("--study", help="slug of the study the defense belongs to")
        parser.add_argument("--method", default="standard")
        parser.add_argument("--set", dest="settings", action="append", default=[],
                            metavar="KEY=VALUE", help="method parameter, repeatable")
        parser.add_argument("--arch", default="tiny")
        parser.add_argument("--dataset", default="digits")
        parser.add_argument("--preset")
        parser.add_argument("--epochs", type=int)
        parser.add_argument("--batch-size", type=int)
        parser.add_argument("--image-size", type=int)
        parser.add_argument("--data-root")
        parser.add_argument("--device", default="auto")
        parser.add_argument("--nproc-per-node", type=int, default=1,
                            help="> 1: launch the engine under torchrun with this many processes")
        parser.add_argument("--engine-arg", action="append", default=[],
                            help="any further `python -m engine train` option, repeatable")

    def handle(self, *args, **opts):
        study = None
        if opts["study"]:
            study = Study.objects.filter(slug=opts["study"]).first()
            if study is None:
                raise CommandError(f"no study with slug {opts['study']!r}")
        out = Path(opts["out"] or Path("var/runs") / opts["name"])
        argv = ["train", "--out", str(out), "--method", opts["method"], "--arch", opts["arch"],
                "--dataset", opts["dataset"], "--device", opts["device"], "--no-progress"]
        for key in ("preset", "epochs", "batch_size", "image_size", "data_root"):
            if opts[key] is not None:
                argv += [f"--{key.replace('_', '-')}", str(opts[key])]
        for setting in (opts.get("settings") or []):
            argv += ["--set", setting]
        argv += (opts.get("engine_arg") or [])
        run, _ = DefenseRun.objects.update_or_create(name=opts["name"], defaults=dict(
            study=study, method=opts["method"], arch=opts["arch"], dataset=opts["dataset"],
            method_params=dict(s.split("=", 1) for s in (opts.get("settings") or []) if "=" in s),
            run_dir=str(out), status="running", finished_at=None))
        code = run_engine(argv, opts["nproc_per_node"])
        if code != 0:
            run.status = "failed"
            run.save(update_fields=["status"])
            raise CommandError(f"`python -m engine {' '.join(argv)}` failed (exit {code})")
        record = json.loads((out / "config.json").read_text())
        run.config = record
        run.dataset_label = record.get("dataset_label", "")
        run.status, run.finished_at = "finished", timezone.now()
        run.save()
        self.stdout.write(f"trained {run.name}: {out} ({run.dataset_label})")
        untrained = untrained_in_params(run.method_params)
        if untrained:
            run.config = {**record, "untrained": untrained}
            run.save(update_fields=["config"])
            self.stdout.write(f"UNTRAINED networks used in training: {', '.join(untrained)}")
