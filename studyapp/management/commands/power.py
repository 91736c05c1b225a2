"""``manage.py power``: how many judgments a target interval width needs.

Two questions:

* ``--threshold-width W``: the judgments a fixed design on ``--bounds`` needs so that the
  bootstrap 95 % interval of the ``--p`` threshold is at most ``W`` wide in natural-log bound
  units (``ln high − ln low``), by simulating and calibrating the study
  (:func:`engine.observers.power`) under an assumed psychometric function (``--threshold``,
  ``--slope``; or the study's latest calibration with ``--study``).
* ``--width W``: judgments per condition for a 95 % Wilson interval of perceptibility no wider
  than ``W`` (:func:`engine.analysis.wilson_sample_size`), at ``--p`` or at each condition's
  observed perceptibility (``--study``).
"""

from __future__ import annotations

import math

import pandas as pd
from django.core.management.base import BaseCommand, CommandError

from engine.analysis import wilson_sample_size
from engine.observers import ObserverPopulation, power
from studyapp.frames import study_frames

from ._shared import get_study


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"{what} takes comma-separated numbers, got {text!r}") from None


class Command(BaseCommand):
    help = (
        "Judgments needed for a target interval width: of a calibrated threshold"
        " (--threshold-width, simulated with engine.observers.power) or of one condition's"
        " perceptibility (--width, Wilson interval)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--width", type=float, help="full Wilson interval width (0..1)")
        parser.add_argument(
            "--threshold-width", type=float,
            help="target width of the threshold's 95%% interval in ln-bound units")
        parser.add_argument("--p", type=float,
                            help="perceptibility (--width) or threshold target (default 0.5)")
        parser.add_argument("--study", help="observed perceptibilities (--width), or the"
                            " bounds and latest calibration (--threshold-width)")
        parser.add_argument("--include-simulated", action="store_true")
        parser.add_argument("--threat-model", default=None)
        parser.add_argument("--bounds", help="design bounds, comma-separated")
        parser.add_argument("--threshold", type=float,
                            help="assumed bound where F = 1/2 (logistic)")
        parser.add_argument("--slope", type=float, default=3.0, help="per ln bound")
        parser.add_argument("--guess-rate", type=float, default=0.04)
        parser.add_argument("--lapse-rate", type=float, default=0.02)
        parser.add_argument("--n-grid", default="300,600,1200,2400,4800,9600")
        parser.add_argument("--repetitions", type=int, default=20)
        parser.add_argument("--n-boot", type=int, default=200)
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args, **opts):
        if (opts["width"] is None) == (opts["threshold_width"] is None):
            raise CommandError("give one of --width or --threshold-width")
        if opts["p"] is not None and not 0 <= opts["p"] <= 1:
            raise CommandError(f"--p must be between 0 and 1, got {opts['p']}")
        if opts["threshold_width"] is not None:
            return self._threshold_power(opts)
        width = opts["width"]
        if not 0 < width < 1:
            raise CommandError(f"--width must be between 0 and 1, got {width}")
        if not opts["study"]:
            p = 0.5 if opts["p"] is None else opts["p"]
            self.stdout.write(
                f"p={p:.3f}: {wilson_sample_size(p, width)} judgments for width {width}")
            return
        study = get_study(opts["study"])
        pairs, judgments = study_frames(study, include_simulated=opts["include_simulated"])
        merged = judgments.merge(pairs[["pair", "condition"]], on="pair").dropna(
            subset=["condition"])
        if merged.empty:
            raise CommandError(f"study {study.slug!r} has no judgments of perturbed pairs yet")
        for condition, g in merged.groupby("condition", sort=True):
            p = float(g["different"].mean()) if opts["p"] is None else opts["p"]
            need = wilson_sample_size(p, width)
            self.stdout.write(
                f"{condition}: p={p:.3f}, have {len(g)}, need {need}"
                f" ({max(need - len(g), 0)} more)"
            )

    def _threshold_power(self, opts) -> None:
        target_width = opts["threshold_width"]
        if not target_width > 0:
            raise CommandError(f"--threshold-width must be > 0, got {target_width}")
        p = 0.5 if opts["p"] is None else opts["p"]
        tm = opts["threat_model"]
        threshold, slope = opts["threshold"], opts["slope"]
        gamma, lam = opts["guess_rate"], opts["lapse_rate"]
        bounds = _floats(opts["bounds"], "--bounds") if opts["bounds"] else None
        sigmoid = "logistic"
        if opts["study"]:
            from studyapp.dashboard_figures import latest_calibration

            study = get_study(opts["study"])
            pairs, _ = study_frames(study)
            data = pairs[pairs["bound"].notna() & pairs["threat_model"].notna()]
            tms = sorted(data["threat_model"].unique())
            if tm is None and len(tms) == 1:
                tm = tms[0]
            if tm not in tms:
                raise CommandError(f"--threat-model must be one of {tms}, got {tm!r}")
            if bounds is None:
                bounds = sorted(data.loc[data["threat_model"] == tm, "bound"].unique())
            cal = latest_calibration(study)
            if threshold is None and cal is not None and tm in cal.threat_models:
                fit = cal.threat_models[tm].fit
                # F(α + β ln b) = F(β (ln b − ln t)) with ln t = −α/β (both sigmoids)
                threshold = math.exp(-fit.alpha / fit.beta)
                slope, gamma, lam = fit.beta, fit.guess_rate, fit.lapse_rate
                sigmoid = fit.sigmoid
                self.stdout.write(
                    f"Assuming calibration of {study.slug}: threshold {threshold:.6g},"
                    f" slope {slope:.4g}, γ {gamma:.4g}, λ {lam:.4g} ({sigmoid})")
        tm = tm or "linf"
        if threshold is None or not bounds or len(bounds) < 2:
            raise CommandError("--threshold-width needs --threshold (or a calibrated --study)"
                               " and at least 2 --bounds (or a --study)")
        if not gamma < p < 1 - lam:
            raise CommandError(f"--p must lie between γ={gamma:.4g} and 1 − λ={1 - lam:.4g}")
        try:
            population = ObserverPopulation(functions={tm: (threshold, slope)},
                                            guess_rate=gamma, lapse_rate=lam, sigmoid=sigmoid)
            table = power(population, tm, bounds, target_width=target_width, p=p,
                          n_grid=[int(n) for n in _floats(opts["n_grid"], "--n-grid")],
                          repetitions=opts["repetitions"], n_boot=opts["n_boot"],
                          seed=opts["seed"], sigmoid=sigmoid)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"{tm}: p{round(p * 100)} threshold, bounds {', '.join(f'{b:.4g}' for b in bounds)},"
            f" target width {target_width} (ln units); {opts['repetitions']} simulated studies"
            " per size")
        with pd.option_context("display.float_format", "{:.4f}".format):
            self.stdout.write(table.to_string(index=False))
        reached = table[table["reaches_target"]] if "reaches_target" in table else table[:0]
        if reached.empty:
            self.stdout.write(f"No size in --n-grid reaches width {target_width}.")
        else:
            self.stdout.write(
                f"Needed: about {int(reached['n_judgments'].iloc[0])} judgments on the"
                " adversarial pairs (plus sentinels).")
