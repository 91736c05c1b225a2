"""The judgment POST per protocol (issue 18), against JND's in the same run.

Each protocol's check (its answers, its phases: :class:`studyapp.serializers.
JudgmentInputSerializer` with the session's TrialSpec, cached per session token) must not make
the hottest endpoint slower than JND's. One process, a fresh SQLite database in a temporary
folder, Django's test client (the whole view: parsing, validation, the scheduler's three
statements, the response); sessions of every protocol answered in an interleaved order, so
load on the machine hits every protocol alike. Reports the median time per POST and its ratio
to JND's.

    PYTHONPATH=$PWD .venv/bin/python bench/protocol_post.py [--sessions 40]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=40, help="sessions per protocol")
    parser.add_argument("--trials", type=int, default=20, help="main trials per session")
    args = parser.parse_args()

    var = tempfile.mkdtemp(prefix="protocol-post-")
    os.environ.update(DJANGO_SETTINGS_MODULE="studyapp.settings", PERCEPTLAB_VAR=var,
                      DJANGO_SECRET_KEY="bench-only", PERCEPTLAB_PREPARE_ON_START="0")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.test import Client

    from studyapp.models import Condition, Pair, Participant, Study
    from studyapp.protocols import trial_spec
    from studyapp.scheduler import start_session

    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_CLASSES": []}
    call_command("migrate", verbosity=0, interactive=False)
    variants = {
        "jnd": {}, "2afc": {"protocol": "2afc"}, "rating": {"protocol": "rating"},
        "rating-single": {"protocol": "rating", "rating_shows": "single"},
        "label": {"protocol": "label", "label_set": ["person", "cat", "cup", "ship"]},
    }
    answers = {"jnd": "same", "2afc": "left", "rating": "3", "rating-single": "4",
               "label": "cup"}
    work = []  # (variant, token, position, phases)
    for name, fields in variants.items():
        study = Study.objects.create(
            slug=f"bench-{name}", title=name, trials_per_session=args.trials,
            sentinel_fraction=0.0, practice_trials=0,
            judgments_per_pair=args.sessions, **fields,
        )
        condition = Condition.objects.create(study=study, threat_model="linf", bound=8 / 255,
                                             spec="linf:bound=8/255")
        Pair.objects.bulk_create(
            Pair(study=study, condition=condition, key=f"{name}|{i}", source_image=str(i),
                 natural_path=f"n{i}.png", other_path=f"o{i}.png",
                 third_path=f"t{i}.png" if name == "2afc" else "",
                 class_name="cat" if name == "label" else "", width=96, height=96)
            for i in range(args.trials)
        )
        phases = trial_spec(study).phases
        for s in range(args.sessions):
            session = start_session(Participant.objects.create(study=study, external_id=str(s)))
            work += [(name, session.token, p, phases) for p in range(args.trials)]
    random.Random(0).shuffle(work)
    client = Client(HTTP_HOST="localhost")
    durations = {"first_ms": 300.0, "blank_ms": 100.0, "second_ms": 300.0}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, token, position, phases in work:
        body = {"position": position, "response": answers[name], "response_time_ms": 500.0,
                "durations": {k: durations[k] for k in phases},
                "idempotency_key": str(uuid.uuid4())}
        started = time.perf_counter()
        response = client.post(f"/api/sessions/{token}/judgments/", body,
                               content_type="application/json")
        times[name].append(time.perf_counter() - started)
        assert response.status_code == 201, response.content
    jnd = statistics.median(times["jnd"])
    print(f"judgment POST, {args.sessions} sessions × {args.trials} trials per protocol "
          f"(SQLite, Django test client, interleaved):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:14s} median {median * 1e3:6.2f} ms   ÷ JND {median / jnd:5.2f}")


if __name__ == "__main__":
    sys.exit(main())
