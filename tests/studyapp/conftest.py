"""A small real study: scikit-image photographs as 96×96 PNG pairs in a temporary MEDIA_ROOT."""

from __future__ import annotations

import uuid
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.transform import resize

from studyapp.models import Condition, Pair, Participant, Session, Study
from studyapp.scheduler import start_session

SIZE = 96
PHOTOS = {"astronaut": skdata.astronaut, "chelsea": skdata.chelsea, "coffee": skdata.coffee}
# Sign noise of ±bound·255 per pixel and channel: clearly visible at 32/255.
CONDITIONS = [("linf", 8 / 255, "small"), ("linf", 32 / 255, "large")]


@cache
def natural_image(name: str) -> np.ndarray:
    """Central square crop of a scikit-image photograph, resized to SIZE×SIZE, uint8 RGB."""
    photo = PHOTOS[name]()
    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = photo[top : top + side, left : left + side, :3]
    small = resize(square, (SIZE, SIZE), anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def perturbed_image(name: str, bound: float, seed: int) -> np.ndarray:
    """``natural_image(name)`` plus random-sign noise of ``bound`` (in [0,1] pixel units)."""
    rng = np.random.default_rng(seed)
    noise = rng.choice([-1.0, 1.0], size=(SIZE, SIZE, 3)) * bound * 255
    return np.clip(np.rint(natural_image(name) + noise), 0, 255).astype(np.uint8)


def write_png(root: Path, relative: str, pixels: np.ndarray) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return relative


@pytest.fixture
def media_root(settings, tmp_path) -> Path:
    from studyapp.stimulus_server import trial_paths

    root = tmp_path / "media"
    root.mkdir()
    settings.MEDIA_ROOT = root
    settings.PERCEPTLAB_ROWS_DIR = tmp_path / "stimulus-rows"
    trial_paths.clear()  # (paths resolved under another test's MEDIA_ROOT)
    return root


@pytest.fixture
def make_study(media_root):
    """``make_study(slug=..., with_pairs=True, **study_fields)`` → a Study with real PNG pairs.

    With pairs: 2 conditions × 3 photos = 6 perturbed pairs, and 3 sentinel pairs (the
    natural image twice, no condition). ``conditions=[(threat_model, bound, label), ...]``
    replaces the two conditions (3 perturbed pairs each); ``catch_pairs=n`` adds n catch pairs
    (two different photographs, n ≤ 3). Needs database access (``django_db``).
    """

    def make(
        slug: str = "jnd-demo",
        *,
        with_pairs: bool = True,
        conditions: list[tuple[str, float, str]] = CONDITIONS,
        catch_pairs: int = 0,
        **fields,
    ) -> Study:
        fields = {
            "title": "Do these images differ?",
            "instructions": "Look closely at the centre of the screen.\nAnswer quickly.",
            "trials_per_session": 5,
            "sentinel_fraction": 0.2,
            "practice_trials": 0,  # tests about practice trials ask for them
            **fields,
        }
        study = Study.objects.create(slug=slug, **fields)
        if not with_pairs:
            return study
        for n, name in enumerate(PHOTOS):
            natural = write_png(media_root, f"{slug}/natural/{name}.png", natural_image(name))
            Pair.objects.create(
                study=study, condition=None, is_sentinel=True, key=f"{name}|sentinel",
                source_image=name, natural_path=natural, other_path=natural,
                width=SIZE, height=SIZE,
            )
            for i, (threat_model, bound, label) in enumerate(conditions):
                spec = f"{threat_model}:bound={bound:.6f}"
                condition, _ = Condition.objects.get_or_create(
                    study=study, spec=spec,
                    defaults={"threat_model": threat_model, "bound": bound, "label": label},
                )
                other = write_png(
                    media_root, f"{slug}/{label}/{name}.png",
                    perturbed_image(name, bound, seed=10 * n + i),
                )
                Pair.objects.create(
                    study=study, condition=condition, key=f"{name}|{spec}", source_image=name,
                    natural_path=natural, other_path=other, width=SIZE, height=SIZE,
                    distances={"linf": bound},
                )
        names = list(PHOTOS)
        for n in range(catch_pairs):  # two different photographs: obviously different
            a, b = names[n % len(names)], names[(n + 1) % len(names)]
            Pair.objects.create(
                study=study, is_catch=True, key=f"{a}|catch|{b}", source_image=a,
                natural_path=f"{slug}/natural/{a}.png", other_path=f"{slug}/natural/{b}.png",
                width=SIZE, height=SIZE,
            )
        return study

    return make


@pytest.fixture
def study(make_study) -> Study:
    return make_study()


def _new_session(study: Study, **kwargs) -> Session:
    participant = Participant.objects.create(study=study, external_id=str(uuid.uuid4()))
    return start_session(participant, **kwargs)


@pytest.fixture
def new_session():
    """``new_session(study)``: a session for a fresh anonymous participant, without HTTP."""
    return _new_session


@pytest.fixture
def session(study) -> Session:
    return _new_session(study, user_agent="pytest")


def _judgment_body(position: int, **overrides) -> dict:
    """A valid body for ``POST /api/sessions/<token>/judgments/``."""
    body = {
        "position": position,
        "response": "different",
        "response_time_ms": 812.4,
        "durations": {"first_ms": 1000.1, "blank_ms": 249.9, "second_ms": 1000.0},
        "idempotency_key": str(uuid.uuid4()),
    }
    body.update(overrides)
    return body


@pytest.fixture
def judgment_body():
    """``judgment_body(position, **overrides)``: a valid judgment POST body."""
    return _judgment_body
