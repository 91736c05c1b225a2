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

from engine.calibration import SIGMOIDS, sigmoid_cdf, sigmoid_pdf, sigmoid_ppf


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
    """QUEST+ over threshold × slope (× guess rate × lapse rate) for a yes/no ("different")
    task on a ladder of bounds.

    ``guess_rate``/``lapse_rate`` are fixed values (plain QUEST+), or give ``guess_rates`` /
    ``lapse_rates`` grids (with optional ``nuisance_prior`` of shape ``(G, L)``) to make them
    nuisance parameters of the posterior: the psi-marginal method (Prins 2013) — the
    posterior runs over all four, estimates and the ``"marginal_entropy"`` and ``"targets"``
    objectives integrate the nuisance parameters out.

    ``posterior`` is the ``(len(thresholds_grid), len(slopes_grid))`` marginal;
    ``joint_posterior`` has shape ``(T, S, G, L)``.
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
        guess_rates=None,
        lapse_rates=None,
        nuisance_prior=None,
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
        self.guess_rates = np.atleast_1d(np.asarray(
            guess_rate if guess_rates is None else guess_rates, float))
        self.lapse_rates = np.atleast_1d(np.asarray(
            lapse_rate if lapse_rates is None else lapse_rates, float))
        g, lam = self.guess_rates[:, None], self.lapse_rates[None, :]
        if (self.guess_rates.ndim != 1 or self.lapse_rates.ndim != 1
                or np.any(g < 0) or np.any(g >= 1) or np.any(lam < 0) or np.any(lam >= 1 - g)):
            raise ValueError("need 0 ≤ guess_rate < 1 and 0 ≤ lapse_rate < 1 − guess_rate "
                             "(every grid value)")
        self.guess_rate = float(np.mean(self.guess_rates))
        self.lapse_rate = float(np.mean(self.lapse_rates))
        self.sigmoid = sigmoid
        self.nuisance = len(self.guess_rates) > 1 or len(self.lapse_rates) > 1
        z = self.slopes_grid[None, None, :] * (
            np.log(self.levels)[:, None, None] - np.log(self.thresholds_grid)[None, :, None])
        f = sigmoid_cdf(z, sigmoid)[..., None, None]  # (levels, T, S, 1, 1)
        # likelihood of "different": (levels, T, S, G, L)
        self.likelihood = g + (1 - g - lam) * f
        with np.errstate(divide="ignore"):  # λ = 0: a certain answer has log 0 = −∞
            self._log_l = np.log(self.likelihood)
            self._log_1ml = np.log1p(-self.likelihood)
        shape = (len(self.thresholds_grid), len(self.slopes_grid))
        if prior is None:
            prior = np.full(shape, 1.0 / (shape[0] * shape[1]))
        prior = np.asarray(prior, float)
        if prior.shape != shape or np.any(prior < 0) or prior.sum() <= 0:
            raise ValueError(f"prior must be non-negative with shape {shape}")
        nshape = (len(self.guess_rates), len(self.lapse_rates))
        if nuisance_prior is None:
            nuisance_prior = np.ones(nshape)
        nuisance_prior = np.asarray(nuisance_prior, float)
        if nuisance_prior.shape != nshape or np.any(nuisance_prior < 0) or \
                nuisance_prior.sum() <= 0:
            raise ValueError(f"nuisance_prior must be non-negative with shape {nshape}")
        joint = prior[:, :, None, None] * nuisance_prior[None, None]
        self._log_post = np.log(np.where(joint > 0, joint / joint.sum(), 1e-300))
        self.n_updates = 0
        self.counts = np.zeros(len(self.levels), int)
        self.targets = tuple(float(t) for t in targets)
        tg = np.asarray(self.targets)[:, None, None]
        u = (tg - g) / (1 - g - lam)  # (P, G, L)
        if np.any((u <= 0) | (u >= 1)):
            raise ValueError(f"targets must lie in (guess_rate, 1 − lapse_rate): {targets}")
        z = sigmoid_ppf(u, sigmoid)
        # ln b_p at every grid point, (targets, T, S, G, L)
        self._log_target = (np.log(self.thresholds_grid)[None, :, None, None, None]
                            + z[:, None, None] / self.slopes_grid[None, None, :, None, None])

    # -------------------------------------------------------------------------- posterior
    @property
    def joint_posterior(self) -> np.ndarray:
        """Posterior over threshold × slope × guess rate × lapse rate, ``(T, S, G, L)``."""
        lp = self._log_post - self._log_post.max()
        p = np.exp(lp)
        return p / p.sum()

    @property
    def posterior(self) -> np.ndarray:
        """Posterior over threshold × slope (nuisance parameters integrated out)."""
        return self.joint_posterior.sum(axis=(2, 3))

    def update(self, level_index: int, different: bool) -> None:
        """Multiply the posterior by one answer's likelihood."""
        j = int(level_index)
        if not 0 <= j < len(self.levels):
            raise ValueError(f"level_index {j} outside 0..{len(self.levels) - 1}")
        self._log_post += self._log_l[j] if different else self._log_1ml[j]
        self._log_post -= self._log_post.max()
        self.n_updates += 1
        self.counts[j] += 1

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
        self.counts += n.astype(int)

    def update_sentinels(self, n_different: int, n_total: int) -> None:
        """Sentinel answers (identical images: ``P(different) = γ``) update the guess-rate
        axis: ``k ln γ + (n − k) ln(1 − γ)``. With a fixed ``guess_rate`` this changes
        nothing; with a ``guess_rates`` grid the design learns γ from the sentinels as the
        estimator (``engine.calibration``) does."""
        k, n = float(n_different), float(n_total)
        if not 0 <= k <= n:
            raise ValueError(f"need 0 ≤ n_different ≤ n_total, got {k}, {n}")
        g = self.guess_rates
        with np.errstate(divide="ignore"):
            term = k * np.log(g) + (n - k) * np.log1p(-g)
        term = np.where(np.isfinite(term), term, -1e300)
        self._log_post += term[None, None, :, None]
        self._log_post -= self._log_post.max()

    def _joints(self):
        post = self.joint_posterior[None]
        joint_d = post * self.likelihood  # (levels, T, S, G, L)
        return joint_d, post - joint_d

    @staticmethod
    def _expected_entropy(joints, axes) -> np.ndarray:
        out = 0.0
        for joint in joints:
            pr = joint.sum(axis=axes)
            with np.errstate(divide="ignore", invalid="ignore"):
                cond = joint / pr.reshape(pr.shape + (1,) * len(axes))
                h = -np.where(cond > 0, cond * np.log(np.where(cond > 0, cond, 1.0)),
                              0.0).sum(axis=axes)
            out = out + np.where(pr > 0, pr * h, 0.0)
        return out

    def expected_entropy(self) -> np.ndarray:
        """``EH(j)`` per level (nats) of the joint posterior (all parameters; Watson 2017)."""
        return self._expected_entropy(self._joints(), (1, 2, 3, 4))

    def expected_marginal_entropy(self) -> np.ndarray:
        """``EH(j)`` of the threshold × slope marginal: the psi-marginal objective (Prins
        2013), which spends no trials on learning the guess and lapse rates for their own
        sake."""
        joints = [j.sum(axis=(3, 4)) for j in self._joints()]
        return self._expected_entropy(joints, (1, 2))

    def expected_target_variance(self) -> np.ndarray:
        """Per level, the expected posterior variance of ``ln b_p`` summed over ``targets``
        after one more answer: ``Σ_r Σ_p [Σ J_r v_p² − (Σ J_r v_p)² / P(r)]`` with
        ``J_r = posterior · L(r | j)`` (nuisance parameters integrated out: a psi-marginal
        objective, Prins 2013, aimed at the thresholds the study reports rather than the
        joint entropy)."""
        out = np.zeros(len(self.levels))
        v = self._log_target.reshape(len(self.targets), -1)  # (P, T*S*G*L)
        for joint in self._joints():
            flat = joint.reshape(len(self.levels), -1)
            pr = flat.sum(1)
            m1 = flat @ v.T  # (levels, P)
            m2 = flat @ (v * v).T
            with np.errstate(invalid="ignore", divide="ignore"):
                out += np.where(pr > 0, (m2 - m1 * m1 / pr[:, None]).sum(1), 0.0)
        return out

    def _support(self, max_points: int = 256):
        """The grid points holding most of the posterior mass: ``(weights, t, β, γ, λ)``,
        at most ``max_points`` of them (deterministic, heaviest first), weights renormalised."""
        p = self.joint_posterior.ravel()
        top = np.argsort(p)[::-1][:max_points]
        top = top[p[top] > 0]
        w = p[top] / p[top].sum()
        it, js, ig, il = np.unravel_index(top, self._log_post.shape)
        return (w, self.thresholds_grid[it], self.slopes_grid[js], self.guess_rates[ig],
                self.lapse_rates[il])

    def expected_fisher_variance(self, batch: int = 1) -> np.ndarray:
        """Per level: the posterior-averaged asymptotic variance of the thresholds the study's
        estimator reports, ``Σ_p ∇g_pᵀ I⁻¹ ∇g_p`` with ``g_p = ln b_p``, after ``batch`` more
        answers at that level.

        The estimator is :func:`engine.calibration.calibrate`'s maximum-likelihood fit of
        ``(α, β, λ)`` with ``γ`` known (from the sentinels); ``I = Σ_l n_l i_l`` its Fisher
        information for the answers so far (``self.counts``, plus one pseudo-answer per level so
        that it is invertible at the start), ``i_l = ∇P ∇Pᵀ / (P(1 − P))`` for one binomial
        answer at level ``l``. Averaged over the heaviest posterior grid points. A Bayesian
        A-optimal sequential design for the estimator that is actually used, rather than for
        the design's own posterior (which with nuisance parameters spends answers on γ and λ).
        """
        w, t, b, g, lam = self._support()
        x = np.log(self.levels)[None, :]  # (1, L)
        alpha = (-b * np.log(t))[:, None]
        beta, g, lam = b[:, None], g[:, None], lam[:, None]
        z = alpha + beta * x
        scale = 1 - g - lam
        f, cdf = sigmoid_pdf(z, self.sigmoid), sigmoid_cdf(z, self.sigmoid)
        prob = np.clip(g + scale * cdf, 1e-9, 1 - 1e-9)
        grad = np.stack([scale * f, scale * f * x, -cdf + 0 * x], -1)  # (S, L, 3)
        info = grad[..., :, None] * grad[..., None, :] / (prob * (1 - prob))[..., None, None]
        base = np.einsum("l,slij->sij", self.counts + 1.0, info)  # (S, 3, 3)
        cand = base[:, None] + batch * info  # (S, L, 3, 3)
        cand = cand + np.eye(3) * 1e-9
        tg = np.asarray(self.targets)[None, :]
        u = (tg - g) / scale  # (S, P)
        ok = (u > 0) & (u < 1)
        u = np.clip(u, 1e-6, 1 - 1e-6)
        q = sigmoid_ppf(u, self.sigmoid)
        dq_du = 1.0 / sigmoid_pdf(q, self.sigmoid)
        # g_p = (q_p − α)/β: gradients wrt α, β, λ
        dg = np.stack([-1.0 / beta + 0 * q, -(q - alpha) / beta ** 2,
                       dq_du * u / scale / beta], -1)  # (S, P, 3)
        dg = np.where(ok[..., None], dg, 0.0)
        sol = np.linalg.solve(cand[:, :, None], dg[:, None, :, :, None])[..., 0]  # (S,L,P,3)
        var = np.einsum("spk,slpk->sl", dg, sol)
        return (w[:, None] * var).sum(0)

    def next_level(self, objective: str = "entropy", *, min_share: float = 0.0,
                   batch: int = 1) -> int:
        """Index of the next level (lowest index on ties).

        ``objective="entropy"``: QUEST+'s minimum expected entropy of the joint posterior
        (Watson 2017). ``"marginal_entropy"``: of the threshold × slope marginal (Prins
        2013). ``"targets"``: minimum expected posterior variance of the ``targets``
        thresholds (:meth:`expected_target_variance`). ``"fisher"``: minimum posterior-averaged
        variance of the estimator's ``targets`` thresholds after ``batch`` more answers
        (:meth:`expected_fisher_variance`).

        ``min_share`` keeps every level sampled: while a level has fewer than
        ``min_share · (n_updates + 1)`` answers, the least-sampled level is returned (a
        hedge against a wrong model: the ladder's ends keep their data).
        """
        if not 0 <= min_share <= 1.0 / len(self.levels):
            raise ValueError(f"min_share must be in [0, 1/levels], got {min_share}")
        if min_share > 0:
            j = int(np.argmin(self.counts))
            if self.counts[j] < min_share * (self.n_updates + 1):
                return j
        if objective == "entropy":
            return int(np.argmin(self.expected_entropy()))
        if objective == "marginal_entropy":
            return int(np.argmin(self.expected_marginal_entropy()))
        if objective == "targets":
            return int(np.argmin(self.expected_target_variance()))
        if objective == "fisher":
            return int(np.argmin(self.expected_fisher_variance(batch)))
        raise ValueError(f"objective must be 'entropy', 'marginal_entropy', 'targets' or "
                         f"'fisher', got {objective!r}")

    def entropy(self) -> float:
        p = self.joint_posterior
        return float(-(p[p > 0] * np.log(p[p > 0])).sum())

    # -------------------------------------------------------------------------- estimates
    def estimate(self) -> dict:
        """Posterior means: ``threshold`` (geometric, i.e. mean of ln t), ``slope``,
        ``guess_rate``, ``lapse_rate``, and the marginal posterior mode of threshold and
        slope."""
        jp = self.joint_posterior
        p = jp.sum(axis=(2, 3))
        pt, ps = p.sum(1), p.sum(0)
        return {
            "threshold": float(np.exp((pt * np.log(self.thresholds_grid)).sum())),
            "slope": float((ps * self.slopes_grid).sum()),
            "threshold_mode": float(self.thresholds_grid[np.argmax(pt)]),
            "slope_mode": float(self.slopes_grid[np.argmax(ps)]),
            "guess_rate": float((jp.sum(axis=(0, 1, 3)) * self.guess_rates).sum()),
            "lapse_rate": float((jp.sum(axis=(0, 1, 2)) * self.lapse_rates).sum()),
        }

    def threshold_at(self, p: float, *, interval: float = 0.95) -> dict:
        """Posterior of the bound where ``P(different) = p`` (full scale): median and the
        central ``interval`` credible interval (grid points weighted by the posterior; grid
        points whose ``(γ, 1 − λ)`` excludes ``p`` are left out)."""
        g, lam = self.guess_rates[:, None], self.lapse_rates[None, :]
        u = (p - g) / (1 - g - lam)
        ok = (u > 0) & (u < 1)
        if not ok.any():
            raise ValueError(f"p={p} is outside (guess_rate, 1 − lapse_rate)")
        z = sigmoid_ppf(np.where(ok, u, 0.5), self.sigmoid)
        values = np.exp(np.log(self.thresholds_grid)[:, None, None, None]
                        + z[None, None] / self.slopes_grid[None, :, None, None])
        w = self.joint_posterior * ok[None, None]
        order = np.argsort(values, axis=None)
        v = values.ravel()[order]
        c = np.cumsum(w.ravel()[order])
        c /= c[-1]
        q = lambda x: float(v[min(np.searchsorted(c, x), len(v) - 1)])  # noqa: E731
        a = (1 - interval) / 2
        return {"bound": q(0.5), "low": q(a), "high": q(1 - a)}


def choose_level(levels, level_idx=(), different=(), *, guess_rate: float = 0.04,
                 lapse_rate: float = 0.02, sigmoid: str = "logistic",
                 objective: str = "entropy", thresholds_grid=None, slopes_grid=None,
                 guess_rates=None, lapse_rates=None, targets=(0.25, 0.5),
                 min_share: float = 0.0) -> int:
    """One-shot for a scheduler: the pooled posterior of a threat model's ladder from all its
    answers so far (``level_idx``, ``different``), then the next level's index."""
    qp = QuestPlus(levels, thresholds_grid=thresholds_grid, slopes_grid=slopes_grid,
                   guess_rate=guess_rate, lapse_rate=lapse_rate, sigmoid=sigmoid,
                   guess_rates=guess_rates, lapse_rates=lapse_rates, targets=targets)
    qp.update_many(level_idx, different)
    return qp.next_level(objective, min_share=min_share)
