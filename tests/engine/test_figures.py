"""engine.figures: every figure renders (PNG and SVG) and its data frame holds exactly the
analysis numbers it draws."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from engine.analysis import analyze
from engine.calibration import calibrate
from engine.figures import (
    fig4a_perceptibility_vs_lpips,
    fig4b_strength_vs_perceptibility,
    fig4c_distance_correlations,
    fig5_distance_violins,
    figure_bytes,
    psychometric_curves,
)
from engine.observers import ObserverPopulation


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(0)
    rows = []
    for tm, bounds, scale in (("linf", (2, 4, 8), 0.05), ("l2", (600, 1200, 2400), 0.0002)):
        for label, b in zip(("small", "medium", "large"), bounds, strict=True):
            for _ in range(8):
                rows.append({"pair": len(rows), "condition": f"{tm}:bound={b}",
                             "threat_model": tm, "bound": float(b), "label": label,
                             "is_sentinel": False, "is_catch": False,
                             "success": bool(rng.random() < 0.7),
                             "lpips_alexnet": b * scale * rng.uniform(0.7, 1.3),
                             "l2": b * rng.uniform(0.5, 1.5), "ssim": 1 - 0.01 * b ** 0.3})
    for _ in range(6):
        rows.append({"pair": len(rows), "condition": None, "threat_model": None, "bound": None,
                     "label": "", "is_sentinel": True, "is_catch": False, "success": None,
                     "lpips_alexnet": 0.0, "l2": 0.0, "ssim": 1.0})
    pairs = pd.DataFrame(rows)
    pop = ObserverPopulation({"linf": (6.0, 2.0), "l2": (1500.0, 2.0)}, guess_rate=0.05)
    judgments = pop.simulate(pairs, n_participants=60, trials_per_participant=40, rng=rng)
    judgments["simulated"] = False
    return pairs, judgments, analyze(pairs, judgments, n_boot=50)


def check_renders(fig):
    assert isinstance(fig, Figure)
    assert figure_bytes(fig, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in figure_bytes(fig, "svg")[:500]


def test_fig4a_data_equals_perceptibility_table(study):
    _, _, report = study
    fig, data = fig4a_perceptibility_vs_lpips(report)
    check_renders(fig)
    table = report.perceptibility.set_index("condition")
    assert len(data) == 6
    for _, row in data.iterrows():
        assert row["perceptibility"] == table.loc[row["condition"], "perceptibility"]
        assert row["mean_lpips_alexnet"] == table.loc[row["condition"], "mean_lpips_alexnet"]
        assert row["boot_low"] == table.loc[row["condition"], "boot_low"]
    with pytest.raises(ValueError, match="distance"):
        fig4a_perceptibility_vs_lpips(report, distance="dists")


def test_fig4b_data_equals_table4(study):
    _, _, report = study
    fig, data = fig4b_strength_vs_perceptibility(report)
    check_renders(fig)
    t4 = report.table4.set_index(["threat_model", "bound"])
    for _, row in data.iterrows():
        assert row["strength"] == t4.loc[(row["threat_model"], row["bound"]), "strength"]
        assert row["perceptibility"] == t4.loc[(row["threat_model"], row["bound"]),
                                               "perceptibility"]


def test_fig4c_data_equals_correlations(study):
    _, _, report = study
    fig, data = fig4c_distance_correlations(report)
    check_renders(fig)
    corr = report.correlations.set_index("distance")
    assert set(data["distance"]) == set(corr.index)
    for _, row in data.iterrows():
        assert row["r"] == corr.loc[row["distance"], "r"]
        assert row["r_low"] == corr.loc[row["distance"], "r_low"]


def test_fig5_data_are_the_pair_distances(study):
    pairs, judgments, report = study
    fig, data = fig5_distance_violins(report, distance="ssim")
    check_renders(fig)
    main = pairs[~pairs.is_sentinel]
    assert len(data) == len(main)
    np.testing.assert_allclose(np.sort(data["value"]), np.sort(1 - main["ssim"]))
    # frames in, same figure data out
    _, again = fig5_distance_violins((pairs, judgments), distance="ssim", n_boot=5)
    pd.testing.assert_frame_equal(again, data)


def test_psychometric_curves_data_equal_calibration(study):
    pairs, judgments, _ = study
    cal = calibrate(pairs, judgments, n_boot=30)
    fig, data = psychometric_curves(cal)
    check_renders(fig)
    points = data[data.kind == "data"]
    merged = judgments.merge(pairs, on="pair")
    for _, row in points.iterrows():
        sub = merged[(merged.threat_model == row["threat_model"]) & (merged.bound == row["bound"])]
        assert row["n_judgments"] == len(sub)
        assert row["perceptibility"] == pytest.approx(sub["different"].mean())
        assert row["fitted"] == pytest.approx(
            cal.threat_models[row["threat_model"]].fit.predict(row["bound"]))
    th = data[data.kind == "threshold"].set_index(["threat_model", "label"])
    assert th.loc[("linf", "p50"), "bound"] == cal.presets()["linf"]["p50"]


def test_a_threshold_interval_that_misses_its_point_is_drawn_and_kept(study):
    """A percentile bootstrap interval of few resamples may lie beside its point estimate
    (seen on the dashboard with ``--n-boot 5``): the figure renders, the frame keeps it."""
    import copy

    pairs, judgments, _ = study
    cal = copy.deepcopy(calibrate(pairs, judgments, n_boot=30))
    thresholds = cal.threat_models["linf"].thresholds
    bound = thresholds["bound"].iloc[0]
    thresholds.loc[thresholds.index[0], ["low", "high"]] = [bound * 1.01, bound * 1.2]
    fig, data = psychometric_curves(cal)
    check_renders(fig)
    row = data[(data.kind == "threshold") & (data.threat_model == "linf")].iloc[0]
    assert (row["low"], row["high"]) == (bound * 1.01, bound * 1.2)


def test_bad_input():
    with pytest.raises(ValueError):
        fig4c_distance_correlations("not a report")
    with pytest.raises(ValueError):
        psychometric_curves(42)
