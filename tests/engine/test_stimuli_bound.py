"""Stimulus mode: study pairs use their bound (issue 14).

Against a TRAINED classifier (the session's digits CNN, trained in seconds by
``tests/engine/conftest.py``, here on 64 px upsampled digits through a 4×4 average pool), every
bounded threat model at every named bound must store pairs whose 8-bit size ÷ bound lies in
``[0.95, 1]``. The oracle for the Lp sizes is numpy on the PNG files as written; LPIPS and
parametric sizes are re-measured from the files with the attack's own measure.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.attacks import parse_attack
from engine.attacks.base import STIMULUS_KAPPA
from engine.attacks.spec import AUTO_LPIPS_ATTACKS, BOUND_PRESETS
from engine.data import SourceImage
from engine.errors import EngineError
from engine.models import ImageClassifier
from engine.stimuli import AT_BOUND, from_uint8, generate_stimuli

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZE = 64
N_IMAGES = 4
FAST = "num_iterations=5"


@pytest.fixture(scope="module")
def classifier64(digits_model) -> ImageClassifier:
    """The trained 16 px digits CNN on 64 px inputs (4×4 average pool first)."""
    return ImageClassifier(nn.Sequential(nn.AvgPool2d(SIZE // 16), digits_model.network),
                           normalize=digits_model.normalize).eval()


@pytest.fixture(scope="module")
def digit_sources(classifier64, digits_batch) -> list[SourceImage]:
    """Held-out digits the model gets right, ×4 nearest-neighbour upsampled to 64 px 8-bit
    RGB (the classifier's 4×4 pool undoes the upsampling: the same 16 px digit)."""
    images = F.interpolate(digits_batch[0][:N_IMAGES], scale_factor=SIZE // 16, mode="nearest")
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    with torch.no_grad():
        predicted = classifier64(from_uint8(pixels)).argmax(1)
    assert torch.equal(predicted, digits_batch[1][:N_IMAGES])
    return [SourceImage(id=f"digit{i}", pixels=pixels[i], origin="sklearn digits (test split)")
            for i in range(N_IMAGES)]


#: A JPEG bound at the 8-bit floor: rounding a perturbation to 8 bits alone gives a JPEG-L∞
#: size of 1.6–2.8× the ``small`` bound (measured on these digits at 0.5–1× the attack's
#: perturbation), so the stored size is jagged in the scale and the fit reaches [0.95, 1] for
#: most pairs only (here 3 of 4; the fourth 0.947). Its pairs must stay within the bound and be
#: flagged when short.
BELOW_8_BITS = ("jpeg:bound=small,",)


def named_bound_specs() -> list[str]:
    """Every bounded threat model at every named bound, plus the ones without named bounds."""
    specs = []
    for threat, table in BOUND_PRESETS.items():
        if threat == "lagrangian":  # no bound: its "cifar10" is a step size
            continue
        for name in table:
            extra = [FAST]
            if threat in AUTO_LPIPS_ATTACKS or threat == "lpips_oa":
                network = "alexnet_cifar" if name == "cifar10" else "alexnet"
                extra.append(f"lpips_model={network}:untrained")
            if threat == "lpa":
                extra.append("num_lambdas=2")
            specs.append(f"{threat}:bound={name}," + ",".join(extra))
    specs += ["apgd_ce:bound=8/255,num_iterations=5", "apgd_dlr:norm=l2,bound=1.0,num_iterations=5",
              "square:bound=8/255,num_iterations=100"]
    return specs


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("spec", named_bound_specs())
def test_every_bounded_threat_model_stores_pairs_at_its_bound(spec, classifier64, digit_sources,
                                                               tmp_path):
    manifest = generate_stimuli(digit_sources, [spec], classifier64, tmp_path, seed=0,
                                batch_size=N_IMAGES, sentinels=0, progress=False)
    attack = parse_attack(spec)
    (condition,) = manifest.conditions
    assert condition["mode"] == "stimulus" and manifest.generator["mode"] == "stimulus"
    pairs = [p for p in manifest.pairs if not p.is_sentinel and not p.is_catch]
    assert len(pairs) == N_IMAGES
    natural = from_uint8(np.stack([read_png(tmp_path / p.natural_path) for p in pairs]))
    stored_u8 = np.stack([read_png(tmp_path / p.other_path) for p in pairs])
    stored = from_uint8(stored_u8)
    delta = stored_u8.astype(np.float64) / 255 - natural.permute(0, 2, 3, 1).double().numpy()
    if attack.name in ("linf", "lpips_oa") or getattr(attack, "norm", None) == "linf":
        measured = np.abs(delta).reshape(N_IMAGES, -1).max(1)  # numpy on the files
    elif attack.name == "l2" or getattr(attack, "norm", None) == "l2":
        measured = np.linalg.norm(delta.reshape(N_IMAGES, -1), axis=1)
    else:
        found = attack.perturbation_size(natural, stored, classifier64)
        measured = (np.array([p.size for p in pairs]) if found is None  # flow / lattice
                    else found.double().numpy())
    ratio = measured / attack.bound
    assert ratio == pytest.approx([p.size_ratio for p in pairs], rel=1e-3, abs=1e-6)
    assert (ratio <= 1 + 1e-4).all(), f"{spec}: over the bound {ratio}"
    assert [p.at_bound for p in pairs] == (ratio >= AT_BOUND).tolist()
    if not spec.startswith(BELOW_8_BITS):
        assert (ratio >= AT_BOUND).all(), f"{spec}: not at the bound {ratio}"
    with torch.no_grad():  # success as recorded is success on the stored image
        predicted = classifier64(stored).argmax(1).tolist()
    assert [p.adversarial_label for p in pairs] == predicted
    assert [p.attack_success for p in pairs] == [y != p.label for y, p in
                                                zip(predicted, pairs, strict=True)]


def test_stimulus_mode_keeps_successful_pairs_successful(classifier64, digit_sources, tmp_path):
    spec = "ppgd:bound=large,num_iterations=10,lpips_model=alexnet:untrained"
    evaluation = generate_stimuli(digit_sources, [spec], classifier64, tmp_path / "e",
                                  sentinels=0, progress=False, mode="evaluation")
    stimulus = generate_stimuli(digit_sources, [spec], classifier64, tmp_path / "s",
                                sentinels=0, progress=False)
    before = [p.attack_success for p in evaluation.pairs]
    after = [p.attack_success for p in stimulus.pairs]
    assert any(before)
    assert all(a for a, b in zip(after, before, strict=True) if b)
    # evaluation mode stops at the first misclassified iterate, inside the ball
    assert min(p.size_ratio for p in evaluation.pairs) < AT_BOUND
    assert evaluation.conditions[0]["attack_spec"] == evaluation.conditions[0]["spec"]
    assert "early_stop=false" in stimulus.conditions[0]["attack_spec"]
    assert stimulus.conditions[0]["spec"] == evaluation.conditions[0]["spec"]


def test_a_bound_8_bits_cannot_reach_is_flagged_not_exceeded(classifier64, digit_sources,
                                                             tmp_path):
    """L∞ 0.01 is 2.55 levels: rounding toward the natural image stores at most 2/255."""
    manifest = generate_stimuli(digit_sources, ["linf:bound=0.01,num_iterations=5"],
                                classifier64, tmp_path, sentinels=1, progress=False)
    pairs = [p for p in manifest.pairs if not p.is_sentinel]
    ratios = [p.size_ratio for p in pairs]
    assert ratios == pytest.approx([2 / 255 / 0.01] * len(pairs), rel=1e-5), ratios  # float32
    assert not any(p.at_bound for p in pairs)
    assert all(p.within_bound_stored for p in pairs)
    (sentinel,) = [p for p in manifest.pairs if p.is_sentinel]
    assert sentinel.size_ratio is None and sentinel.at_bound is None
    csv_header = (tmp_path / "manifest.csv").read_text().splitlines()[0]
    assert "size_ratio" in csv_header and "at_bound" in csv_header


def test_modes_are_explicit():
    ppgd = parse_attack("ppgd:bound=0.5,lpips_model=alexnet:untrained")
    assert ppgd.for_mode("evaluation") is ppgd and ppgd.early_stop and ppgd.kappa == 1.0
    stimulus = ppgd.for_mode("stimulus")
    assert not stimulus.early_stop and stimulus.kappa == STIMULUS_KAPPA
    assert parse_attack(stimulus.spec).spec == stimulus.spec  # what ran is a valid spec
    linf = parse_attack("linf:bound=8/255")
    assert linf.for_mode("stimulus") is linf  # nothing to change
    with pytest.raises(EngineError, match="unknown attack mode 'fast'"):
        linf.for_mode("fast")


def test_unknown_generation_mode_writes_nothing(classifier64, digit_sources, tmp_path):
    with pytest.raises(EngineError, match="unknown mode 'study'"):
        generate_stimuli(digit_sources, ["linf:bound=small"], classifier64, tmp_path / "x",
                         progress=False, mode="study")
    assert not (tmp_path / "x").exists()


def test_fit_is_deterministic(classifier64, digit_sources, tmp_path):
    spec = "stadv:bound=medium,num_iterations=5"
    a = generate_stimuli(digit_sources, [spec], classifier64, tmp_path / "a", sentinels=0,
                         progress=False)
    b = generate_stimuli(digit_sources, [spec], classifier64, tmp_path / "b", sentinels=0,
                         progress=False)
    assert [p.other_sha256 for p in a.pairs] == [p.other_sha256 for p in b.pairs]
    assert [p.fit_scale for p in a.pairs] == [p.fit_scale for p in b.pairs]


def test_perceptibility_table_reports_size_ratio_per_condition():
    """The dashboard's per-condition table carries size ÷ bound (min, median, count off the
    bound), computed per condition; size_ratio is not mistaken for a distance."""
    from test_analysis import make_study

    from engine.analysis import distance_columns, perceptibility_table

    pairs, judgments = make_study()
    rng = np.random.default_rng(1)
    main = pairs["condition"].notna()
    pairs["size_ratio"] = np.where(main, rng.uniform(0.9, 1.0, len(pairs)), np.nan)
    table = perceptibility_table(pairs, judgments, n_boot=0).set_index("condition")
    for condition, group in pairs[main].groupby("condition"):
        ratios = group["size_ratio"].to_numpy()
        row = table.loc[condition]
        assert row["size_ratio_min"] == pytest.approx(ratios.min())
        assert row["size_ratio_median"] == pytest.approx(np.median(ratios))
        assert row["n_not_at_bound"] == int((ratios < AT_BOUND).sum())
    assert np.isnan(table.loc["sentinel", "size_ratio_median"])
    assert "size_ratio" not in distance_columns(pairs)
    assert "mean_size_ratio" not in table.columns


def test_size_ratio_summary_counts_pairs_off_the_bound():
    from engine.stimuli import size_ratio_summary

    rows = [("a", 0.97), ("a", 0.5), ("b", 1.0), (None, None), ("a", None), ("a", 1.2)]
    summary = {r["condition"]: r for r in size_ratio_summary(rows)}
    assert summary["a"]["n"] == 3 and summary["a"]["flagged"] == 2
    assert summary["a"]["median"] == pytest.approx(0.97)
    assert summary["b"] == {"condition": "b", "n": 1, "min": 1.0, "median": 1.0, "max": 1.0,
                            "flagged": 0}


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_clip_to_lp_bound_makes_stored_pixels_exactly_within(norm):
    """Stored 8-bit pairs over their Lp bound by float error (or by the quantiser's 1e-3
    snap) are brought exactly within (float64 on the 8-bit values ÷ 255), each value moved
    toward the natural image only; pairs already within are unchanged."""
    from engine.stimuli import clip_to_lp_bound

    rng = np.random.default_rng(0)
    natural = rng.integers(10, 246, (4, 16, 16, 3)).astype(np.uint8)
    steps = rng.integers(-4, 5, natural.shape)
    adversarial = (natural.astype(int) + steps).astype(np.uint8)
    exact = (np.sqrt((steps.reshape(4, -1) ** 2).sum(1)) if norm == "l2"
             else np.abs(steps.reshape(4, -1)).max(1)) / 255
    bound = float(exact[1]) * (1 - 3e-6) if norm == "l2" else 3 / 255  # 0: over, 1: over
    bounds_ok = exact <= bound
    out = clip_to_lp_bound(natural, adversarial, norm, bound)
    new = out.astype(int) - natural.astype(int)
    size = (np.sqrt((new.reshape(4, -1) ** 2).sum(1)) if norm == "l2"
            else np.abs(new.reshape(4, -1)).max(1)) / 255
    assert (size <= bound).all(), (size, bound)
    assert np.array_equal(out[bounds_ok], adversarial[bounds_ok])
    assert (np.abs(new) <= np.abs(steps)).all() and (new * steps >= 0).all()
    if norm == "l2":  # just over: a few levels taken off, the norm still at the bound
        assert size[1] > bound * (1 - 1e-3) and (out[1] != adversarial[1]).sum() <= 3
    with pytest.raises(ValueError, match="unknown pixel norm"):
        clip_to_lp_bound(natural, adversarial, "ssim", 0.1)
