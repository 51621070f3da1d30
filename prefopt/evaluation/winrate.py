"""Win rates of a model against a baseline, raw and length-controlled (pure functions, numpy only).

**Win rate.** Per sample, the model's response wins (1) when its reward is higher than the baseline's
response to the same prompt, loses (0) when lower, and ties (1/2) when equal; the win rate is the
mean over samples.

**Length-controlled win rate** (Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple Way to
Debias Automatic Evaluators", arXiv 2404.04475). A judge that prefers longer answers makes a verbose
model look better. The paper fits a generalised linear model of the preference and reads it with the
length difference set to zero. Its GLM (``length_controlled_v1`` in ``alpaca_eval``) is::

    logit P(win_i) = (theta_m - theta_b) + phi * tanh(delta_i / sd(delta)) + (psi_m - psi_b) * gamma_i

with ``delta_i`` the difference in length between the model's and the baseline's response to
instruction i, and ``gamma_i`` a per-instruction difficulty learnt across many models of the
leaderboard. Here there are two models and no leaderboard, so the instruction term is left out
(as is the paper's regularisation towards the baseline):

    logit P(win_i) = theta + phi * x_i,    x_i = tanh(delta_i / sd(delta))    (sd: ddof 1)

fitted by maximum likelihood on the win indicators ``y_i`` in {0, 1/2, 1} (ties are soft labels, as
the paper's preferences are), with a tiny ridge ``ridge / 2 * phi**2`` on the length coefficient only
(it keeps phi finite when length alone separates wins from losses). The length-controlled win rate is
the model read at ``delta = 0``: ``sigmoid(theta)``. The fit is Newton's method (IRLS) with step
halving on the penalised log-likelihood, which is strictly concave, so the optimum is unique.

Special cases: when every length difference is the same (``sd = 0``, e.g. both models always stop
at max-tokens), ``x = 0``, so ``sigmoid(theta)`` is exactly the raw win rate; when every sample is a
win (or every one a loss), ``theta`` is unbounded and the raw win rate (1 or 0) is returned.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

RIDGE = 1e-4


def win_indicators(rewards: Sequence[float], baseline_rewards: Sequence[float],
                   ties: Sequence[bool] | None = None) -> list[float]:
    """Per sample: 1.0 (reward > baseline reward), 0.5 (equal) or 0.0 (lower). ``ties``: samples that
    count as a tie whatever their rewards (e.g. the same response as the baseline's)."""
    if len(rewards) != len(baseline_rewards) or (ties is not None and len(ties) != len(rewards)):
        raise ValueError(f"rewards ({len(rewards)}), baseline_rewards ({len(baseline_rewards)}) and ties "
                         f"({'-' if ties is None else len(ties)}) must have one value per sample")
    out = []
    for i, (r, b) in enumerate(zip(rewards, baseline_rewards)):
        if not (math.isfinite(r) and math.isfinite(b)):
            raise ValueError(f"sample {i}: reward {r} / baseline reward {b} is not finite")
        out.append(0.5 if (ties is not None and ties[i]) or r == b else float(r > b))
    return out


def win_rate(rewards: Sequence[float], baseline_rewards: Sequence[float],
             ties: Sequence[bool] | None = None) -> float:
    """Mean of :func:`win_indicators` (ties count half)."""
    wins = win_indicators(rewards, baseline_rewards, ties)
    if not wins:
        raise ValueError("win_rate needs at least one sample")
    return sum(wins) / len(wins)


def length_feature(len_diff: Sequence[float]):
    """``tanh(delta / sd(delta))`` per sample (AlpacaEval's length feature); zeros when sd is 0 or there
    is a single sample."""
    import numpy as np
    d = np.asarray(len_diff, dtype=np.float64)
    sd = d.std(ddof=1) if d.size > 1 else 0.0
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def fit_length_glm(wins: Sequence[float], feature: Sequence[float], ridge: float = RIDGE,
                   max_iter: int = 100, tol: float = 1e-12) -> tuple[float, float]:
    """``(theta, phi)`` maximising ``sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - ridge/2 * phi**2``
    with ``p_i = sigmoid(theta + phi * x_i)``. Needs ``0 < mean(y) < 1`` (else theta is unbounded)."""
    import numpy as np
    y, x = np.asarray(wins, dtype=np.float64), np.asarray(feature, dtype=np.float64)
    if y.shape != x.shape or y.ndim != 1 or y.size == 0:
        raise ValueError("wins and feature must be 1-d with the same, non-zero length")
    if ((y < 0) | (y > 1)).any():
        raise ValueError("wins must lie in [0, 1]")
    if not 0 < y.mean() < 1:
        raise ValueError("every sample is a win (or every one a loss): theta is unbounded")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 (got {ridge})")
    X = np.stack([np.ones_like(x), x], axis=1)
    penalty = np.diag([0.0, ridge])

    def objective(beta):     # the penalised log-likelihood (log-sigmoid written to be stable)
        z = X @ beta
        return float((y * -np.logaddexp(0, -z) + (1 - y) * -np.logaddexp(0, z)).sum()
                     - 0.5 * ridge * beta[1] ** 2)

    beta = np.array([math.log(y.mean() / (1 - y.mean())), 0.0])
    value = objective(beta)
    for _ in range(max_iter):
        p = 1 / (1 + np.exp(-(X @ beta)))
        grad = X.T @ (y - p) - penalty @ beta
        hessian = X.T @ (X * (p * (1 - p))[:, None]) + penalty      # minus the Hessian: positive definite
        step = np.linalg.solve(hessian, grad)
        t = 1.0
        while True:               # step halving: never a worse objective
            new = objective(beta + t * step)
            if new >= value or t < 1e-10:
                break
            t /= 2
        if new < value:           # no better point along Newton's direction: converged to rounding
            break
        beta, value = beta + t * step, new
        if float(np.abs(t * step).max()) < tol or float(np.abs(grad).max()) < tol:
            break
    return float(beta[0]), float(beta[1])


def length_controlled_win_rate(wins: Sequence[float], len_diff: Sequence[float], ridge: float = RIDGE) -> float:
    """The win rate at zero length difference: ``sigmoid(theta)`` of :func:`fit_length_glm` on
    ``x = tanh(delta / sd(delta))`` (see the module docstring). ``wins``: :func:`win_indicators`;
    ``len_diff``: the model's response length minus the baseline's, per sample."""
    if len(wins) != len(len_diff) or not wins:
        raise ValueError(f"wins ({len(wins)}) and len_diff ({len(len_diff)}) need one value per sample, at least one")
    mean = sum(wins) / len(wins)
    if mean <= 0 or mean >= 1:
        return float(mean)
    theta, _ = fit_length_glm(wins, length_feature(len_diff), ridge)
    return 1 / (1 + math.exp(-theta))
