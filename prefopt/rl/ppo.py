"""PPO losses and diagnostics for RLHF (token level).

Sources: PPO clipped surrogate and value clipping -- Schulman et al. 2017 (arXiv 1707.06347), as
implemented in OpenRLHF ``models/loss.py`` (``PolicyLoss``, ``ValueLoss``) and TRL's PPO trainer;
KL estimators k1/k2/k3 -- J. Schulman, "Approximating KL Divergence" (2020).

Shapes: every per-token tensor is ``[B, T]`` over response tokens, ``mask`` 1 on valid tokens.
Aggregation: losses are the **token-level mean over all valid tokens of the micro-batch**
(``sum(loss_t * mask_t) / sum(mask_t)``, OpenRLHF's default and DAPO's "token-level" loss), so
long responses weigh more than short ones. Metrics are detached 0-d tensors.
"""
from __future__ import annotations

import torch

from prefopt.rl.advantages import masked_mean, masked_var


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_eps: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: masked mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    ``ratio = exp(logprobs - old_logprobs)``; ``old_logprobs`` and ``advantages`` are treated as
    constants (detached). Where the clipped branch is the max, the token has zero gradient.

    Metrics: ``clip_frac`` (fraction of valid tokens where -A*clipped > -A*ratio, i.e. clipping
    binds), ``approx_kl`` (k3: masked mean of (ratio - 1) - log ratio, estimates KL(old || new)),
    ``ratio_mean``.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surr = -advantages * ratio
    surr_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(surr, surr_clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((surr_clipped > surr).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, *, clip_eps: float | None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2), with
    ``V_clip = V_old + clip(V - V_old, -eps, eps)`` (PPO2 / OpenRLHF ``ValueLoss``).

    ``clip_eps=None`` gives the unclipped 0.5 * masked mean of (V - R)^2. ``old_values`` and
    ``returns`` are detached. Metrics: ``value_clip_frac`` (fraction of valid tokens where the
    clipped term is the larger), ``value_mean``.
    """
    old_values, returns = old_values.detach(), returns.detach()
    err = (values - returns) ** 2
    if clip_eps is None:
        per_tok = err
        clipped = torch.zeros_like(err, dtype=torch.bool)
    else:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err_clip = (v_clip - returns) ** 2
        per_tok = torch.maximum(err, err_clip)
        clipped = err_clip > err
    loss = 0.5 * masked_mean(per_tok, mask)
    with torch.no_grad():
        metrics = {"value_clip_frac": masked_mean(clipped.to(values.dtype), mask),
                   "value_mean": masked_mean(values, mask)}
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution: ``[B, T, V]`` logits -> ``[B, T]``.

    H = logsumexp(z) - sum_v softmax(z)_v z_v (numerically stable, as OpenRLHF / TRL).
    """
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1",
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, ``[B, T]`` -> ``[B, T]``.

    With d = logp - ref (tokens sampled from pi):

    * ``"k1"``: d (unbiased, high variance; the usual per-token reward penalty)
    * ``"k2"``: 0.5 d^2 (biased, low variance)
    * ``"k3"``: exp(-d) - (-d) - 1 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0)
    * ``"abs"``: |d|

    Masked positions are 0 when ``mask`` is given.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        out = d
    elif kind == "k2":
        out = 0.5 * d ** 2
    elif kind == "k3":
        out = torch.exp(-d) + d - 1.0
    elif kind == "abs":
        out = d.abs()
    else:
        raise ValueError(f"unknown kl estimator '{kind}'; available: abs, k1, k2, k3")
    if mask is not None:
        out = torch.where(mask.bool(), out, torch.zeros_like(out))
    return out


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens (0-d tensor; NaN when Var[R] = 0, as in
    stable-baselines3). 1 = perfect critic, 0 = no better than a constant, < 0 worse."""
    var_r = masked_var(returns, mask)
    ev = 1.0 - masked_var(returns - values, mask) / var_r
    return torch.where(var_r > 0, ev, torch.full_like(ev, float("nan")))
