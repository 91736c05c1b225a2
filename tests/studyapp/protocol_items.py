"""Studies of every protocol (issue 18) with real PNG items in a temporary MEDIA_ROOT.

Built directly as Pairs (not by the engine's generator): scikit-image photographs, cropped and
resized, with random-sign noise as the perturbation. Used by test_protocol_flow.py and
test_protocol_browser.py.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage.transform import resize

from studyapp.models import Condition, Pair, Study

PHOTOS = {"astronaut": skdata.astronaut, "chelsea": skdata.chelsea, "coffee": skdata.coffee}
# The label protocol's classes: what each photograph shows.
CLASS_OF = {"astronaut": "person", "chelsea": "cat", "coffee": "cup"}
LABEL_SET = ["person", "cat", "cup", "ship"]
CONDITIONS = [("linf", 8 / 255, "small"), ("linf", 32 / 255, "large")]
# Each protocol as a study: (protocol, rating_shows); "rating-single" rates one image.
VARIANTS = {
    "2afc": ("2afc", "pair"),
    "rating": ("rating", "pair"),
    "rating-single": ("rating", "single"),
    "label": ("label", "pair"),
}


@cache
def natural_image(name: str, size: int) -> np.ndarray:
    """Central square crop of a scikit-image photograph, ``size``×``size``, uint8 RGB."""
    photo = PHOTOS[name]()
    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = photo[top : top + side, left : left + side, :3]
    small = resize(square, (size, size), anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def perturbed_image(name: str, size: int, bound: float, seed: int) -> np.ndarray:
    """``natural_image`` plus random-sign noise of ``bound`` (pixel units in [0, 1])."""
    rng = np.random.default_rng(seed)
    noise = rng.choice([-1.0, 1.0], size=(size, size, 3)) * bound * 255
    return np.clip(np.rint(natural_image(name, size) + noise), 0, 255).astype(np.uint8)


def write_png(root: Path, relative: str, pixels: np.ndarray) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return relative


def make_protocol_study(
    media_root: Path, variant: str, *, slug: str | None = None, size: int = 96,
    controls_per_photo: int = 1, variants_per_photo: int = 1, photos=tuple(PHOTOS), **fields,
) -> Study:
    """A study of ``variant`` (a key of :data:`VARIANTS`) with, per photograph and condition,
    ``variants_per_photo`` data items and ``controls_per_photo`` control items per photograph:

    - 2afc: reference = the photograph; data triplets A = small noise, B = large noise (each
      variant its own noise); controls: A = the reference itself, B = large noise;
    - rating: pair mode as JND (natural, perturbed), anchors identical; single mode shows
      ``other_path`` (the perturbed image; anchors: the photograph);
    - label: ``other_path`` the perturbed image, ``class_name`` the photograph's class; gold
      items the photograph itself.
    """
    protocol, rating_shows = VARIANTS[variant]
    slug = slug or f"p-{variant}"
    fields = {
        "title": f"A {variant} study", "trials_per_session": 4, "sentinel_fraction": 0.25,
        "practice_trials": 0, "protocol": protocol, "rating_shows": rating_shows,
        **({"label_set": LABEL_SET} if protocol == "label" else {}), **fields,
    }
    study = Study.objects.create(slug=slug, **fields)
    conditions = [
        Condition.objects.get_or_create(
            study=study, spec=f"{tm}:bound={bound:.6f}",
            defaults={"threat_model": tm, "bound": bound, "label": label},
        )[0]
        for tm, bound, label in CONDITIONS
    ]
    small, large = conditions
    seed = 0
    for name in photos:
        natural = write_png(media_root, f"{slug}/natural/{name}.png", natural_image(name, size))
        common = {"study": study, "source_image": name, "width": size, "height": size}
        if protocol == "label":
            common["class_name"] = CLASS_OF[name]

        def noisy(condition: Condition, tag: str, name: str = name) -> str:
            nonlocal seed
            seed += 1
            return write_png(media_root, f"{slug}/{condition.label}/{name}-{tag}.png",
                             perturbed_image(name, size, condition.bound, seed))

        for c in range(controls_per_photo):
            extra = {}
            if protocol == "2afc":
                extra = {"third_path": noisy(large, f"control{c}"), "condition_b": large}
            Pair.objects.create(key=f"{name}|control|{c}", is_sentinel=True,
                                natural_path=natural, other_path=natural, **common, **extra)
        for v in range(variants_per_photo):
            if protocol == "2afc":
                Pair.objects.create(
                    key=f"{name}|triplet|{v}", natural_path=natural,
                    other_path=noisy(small, f"a{v}"), third_path=noisy(large, f"b{v}"),
                    condition=small, condition_b=large, distances={"linf": small.bound},
                    distances_b={"linf": large.bound}, **common,
                )
                continue
            for condition in conditions:
                Pair.objects.create(
                    key=f"{name}|{condition.spec}|{v}", natural_path=natural,
                    other_path=noisy(condition, f"v{v}"), condition=condition,
                    distances={"linf": condition.bound}, **common,
                )
    return study
