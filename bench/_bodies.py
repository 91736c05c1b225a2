"""A simulated participant's judgment body: one definition for ``bench/load.py`` (project env)
and ``bench/locustfile.py`` (the load tool's env); plain Python, no imports of either."""

from __future__ import annotations

import random
import uuid


def judgment_body(position: int, rng: random.Random) -> dict:
    """A valid ``POST /api/sessions/<token>/judgments/`` body with a fresh idempotency key."""
    return {
        "position": position,
        "response": rng.choice(["same", "different"]),
        "response_time_ms": round(rng.uniform(350, 1400), 1),
        "durations": {
            "first_ms": round(rng.gauss(1000, 2), 1),
            "blank_ms": round(rng.gauss(250, 2), 1),
            "second_ms": round(rng.gauss(1000, 2), 1),
        },
        "idempotency_key": uuid.uuid4().hex,
    }
