"""Pixel-exact display of stimuli (issue 17): what the trial runner drew, as session flags.

The runner (``static/js/trials.js``) draws every image so that each image pixel covers an n×n
block of device pixels, with no smoothing: its CSS size is ``natural × n / devicePixelRatio``.
``Study.display_scale`` states n; 0 means "the image's own CSS size", i.e. n = the device pixel
ratio, which is whole only at 100 % and 200 % (Windows at 125 % or 150 %, or a browser zoom,
give 1.25 or 1.5). Then ``Study.display_rule`` decides: ``nearest`` draws at the nearest whole
factor (the image is pixel-exact but not at its intended size: *rescaled*), ``reset_zoom`` asks
the participant to change the zoom and waits, ``refuse`` ends the session before its trials.

Each judgment records the factor drawn (``Judgment.display_scale``), the device pixel ratio
while the pair was shown, and whether the browser measured each image at exactly
natural × n device pixels (``display_exact``, from ResizeObserver's device-pixel-content-box;
False = *resampled*). Sessions with rescaled or resampled main trials are flagged; with
``Study.exclude_inexact_display`` they are excluded (:mod:`studyapp.quality`).
"""

from __future__ import annotations

from collections import defaultdict

from .models import Study, Trial

# A device pixel ratio this close to a whole number counts as whole (ratios are reported as
# doubles such as 1.2500000596 by some browsers).
WHOLE_TOLERANCE = 1e-3


def is_whole(ratio: float) -> bool:
    return abs(ratio - round(ratio)) < WHOLE_TOLERANCE


def display_flags(study: Study, session_ids: list[int]) -> dict[int, list[str]]:
    """session id → display flags (sentences) for its answered main trials.

    ``display rescaled``: drawn at n device pixels per image pixel where the study wanted the
    image's CSS size (``display_scale`` 0) and the device pixel ratio was not whole.
    ``display resampled``: the browser measured an image at another size than natural × n
    device pixels (its pixels then cover unequal numbers of device pixels).
    """
    rows = Trial.objects.filter(
        session_id__in=session_ids, is_practice=False, judgment__isnull=False
    ).values_list(
        "session_id", "judgment__display_scale", "judgment__device_pixel_ratio",
        "judgment__display_exact",
    )
    rescaled: dict[int, list[tuple[int, float]]] = defaultdict(list)
    resampled: dict[int, int] = defaultdict(int)
    answered: dict[int, int] = defaultdict(int)
    for session_id, scale, ratio, exact in rows:
        answered[session_id] += 1
        if scale is None:
            continue
        if study.display_scale == 0 and ratio is not None and not is_whole(ratio):
            rescaled[session_id].append((scale, ratio))
        if exact is False:
            resampled[session_id] += 1
    flags: dict[int, list[str]] = {}
    for session_id in session_ids:
        out = []
        if rescaled.get(session_id):
            shown = sorted(set(rescaled[session_id]))
            what = ", ".join(f"{n}× at device pixel ratio {r:g}" for n, r in shown)
            out.append(
                f"display rescaled: {len(rescaled[session_id])}/{answered[session_id]} main "
                f"trials drawn at the nearest whole factor, not the image's own size ({what})"
            )
        if resampled.get(session_id):
            out.append(
                f"display resampled: {resampled[session_id]}/{answered[session_id]} main trials "
                "not drawn at a whole number of device pixels per image pixel"
            )
        if out:
            flags[session_id] = out
    return flags
