"""engine.adaptive.QuestPlus against the ``questplus`` package (Watson 2017 reference
implementation) on fixed answer sequences: same next stimulus, same posterior."""

from __future__ import annotations

import numpy as np
import pytest
import questplus
from scipy import special

from engine.adaptive import QuestPlus, ladder

LEVELS = ladder(1.0, 16.0, 9)
THRESHOLDS = ladder(0.5, 32.0, 15)
SLOPES = np.array([0.5, 1.0, 2.0, 3.0, 5.0])


def reference(gamma=0.04, lam=0.02):
    """questplus's Weibull on log10 intensity: 10^{β(x − t)} = (b/t)^β with x = log10 b."""
    return questplus.QuestPlus(
        stim_domain={"intensity": np.log10(LEVELS)},
        param_domain={"threshold": np.log10(THRESHOLDS), "slope": SLOPES,
                      "lower_asymptote": np.array([gamma]), "lapse_rate": np.array([lam])},
        outcome_domain={"response": ["different", "same"]},
        func="weibull", stim_scale="log10", stim_selection_method="min_entropy",
    )


def ours(**kw):
    return QuestPlus(LEVELS, thresholds_grid=THRESHOLDS, slopes_grid=SLOPES, guess_rate=0.04,
                     lapse_rate=0.02, sigmoid="weibull", **kw)


def test_same_next_stimulus_and_posterior_as_questplus():
    rng = np.random.default_rng(0)
    ref, q = reference(), ours()
    for _ in range(25):
        j = q.next_level()
        x = ref.next_stim["intensity"]
        assert np.log10(LEVELS[j]) == pytest.approx(x)
        ans = bool(rng.random() < 0.04 + 0.94 * (1 - np.exp(-(LEVELS[j] / 4.0) ** 2)))
        q.update(j, ans)
        ref.update(stim={"intensity": x}, outcome={"response": "different" if ans else "same"})
        np.testing.assert_allclose(q.posterior, ref.posterior.values.squeeze(), atol=1e-12)
    est = ref.param_estimate
    assert np.log10(q.estimate()["threshold"]) == pytest.approx(est["threshold"], abs=1e-9)
    assert q.estimate()["slope"] == pytest.approx(est["slope"], abs=1e-9)


def test_update_many_equals_sequential_updates():
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(LEVELS), 200)
    diff = rng.random(200) < 0.5
    a, b = ours(), ours()
    for i, d in zip(idx, diff, strict=True):
        a.update(i, d)
    b.update_many(idx, diff)
    np.testing.assert_allclose(a.posterior, b.posterior, rtol=1e-9, atol=1e-15)
    assert a.next_level() == b.next_level()


def test_expected_entropy_matches_a_direct_computation():
    q = QuestPlus(LEVELS, thresholds_grid=THRESHOLDS, slopes_grid=SLOPES, sigmoid="logistic")
    q.update_many([2, 5, 7, 7], [False, True, True, False])
    post = q.posterior
    eh = []
    for b in LEVELS:
        L = 0.04 + 0.94 * special.expit(SLOPES[None] * (np.log(b) - np.log(THRESHOLDS)[:, None]))
        total = 0.0
        for like in (L, 1 - L):
            pr = (post * like).sum()
            c = post * like / pr
            total += pr * -(c * np.log(c)).sum()
        eh.append(total)
    np.testing.assert_allclose(q.expected_entropy(), eh, rtol=1e-10)
    assert q.next_level() == int(np.argmin(eh))


def test_posterior_concentrates_on_the_truth_and_threshold_interval():
    rng = np.random.default_rng(2)
    q = QuestPlus(LEVELS, thresholds_grid=ladder(0.5, 32, 40), slopes_grid=SLOPES,
                  sigmoid="logistic")
    for _ in range(1500):
        j = q.next_level()
        p = 0.04 + 0.94 * special.expit(2.0 * (np.log(LEVELS[j]) - np.log(5.0)))
        q.update(j, rng.random() < p)
    assert abs(np.log(q.estimate()["threshold"] / 5.0)) < 0.15
    t50 = q.threshold_at(0.5)
    truth = 5.0 * np.exp(special.logit((0.5 - 0.04) / 0.94) / 2.0)
    step = np.log(64) / 39  # grid spacing in ln t: the credible interval is on the grid
    assert t50["low"] * np.exp(-step) <= truth <= t50["high"] * np.exp(step)
    assert t50["low"] <= t50["bound"] <= t50["high"]


def test_ladder_and_bad_input():
    lad = ladder(2, 32, 5)
    np.testing.assert_allclose(lad, [2, 4, 8, 16, 32])
    for args in ((0, 1, 3), (2, 1, 3), (1, 2, 1)):
        with pytest.raises(ValueError):
            ladder(*args)
    with pytest.raises(ValueError, match="levels"):
        QuestPlus([-1.0, 2.0], thresholds_grid=THRESHOLDS, slopes_grid=SLOPES)
    with pytest.raises(ValueError, match="level_index"):
        ours().update(99, True)
    with pytest.raises(ValueError, match="sigmoid"):
        QuestPlus(LEVELS, thresholds_grid=THRESHOLDS, slopes_grid=SLOPES, sigmoid="probit")


def test_expected_target_variance_matches_a_direct_computation():
    q = QuestPlus(LEVELS, thresholds_grid=THRESHOLDS, slopes_grid=SLOPES, sigmoid="logistic",
                  targets=(0.25, 0.5))
    q.update_many([3, 5, 6, 8], [False, True, False, True])
    post = q.posterior
    expected = []
    for b in LEVELS:
        L = 0.04 + 0.94 * special.expit(SLOPES[None] * (np.log(b) - np.log(THRESHOLDS)[:, None]))
        total = 0.0
        for like in (L, 1 - L):
            pr = (post * like).sum()
            c = post * like / pr
            for p in (0.25, 0.5):
                v = np.log(THRESHOLDS)[:, None] + special.logit((p - 0.04) / 0.94) / SLOPES[None]
                mean = (c * v).sum()
                total += pr * (c * (v - mean) ** 2).sum()
        expected.append(total)
    np.testing.assert_allclose(q.expected_target_variance(), expected, rtol=1e-8)
    assert q.next_level("targets") == int(np.argmin(expected))
    with pytest.raises(ValueError, match="objective"):
        q.next_level("fastest")


def test_default_grids_and_choose_level():
    from engine.adaptive import DEFAULT_SLOPES, choose_level, default_thresholds_grid

    q = QuestPlus(LEVELS)
    np.testing.assert_allclose(q.thresholds_grid, ladder(0.5, 32.0, 40))
    np.testing.assert_allclose(q.slopes_grid, DEFAULT_SLOPES)
    np.testing.assert_allclose(default_thresholds_grid(LEVELS), q.thresholds_grid)
    idx, diff = [0, 4, 8, 4], [False, True, True, False]
    q.update_many(idx, diff)
    assert choose_level(LEVELS, idx, diff) == q.next_level()
    assert choose_level(LEVELS) == QuestPlus(LEVELS).next_level()


GAMMAS = np.array([0.02, 0.05, 0.1])
LAPSES = np.array([0.0, 0.03])


def test_nuisance_grids_equal_questplus_with_guess_and_lapse_in_the_posterior():
    """γ and λ as posterior parameters: questplus with lower_asymptote and lapse_rate grids
    runs the same model (joint entropy), so next stimulus and joint posterior agree."""
    ref = questplus.QuestPlus(
        stim_domain={"intensity": np.log10(LEVELS)},
        param_domain={"threshold": np.log10(THRESHOLDS), "slope": SLOPES,
                      "lower_asymptote": GAMMAS, "lapse_rate": LAPSES},
        outcome_domain={"response": ["different", "same"]},
        func="weibull", stim_scale="log10", stim_selection_method="min_entropy")
    q = QuestPlus(LEVELS, thresholds_grid=THRESHOLDS, slopes_grid=SLOPES, sigmoid="weibull",
                  guess_rates=GAMMAS, lapse_rates=LAPSES)
    rng = np.random.default_rng(4)
    for _ in range(15):
        j = q.next_level()
        x = ref.next_stim["intensity"]
        assert np.log10(LEVELS[j]) == pytest.approx(x)
        ans = bool(rng.random() < 0.08 + 0.9 * (1 - np.exp(-(LEVELS[j] / 4.0) ** 2)))
        q.update(j, ans)
        ref.update(stim={"intensity": x}, outcome={"response": "different" if ans else "same"})
        np.testing.assert_allclose(q.joint_posterior, ref.posterior.values, atol=1e-12)
    np.testing.assert_allclose(q.posterior, ref.posterior.values.sum(axis=(2, 3)), atol=1e-12)
    est = q.estimate()
    assert est["guess_rate"] == pytest.approx(ref.param_estimate["lower_asymptote"], abs=1e-9)
    assert est["lapse_rate"] == pytest.approx(ref.param_estimate["lapse_rate"], abs=1e-9)


def test_sentinels_marginal_entropy_fisher_objective_and_floor():
    q = QuestPlus(LEVELS, thresholds_grid=THRESHOLDS, slopes_grid=SLOPES, sigmoid="logistic",
                  guess_rates=GAMMAS, lapse_rates=LAPSES, targets=(0.25, 0.5, 0.75))
    q.update_sentinels(10, 100)  # 10 % of identical pairs answered "different"
    post_g = q.joint_posterior.sum(axis=(0, 1, 3))
    like = GAMMAS ** 10 * (1 - GAMMAS) ** 90
    np.testing.assert_allclose(post_g, like / like.sum(), rtol=1e-9)
    # psi-marginal entropy = expected entropy of the (t, β) marginal, computed directly
    q.update_many([2, 4, 6, 8], [False, True, True, True])
    jp = q.joint_posterior
    direct = []
    for j in range(len(LEVELS)):
        total = 0.0
        for like in (q.likelihood[j], 1 - q.likelihood[j]):
            m = (jp * like).sum(axis=(2, 3))
            pr = m.sum()
            c = m / pr
            total += pr * -(c[c > 0] * np.log(c[c > 0])).sum()
        direct.append(total)
    np.testing.assert_allclose(q.expected_marginal_entropy(), direct, rtol=1e-10)
    # Fisher objective: more answers at a level never raise the variance; one sample point
    v1, v20 = q.expected_fisher_variance(1), q.expected_fisher_variance(20)
    assert np.all(v20 <= v1 + 1e-12) and np.all(np.isfinite(v1))
    assert q.next_level("fisher") == int(np.argmin(v1))
    # floor: the least-sampled level comes first while below min_share of the answers
    q2 = QuestPlus(LEVELS, thresholds_grid=THRESHOLDS, slopes_grid=SLOPES)
    q2.update_many([4] * 40, [True] * 40)
    assert q2.next_level("targets", min_share=0.1) == 0
    with pytest.raises(ValueError, match="min_share"):
        q2.next_level(min_share=0.5)
    with pytest.raises(ValueError, match="guess_rate"):
        QuestPlus(LEVELS, guess_rates=[0.5, 0.6], lapse_rates=[0.5])
