"""``manage.py demo``: a ready-to-take JND study built from the bundled photographs."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from engine.attacks.spec import expand_specs
from engine.distances import build_lpips
from engine.errors import EngineError, WeightsUnavailableError
from engine.generate import GenerateRequest
from engine.models import load_classifier
from studyapp.models import Study
from studyapp.services import (
    StimulusImportError,
    generate_into_study,
    pretrained_or_untrained,
)

# PAT paper, table 4 (ImageNet-100, 224 px): the named bounds resolve to its small / medium /
# large bounds, divided by 255 for our [0, 1] images (engine.attacks.spec).
DEMO_THREAT_MODELS = ("linf", "l2")
DEMO_BOUNDS = ("small", "medium", "large")
DEMO_CONSENT = (
    "This is a demonstration of a perceptual study. You will see pairs of images and say "
    "whether they are the same. It takes about five minutes.\n\n"
    "We store your answers, their timing and your screen's size; no name, no e-mail. Your "
    "IP address is stored only as a salted hash, to detect repeated participation. You may "
    "stop at any time by closing the page.\n\n"
    "Choose \u201cI agree\u201d to take part."
)


def _command_paths() -> tuple[str, str]:
    """How to call this Python and ``manage.py`` from the current directory, as printed."""
    cwd = Path.cwd()
    python = Path(sys.executable)  # the venv's python: not resolved, so the venv stays
    manage = Path(settings.BASE_DIR) / "manage.py"

    def shown(path: Path) -> str:
        try:
            return str(path.relative_to(cwd))
        except ValueError:
            return str(path)

    return shown(python), shown(manage)


DEMO_INSTRUCTIONS = (
    # Only what the generic protocol text (templates/_protocol.html, with the study's own keys
    # and durations) does not say: the instructions are given once.
    "The changed images were made by algorithms that try to fool an image classifier: some"
    " changes are easy to see, many are very subtle. Answer as well as you can; guessing is"
    " fine."
)


class Command(BaseCommand):
    help = (
        "Build (or refresh) the demo study from scikit-image's bundled photographs: L-inf and L2"
        " PGD at the PAT paper's three ImageNet bounds each, plus sentinel pairs. Uses"
        " ImageNet-pretrained torchvision weights when they load, else explicitly untrained"
        " networks (said in the output and in the study's description). Prints the"
        " participant link, the staff link and staff credentials."
    )

    def add_arguments(self, parser):
        parser.add_argument("--slug", default="demo")
        parser.add_argument("--classifier", default="resnet18")
        parser.add_argument("--lpips", default="alexnet")
        parser.add_argument("--size", type=int, default=224, help="crop side in pixels")
        parser.add_argument("--crops-per-image", type=int, default=2)
        parser.add_argument("--num-iterations", type=int, default=10)
        parser.add_argument("--trials-per-session", type=int, default=20)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--host", default="127.0.0.1:8000", help="host:port for the links")
        parser.add_argument("--staff-user", default="staff")
        parser.add_argument("--serve", action="store_true", help="then run the dev server")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **opts):
        call_command("migrate", verbosity=0, interactive=False)
        log = self.stdout.write
        classifier = pretrained_or_untrained(load_classifier, opts["classifier"], log)
        lpips = pretrained_or_untrained(build_lpips, opts["lpips"], log)
        untrained = [s for s in (classifier, lpips) if s.endswith(":untrained")]
        specs = expand_specs(
            [f"{name}:num_iterations={opts['num_iterations']}" for name in DEMO_THREAT_MODELS],
            list(DEMO_BOUNDS),
        )
        description = (
            f"Demo study: bundled scikit-image photographs, {opts['crops_per_image']} crop(s)"
            f" each at {opts['size']} px; L-inf and L2 PGD at the PAT paper's table-4 bounds"
            f" against {classifier}; LPIPS measured with {lpips}."
        )
        if untrained:
            description += (
                f" Networks are UNTRAINED ({', '.join(untrained)}): pretrained weights were not"
                " available offline, so attack success is against a random network."
            )
        study, _ = Study.objects.update_or_create(
            slug=opts["slug"],
            defaults={
                "title": "Demo: are these two images the same?",
                "description": description,
                "instructions": DEMO_INSTRUCTIONS,
                "consent_text": DEMO_CONSENT,
                "trials_per_session": opts["trials_per_session"],
                "catch_fraction": 0.1,  # catch pairs among the main trials: the catch row has data
                "is_active": True,
            },
        )
        request = GenerateRequest(
            specs=specs,
            device="cpu",
            images="skimage",
            classifier=classifier,
            lpips=(lpips,),
            size=opts["size"],
            crops_per_image=opts["crops_per_image"],
            catch=6,
            seed=opts["seed"],
        )
        try:
            summary = generate_into_study(study, request, progress=not opts["no_progress"])
        except (EngineError, WeightsUnavailableError, StimulusImportError) as exc:
            raise CommandError(str(exc)) from exc
        password = secrets.token_urlsafe(12)
        user, _ = get_user_model().objects.get_or_create(username=opts["staff_user"])
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        base = f"http://{opts['host']}"
        log(
            f"\nDemo study {study.slug!r}: {study.pairs.count()} pairs"
            f" ({study.pairs.filter(is_sentinel=True).count()} sentinels),"
            f" {study.conditions.count()} conditions"
            f" [{summary.created} new, {summary.updated} updated, {summary.unchanged} unchanged]"
        )
        if untrained:
            log(f"NOTE: UNTRAINED networks were used: {', '.join(untrained)}")
        log(f"Participant link: {base}/study/{study.slug}/")
        log(f"Staff page:       {base}/staff/   (admin: {base}/admin/)")
        log(f"Dashboard:        {base}/dashboard/{study.slug}/   (figures, fits, QC)")
        log(f"Staff login:      {opts['staff_user']} / {password}")
        python, manage = _command_paths()
        log(f"Results:          {python} {manage} analyze --study {study.slug}")
        log(f"Quality control:  {python} {manage} quality --study {study.slug}")
        if opts["serve"]:
            call_command("runserver", opts["host"], use_reloader=False)
