"""``manage.py simulate_observers``: simulated participants answering through the scheduler."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from studyapp.simulation import SimulationError, simulate, simulate_protocol

from ._shared import get_study


def parse_thresholds(text: str | None) -> dict[str, float]:
    """``linf=0.02,l2=0.6`` → ``{"linf": 0.02, "l2": 0.6}``."""
    out: dict[str, float] = {}
    for piece in (text or "").split(","):
        if not piece.strip():
            continue
        name, eq, value = piece.partition("=")
        try:
            if not eq:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise CommandError(
                f"--threshold takes THREAT_MODEL=VALUE,... (e.g. linf=0.02), got {piece!r}"
            ) from None
        if out[name.strip()] <= 0:
            raise CommandError(f"--threshold {piece!r}: thresholds must be positive")
    return out


class Command(BaseCommand):
    help = (
        "Simulated observers take whole sessions of a study through the same scheduler code as"
        " people (start, judgments, completion). P(different) is a psychometric function of a"
        " stored distance of the pair (--distance) or of the bound, with guess rate, lapses,"
        " bias and a share of careless responders. They are flagged simulated everywhere;"
        " analyses leave them out unless --include-simulated."
        " Other protocols (engine.observers' models): 2AFC a Thurstonian choice,"
        " P(choose B) = lapse/2 + (1 - lapse) * Phi((d_A - d_B) / sigma) on the"
        " reference-to-copy distances (--distance, --sigma, --lapse-rate); rating a noisy"
        " monotone of distance, round(1 + (N - 1) d / scale + N(0, noise)) clipped to 1..N"
        " (--rating-scale = the distance rated N, --rating-noise; single-image mode rates"
        " quality, N - (N - 1) d / scale + noise); label a confusion growing with the bound,"
        " P(true label) = 1/L + (1 - eps -"
        " 1/L)(1 - logistic(slope * ln(bound / flip bound))) (--threshold = the flip bound per"
        " threat model, --slope, --lapse-rate = eps), wrong answers uniform over the other"
        " labels. --careless answers uniformly at random among the protocol's answers."
    )

    def add_arguments(self, parser):
        parser.add_argument("--study", required=True)
        parser.add_argument("--n", type=int, default=200, help="participants (one session each)")
        parser.add_argument(
            "--distance",
            help="stored distance the observers respond to (e.g. lpips_alexnet); default: the"
            " condition's bound",
        )
        parser.add_argument(
            "--threshold",
            help="THREAT_MODEL=VALUE,...: where the simulated observers answer 'different'"
            " half the time (P(different) = 0.5 with guesses, lapses, spreads and careless"
            " ones included: the p50 that calibrate reports), in the units of --distance or"
            " the bound (default: the median over the pairs)",
        )
        parser.add_argument("--slope", type=float, default=3.0, help="per log unit")
        parser.add_argument("--guess-rate", type=float, default=0.05)
        parser.add_argument("--lapse-rate", type=float, default=0.02)
        parser.add_argument("--careless", type=float, default=0.0, help="share answering at random")
        parser.add_argument("--bias-sd", type=float, default=0.0, help="criterion spread (logit)")
        parser.add_argument("--threshold-sd", type=float, default=0.0,
                            help="between-observer spread of log threshold")
        parser.add_argument("--sigma", type=float,
                            help="2AFC: Thurstonian noise in distance units (default half the"
                            " median |d_A - d_B| of the main triplets)")
        parser.add_argument("--rating-scale", type=float,
                            help="rating: the distance rated N (default the largest item"
                            " distance)")
        parser.add_argument("--rating-noise", type=float, default=0.5,
                            help="rating: noise SD in scale points")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **opts):
        study = get_study(opts["study"])
        if study.protocol != "jnd":
            return self._protocol(study, opts)
        try:
            summary = simulate(
                study, opts["n"], distance=opts["distance"],
                thresholds=parse_thresholds(opts["threshold"]), slope=opts["slope"],
                guess_rate=opts["guess_rate"], lapse_rate=opts["lapse_rate"],
                careless_share=opts["careless"], bias_sd=opts["bias_sd"],
                threshold_sd=opts["threshold_sd"], seed=opts["seed"],
                progress=not opts["no_progress"],
            )
        except SimulationError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"study {study.slug}: {summary.sessions} simulated session(s) completed,"
            f" {summary.judgments} judgments ({summary.careless} careless observer(s))"
        )
        if summary.refused:
            self.stdout.write(f"Stopped early: {summary.refused}")

    def _protocol(self, study, opts) -> None:
        try:
            summary = simulate_protocol(
                study, opts["n"], distance=opts["distance"], sigma=opts["sigma"],
                rating_scale=opts["rating_scale"], rating_noise=opts["rating_noise"],
                thresholds=parse_thresholds(opts["threshold"]), slope=opts["slope"],
                lapse_rate=opts["lapse_rate"], careless_share=opts["careless"],
                seed=opts["seed"], progress=not opts["no_progress"],
            )
        except SimulationError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"study {study.slug} ({study.protocol}): {summary.sessions} simulated session(s)"
            f" completed, {summary.judgments} judgments ({summary.careless} careless"
            " observer(s))"
        )
        if summary.refused:
            self.stdout.write(f"Stopped early: {summary.refused}")
