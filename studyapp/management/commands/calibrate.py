"""``manage.py calibrate``: psychometric fits per threat model → stored calibrated presets."""

from __future__ import annotations

import json
import math

from django.core.management.base import BaseCommand, CommandError

from engine.calibration import calibrate
from studyapp.frames import study_frames
from studyapp.models import Calibration

from ._shared import code_version, get_study


def parse_targets(text: str) -> tuple[float, ...]:
    try:
        targets = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CommandError(f"--targets takes numbers like 0.1,0.25,0.5, got {text!r}") from None
    if not targets or any(not 0 < t < 1 for t in targets):
        raise CommandError(f"--targets must be perceptibilities strictly between 0 and 1: {text!r}")
    return targets

class Command(BaseCommand):
    help = (
        "Fit P(different | bound) = γ + (1−γ−λ)·F(α + β·log bound) per threat model (γ from the"
        " sentinel false-alarm rate, λ fitted or fixed, F logistic or Weibull), find the bounds"
        " at the target perceptibilities with participant-bootstrap intervals, and store them"
        " as calibrated presets (generate_pairs --bounds calibrated:SLUG)."
        " Label studies: fit accuracy(bound) = 1/L + (1 - eps - 1/L)(1 - F(alpha + beta log"
        " bound)) per threat model (eps from the gold items, floor 1/L = chance) and store"
        " the label-flip bound where accuracy falls to each --targets accuracy (default: midway"
        " between clean accuracy and chance) as presets, with participant-bootstrap intervals"
        " (engine.protocol_analysis.label_flip_bound). 2AFC and rating studies have no"
        " calibration (analyze reports them)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True)
        parser.add_argument("--targets", default=None,
                            help="JND: target perceptibilities (default 0.1,0.25,0.5); label:"
                            " target accuracies (default: the midpoint between clean and"
                            " chance)")
        parser.add_argument("--sigmoid", choices=["logistic", "weibull"], default="logistic")
        parser.add_argument("--lapse", default="fit", help="'fit' or a fixed rate, e.g. 0.02")
        parser.add_argument("--n-boot", type=int, default=200)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--include-simulated", action="store_true")
        parser.add_argument("--include-excluded", action="store_true")
        parser.add_argument("--dry-run", action="store_true", help="fit and print; store nothing")

    def handle(self, *args, **opts):
        study = get_study(opts["study"])
        if study.protocol in ("2afc", "rating"):
            raise CommandError(
                f"study {study.slug!r} runs the {study.protocol} protocol: calibration is for"
                " jnd studies (perceptibility) and label studies (the label-flip bound); its"
                f" statistics come from `manage.py analyze --study {study.slug}`")
        if opts["n_boot"] < 0:
            raise CommandError("--n-boot must be >= 0")
        if study.protocol == "label":
            return self._label(study, opts)
        targets = parse_targets(opts["targets"] or "0.1,0.25,0.5")
        lapse = opts["lapse"]
        if lapse != "fit":
            try:
                lapse = float(lapse)
            except ValueError:
                raise CommandError(f"--lapse must be 'fit' or a number, got {lapse!r}") from None
            if not 0 <= lapse < 0.5:
                raise CommandError(f"--lapse must be in [0, 0.5), got {lapse}")
        if opts["n_boot"] < 0:
            raise CommandError("--n-boot must be >= 0")
        pairs, judgments = study_frames(
            study, include_excluded=opts["include_excluded"],
            include_simulated=opts["include_simulated"],
        )
        data = judgments.merge(pairs[["pair", "bound"]], on="pair").dropna(subset=["bound"])
        if data.empty:
            hint = "" if opts["include_simulated"] else " (simulated ones need --include-simulated)"
            raise CommandError(f"study {study.slug!r} has no judgments of perturbed pairs{hint}")
        per_tm = data.merge(pairs[["pair", "threat_model"]], on="pair").groupby(
            "threat_model")["bound"].nunique()
        few = sorted(per_tm[per_tm < 2].index)
        if few:
            raise CommandError(
                f"threat model(s) {few} have judgments at fewer than 2 bounds; a psychometric"
                " function needs at least 2 (better 3 or more)"
            )
        # Sessions dropped for too many sentinel false alarms leave the kept sentinels biased
        # towards "same": then γ is estimated jointly, given that kept sessions passed.
        limit = None if opts["include_excluded"] else study.max_sentinel_false_alarm
        try:
            result = calibrate(
                pairs, judgments, targets=targets, n_boot=opts["n_boot"], seed=opts["seed"],
                sigmoid=opts["sigmoid"], lapse=lapse, sentinel_limit=limit,
            )
        except ValueError as exc:  # e.g. no sentinel judgments to estimate γ from
            raise CommandError(str(exc)) from None
        presets = result.presets()
        if result.guess_method == "joint":
            self.stdout.write(
                f"γ = {result.guess_rate:.4f}, estimated jointly (sentinels of kept sessions"
                f" given that they passed the false-alarm limit {limit:g}, and the main"
                f" judgments' lower asymptote); raw kept-sentinel rate"
                f" {result.n_sentinel_different}/{result.n_sentinel}"
            )
        else:
            self.stdout.write(
                f"γ (sentinel false-alarm rate) = {result.guess_rate:.4f}"
                f" ({result.n_sentinel_different}/{result.n_sentinel})"
            )
        for tm, cal in sorted(result.threat_models.items()):
            fit = cal.fit
            self.stdout.write(
                f"{tm}: {cal.n_judgments} judgments, {cal.n_participants} participants;"
                f" {fit.sigmoid} fit α={fit.alpha:.4g} β={fit.beta:.4g} λ={fit.lapse_rate:.4g},"
                f" deviance {fit.deviance:.3g} on {fit.df} df (p={fit.p_value:.3g})"
            )
            for _, t in cal.thresholds.iterrows():
                self.stdout.write(
                    f"  {t['label']}: bound {t['bound']:.6g} (95% {t['low']:.6g} .."
                    f" {t['high']:.6g}; {int(t['n_boot_valid'])}/{result.n_boot} replicates)"
                )
        for tm, flags in sorted(result.flags().items()):
            for flag in flags:
                self.stdout.write(f"WARNING {tm}: {flag}")
        for tm, why in sorted(result.skipped.items()):
            self.stdout.write(f"{tm}: skipped ({why})")
        if opts["dry_run"]:
            self.stdout.write("Dry run: nothing stored.")
            return
        clean = json.loads(json.dumps(presets, default=float).replace("NaN", "null"))
        counts = {
            "n_judgments": int(sum(c.n_judgments for c in result.threat_models.values())),
            "n_sentinel_judgments": result.n_sentinel,
            "n_participants": int(judgments["participant"].nunique()),
            "n_sessions": int(judgments["session"].nunique()),
        }
        row = Calibration.objects.create(
            study=study, targets=list(targets), fit=result.to_dict(),
            presets={tm: {k: (v if v is not None and math.isfinite(v) else None)
                          for k, v in d.items()} for tm, d in clean.items()},
            counts=counts,
            settings={"sigmoid": opts["sigmoid"], "lapse": lapse, "n_boot": opts["n_boot"],
                      "guess_method": result.guess_method, "sentinel_limit": limit,
                      "seed": opts["seed"], "include_simulated": opts["include_simulated"],
                      "include_excluded": opts["include_excluded"]},
            code_version=code_version(),
        )
        self.stdout.write(
            f"Stored calibration {row.pk} of study {study.slug}; use it with"
            f" generate_pairs --bounds calibrated:{study.slug}"
        )

    def _label(self, study, opts) -> None:
        """The label-flip bound per threat model at each target accuracy, stored as presets
        ``{threat_model: {"midpoint" | "acc<NN>": bound}}``."""
        from engine.protocol_analysis import label_flip_bound
        from studyapp.protocol_rows import label_rows

        targets = (None,) if opts["targets"] is None else tuple(
            float(t) for t in parse_targets(opts["targets"]))
        rows = label_rows(study, include_excluded=opts["include_excluded"],
                          include_simulated=opts["include_simulated"])
        if rows.empty:
            hint = "" if opts["include_simulated"] else " (simulated ones need --include-simulated)"
            raise CommandError(f"study {study.slug!r} has no label judgments{hint}")
        tables, presets = {}, {}
        for target in targets:
            name = "midpoint" if target is None else f"acc{round(100 * target):g}"
            try:
                table = label_flip_bound(rows, target=target, label_set=study.label_set or None,
                                         n_boot=opts["n_boot"], seed=opts["seed"])
            except ValueError as exc:
                raise CommandError(f"cannot fit the label-flip bound: {exc}") from None
            tables[name] = table
            for r in table.to_dict("records"):
                bound = r["flip_bound"]
                presets.setdefault(r["threat_model"], {})[name] = (
                    float(bound) if bound is not None and math.isfinite(bound) else None)
                self.stdout.write(
                    f"{r['threat_model']} {name}: label-flip bound {bound:.6g} (95%"
                    f" {r['low']:.6g} .. {r['high']:.6g}; {int(r['n_boot_valid'])}/"
                    f"{opts['n_boot']} replicates) at accuracy {r['target_accuracy']:.3f};"
                    f" clean error {r['clean_error']:.3f}, floor {r['floor_accuracy']:.3f},"
                    f" {r['n_judgments']} judgments at {r['n_bounds']} bounds")
                if r["fit_flag"]:
                    self.stdout.write(f"WARNING {r['threat_model']}: {r['fit_flag']}")
        if opts["dry_run"]:
            self.stdout.write("Dry run: nothing stored.")
            return
        fit = json.loads(json.dumps(
            {"protocol": "label", "tables": {k: t.to_dict("records") for k, t in tables.items()}},
            default=float).replace("NaN", "null"))
        kept = rows
        if not opts["include_excluded"]:
            kept = kept[~kept["excluded"]]
        row = Calibration.objects.create(
            study=study, targets=["midpoint" if t is None else t for t in targets], fit=fit,
            presets=presets,
            counts={"n_judgments": int(len(kept)), "n_participants":
                    int(kept["participant"].nunique()),
                    "n_sessions": int(kept["session"].nunique())},
            settings={"kind": "label_flip_bound", "n_boot": opts["n_boot"],
                      "seed": opts["seed"], "include_simulated": opts["include_simulated"],
                      "include_excluded": opts["include_excluded"]},
            code_version=code_version(),
        )
        self.stdout.write(
            f"Stored calibration {row.pk} of study {study.slug} (label-flip bounds); use it"
            f" with generate_pairs --bounds calibrated:{study.slug}")
