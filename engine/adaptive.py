"""Adaptive bound placement: a vectorised QUEST+ (Watson 2017) over threshold × slope.

Model (the same family as :mod:`engine.calibration`, written with a threshold)::

    P(different | b; t, β) = γ + (1 − γ − λ) · F(β · (ln b − ln t))

``F`` logistic (``t`` is where F = ½) or Weibull ``1 − exp(−e^{z})`` (``t`` where
F = 1 − 1/e; this is ``questplus``'s ``weibull`` with ``stim_scale="log10"``, intensity
``log10 b`` and threshold ``log10 t``, since ``10^{β(log10 b − log10 t)} = (b/t)^β``).
``γ`` and ``λ`` are fixed. The posterior over the grid ``thresholds_grid × slopes_grid``
starts uniform (or from ``prior``) and is multiplied by each answer's likelihood. The next
level is the one minimising the expected posterior entropy after one more answer
(Watson 2017, eq. 4–6)::

    EH(j) = Σ_r P(r | j) · H(posterior · L(r | j) / P(r | j)),   P(r | j) = Σ posterior·L(r | j)

Levels come from a ladder of pre-generated bounds (:func:`ladder`); a study pools every
participant's answers per threat model into one posterior.
"""

from __future__ import annotations

import math

import numpy as np

from engine.calibration import SIGMOIDS, sigmoid_cdf, sigmoid_ppf


def ladder(low: float, high: float, n: int) -> np.ndarray:
    """``n`` log-spaced bounds from ``low`` to ``high`` inclusive (both > 0)."""
    if not (low > 0 and high > low):
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    if n < 2:
        raise ValueError(f"a ladder needs n ≥ 2 levels, got {n}")
    return np.exp(np.linspace(math.log(low), math.log(high), int(n)))


#: Default slope grid (β on ln bound): shallow to steep psychometric functions.
DEFAULT_SLOPES = np.geomspace(0.5, 8.0, 10)


def default_thresholds_grid(levels, n: int = 40) -> np.ndarray:
    """``n`` log-spaced thresholds from half the lowest to twice the highest level."""
    levels = np.asarray(levels, float)
    return ladder(levels.min() / 2, levels.max() * 2, n)


class QuestPlus:
    """QUEST+ over threshold × slope for a yes/no ("different") task on a ladder of bounds.

    ``posterior`` has shape ``(len(thresholds_grid), len(slopes_grid))``.
    """

    def __init__(
        self,
        levels,
        *,
        thresholds_grid=None,
        slopes_grid=None,
        guess_rate: float = 0.04,
        lapse_rate: float = 0.02,
        sigmoid: str = "logistic",
        prior=None,
        targets=(0.25, 0.5),
    ):
        self.levels = np.asarray(levels, float)
        if self.levels.ndim != 1 or len(self.levels) < 1 or np.any(self.levels <= 0):
            raise ValueError("levels must be a non-empty 1-D array of bounds > 0")
        if thresholds_grid is None:
            thresholds_grid = default_thresholds_grid(self.levels)
        if slopes_grid is None:
            slopes_grid = DEFAULT_SLOPES
        self.thresholds_grid = np.asarray(thresholds_grid, float)
        self.slopes_grid = np.asarray(slopes_grid, float)
        if np.any(self.thresholds_grid <= 0) or len(self.thresholds_grid) == 0:
            raise ValueError("thresholds_grid must be non-empty, values > 0 (bounds)")
        if np.any(self.slopes_grid <= 0) or len(self.slopes_grid) == 0:
            raise ValueError("slopes_grid must be non-empty, values > 0")
        if sigmoid not in SIGMOIDS:
            raise ValueError(f"unknown sigmoid {sigmoid!r}; use one of {SIGMOIDS}")
        if not (0 <= guess_rate < 1 and 0 <= lapse_rate < 1 - guess_rate):
            raise ValueError("need 0 ≤ guess_rate < 1 and 0 ≤ lapse_rate < 1 − guess_rate")
        self.guess_rate, self.lapse_rate, self.sigmoid = guess_rate, lapse_rate, sigmoid
        z = self.slopes_grid[None, None, :] * (
            np.log(self.levels)[:, None, None] - np.log(self.thresholds_grid)[None, :, None])
        # likelihood of "different": (levels, thresholds, slopes)
        self.likelihood = guess_rate + (1 - guess_rate - lapse_rate) * sigmoid_cdf(z, sigmoid)
        self._log_l = np.log(self.likelihood)
        self._log_1ml = np.log1p(-self.likelihood)
        shape = (len(self.thresholds_grid), len(self.slopes_grid))
        if prior is None:
            prior = np.full(shape, 1.0 / (shape[0] * shape[1]))
        prior = np.asarray(prior, float)
        if prior.shape != shape or np.any(prior < 0) or prior.sum() <= 0:
            raise ValueError(f"prior must be non-negative with shape {shape}")
        self._log_post = np.log(np.where(prior > 0, prior / prior.sum(), 1e-300))
        self.n_updates = 0
        self.targets = tuple(float(t) for t in targets)
        u = (np.asarray(self.targets) - guess_rate) / (1 - guess_rate - lapse_rate)
        if np.any((u <= 0) | (u >= 1)):
            raise ValueError(f"targets must lie in (guess_rate, 1 − lapse_rate): {targets}")
        z = sigmoid_ppf(u, sigmoid)
        # ln b_p at every grid point, (targets, T, S)
        self._log_target = (np.log(self.thresholds_grid)[None, :, None]
                            + z[:, None, None] / self.slopes_grid[None, None, :])

    # -------------------------------------------------------------------------- posterior
    @property
    def posterior(self) -> np.ndarray:
        lp = self._log_post - self._log_post.max()
        p = np.exp(lp)
        return p / p.sum()

    def update(self, level_index: int, different: bool) -> None:
        """Multiply the posterior by one answer's likelihood."""
        j = int(level_index)
        if not 0 <= j < len(self.levels):
            raise ValueError(f"level_index {j} outside 0..{len(self.levels) - 1}")
        self._log_post += self._log_l[j] if different else self._log_1ml[j]
        self._log_post -= self._log_post.max()
        self.n_updates += 1

    def update_many(self, level_idx, different) -> None:
        """Batch update: ``Σ_j k_j ln L_j + (n_j − k_j) ln(1 − L_j)`` via ``bincount``
        (order-free, equal to sequential updates)."""
        idx = np.asarray(level_idx, int).ravel()
        diff = np.asarray(different, bool).ravel()
        if idx.shape != diff.shape:
            raise ValueError("level_idx and different must have the same length")
        if len(idx) == 0:
            return
        if idx.min() < 0 or idx.max() >= len(self.levels):
            raise ValueError(f"level indices must be in 0..{len(self.levels) - 1}")
        m = len(self.levels)
        n = np.bincount(idx, minlength=m).astype(float)
        k = np.bincount(idx, weights=diff.astype(float), minlength=m)
        self._log_post += np.tensordot(k, self._log_l, axes=1) + np.tensordot(
            n - k, self._log_1ml, axes=1)
        self._log_post -= self._log_post.max()
        self.n_updates += len(idx)

    def expected_entropy(self) -> np.ndarray:
        """``EH(j)`` per level (nats)."""
        post = self.posterior[None]
        joint_d = post * self.likelihood  # (levels, T, S)
        joint_s = post - joint_d
        out = np.zeros(len(self.levels))
        for joint in (joint_d, joint_s):
            pr = joint.sum(axis=(1, 2))
            with np.errstate(divide="ignore", invalid="ignore"):
                cond = joint / pr[:, None, None]
                h = -np.where(cond > 0, cond * np.log(np.where(cond > 0, cond, 1.0)), 0.0).sum(
                    axis=(1, 2))
            out += np.where(pr > 0, pr * h, 0.0)
        return out

    def expected_target_variance(self) -> np.ndarray:
        """Per level, the expected posterior variance of ``ln b_p`` summed over ``targets``
        after one more answer: ``Σ_r Σ_p [Σ J_r v_p² − (Σ J_r v_p)² / P(r)]`` with
        ``J_r = posterior · L(r | j)`` (a psi-marginal-style objective, Prins 2013, aimed at
        the thresholds the study reports rather than the joint (t, β) entropy)."""
        post = self.posterior[None]
        joint_d = post * self.likelihood
        out = np.zeros(len(self.levels))
        v = self._log_target.reshape(len(self.targets), -1)  # (P, T*S)
        for joint in (joint_d, post - joint_d):
            flat = joint.reshape(len(self.levels), -1)
            pr = flat.sum(1)
            m1 = flat @ v.T  # (levels, P)
            m2 = flat @ (v * v).T
            with np.errstate(invalid="ignore", divide="ignore"):
                out += np.where(pr > 0, (m2 - m1 * m1 / pr[:, None]).sum(1), 0.0)
        return out

    def next_level(self, objective: str = "entropy") -> int:
        """Index of the next level (lowest index on ties).

        ``objective="entropy"``: QUEST+'s minimum expected entropy of the joint (t, β)
        posterior (Watson 2017). ``"targets"``: minimum expected posterior variance of the
        ``targets`` thresholds (:meth:`expected_target_variance`).
        """
        if objective == "entropy":
            return int(np.argmin(self.expected_entropy()))
        if objective == "targets":
            return int(np.argmin(self.expected_target_variance()))
        raise ValueError(f"objective must be 'entropy' or 'targets', got {objective!r}")

    def entropy(self) -> float:
        p = self.posterior
        return float(-(p[p > 0] * np.log(p[p > 0])).sum())

    # -------------------------------------------------------------------------- estimates
    def estimate(self) -> dict:
        """Posterior means: ``threshold`` (geometric, i.e. mean of ln t), ``slope``, and
        the marginal posterior mode of each."""
        p = self.posterior
        pt, ps = p.sum(1), p.sum(0)
        return {
            "threshold": float(np.exp((pt * np.log(self.thresholds_grid)).sum())),
            "slope": float((ps * self.slopes_grid).sum()),
            "threshold_mode": float(self.thresholds_grid[np.argmax(pt)]),
            "slope_mode": float(self.slopes_grid[np.argmax(ps)]),
        }

    def threshold_at(self, p: float, *, interval: float = 0.95) -> dict:
        """Posterior of the bound where ``P(different) = p`` (full scale): median and the
        central ``interval`` credible interval (grid points weighted by the posterior)."""
        u = (p - self.guess_rate) / (1 - self.guess_rate - self.lapse_rate)
        if not 0 < u < 1:
            raise ValueError(f"p={p} is outside (guess_rate, 1 − lapse_rate)")
        z = float(sigmoid_ppf(u, self.sigmoid))
        values = np.exp(np.log(self.thresholds_grid)[:, None] + z / self.slopes_grid[None, :])
        order = np.argsort(values, axis=None)
        v = values.ravel()[order]
        c = np.cumsum(self.posterior.ravel()[order])
        q = lambda x: float(v[min(np.searchsorted(c, x), len(v) - 1)])  # noqa: E731
        a = (1 - interval) / 2
        return {"bound": q(0.5), "low": q(a), "high": q(1 - a)}


def choose_level(levels, level_idx=(), different=(), *, guess_rate: float = 0.04,
                 lapse_rate: float = 0.02, sigmoid: str = "logistic",
                 objective: str = "entropy", thresholds_grid=None, slopes_grid=None) -> int:
    """One-shot for a scheduler: the pooled posterior of a threat model's ladder from all its
    answers so far (``level_idx``, ``different``), then the next level's index."""
    qp = QuestPlus(levels, thresholds_grid=thresholds_grid, slopes_grid=slopes_grid,
                   guess_rate=guess_rate, lapse_rate=lapse_rate, sigmoid=sigmoid)
    qp.update_many(level_idx, different)
    return qp.next_level(objective)
