"""PPO losses and diagnostics for RLHF (token level), with the GRPO family's loss options.

Sources: PPO clipped surrogate and value clipping -- Schulman et al. 2017 (arXiv 1707.06347), as
implemented in OpenRLHF ``models/loss.py`` (``PolicyLoss``, ``ValueLoss``) and TRL's PPO trainer;
KL estimators k1/k2/k3 -- J. Schulman, "Approximating KL Divergence" (2020); decoupled clip range
and token-level loss -- DAPO (Yu et al. 2025, arXiv 2503.14476); constant normaliser -- Dr. GRPO
(Liu et al. 2025, arXiv 2503.20783); sequence-level ratio -- GSPO (Zheng et al. 2025, arXiv
2507.18071); all as in TRL 1.16 ``trainer/grpo_trainer.py`` (``GRPOTrainer._compute_loss``).

Shapes: every per-token tensor is ``[B, T]`` over response tokens, ``mask`` 1 on valid tokens.
Aggregation (:func:`aggregate`, ``loss_agg``): by default the **token-level mean over all valid
tokens of the micro-batch** (``sum(loss_t * mask_t) / sum(mask_t)``, OpenRLHF's default and DAPO's
"token-level" loss), so long responses weigh more than short ones; ``sequence_mean`` (GRPO) and
``constant`` (Dr. GRPO) are the alternatives. :func:`value_loss` always takes the token mean.
Metrics are detached 0-d tensors.
"""
from __future__ import annotations

import torch

from prefopt.rl.advantages import masked_mean, masked_var

LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
RATIO_LEVELS = ("token", "sequence")


def aggregate(x: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token_mean",
              norm_tokens: float | None = None) -> torch.Tensor:
    """Reduce a per-token ``[B, T]`` tensor to a scalar over the valid tokens (``mask`` 1).

    With ``m`` the mask and ``n_b = sum_t m_bt`` the valid tokens of row ``b``:

    * ``"token_mean"``: ``sum_bt m_bt x_bt / sum_bt m_bt`` (DAPO; TRL ``loss_type="bnpo"`` per
      micro-batch, verl ``token-mean``);
    * ``"sequence_mean"``: ``(1 / B) sum_b (sum_t m_bt x_bt / n_b)``, the mean over rows of each
      row's token mean (GRPO; TRL ``"grpo"``, verl ``seq-mean-token-mean``); a row without valid
      tokens counts as 0, as in TRL;
    * ``"constant"``: ``sum_bt m_bt x_bt / (B * norm_tokens)`` (Dr. GRPO; TRL ``"dr_grpo"`` with
      ``norm_tokens = max_completion_length``, verl ``seq-mean-token-sum-norm``).

    ``sequence_mean`` and ``constant`` are batch invariant: the loss of a batch is the mean of its
    rows' losses, so splitting it into micro-batches (weighted by their row counts) changes nothing.
    ``token_mean`` is not: a micro-batch's rows are weighted by their share of its tokens.
    An empty mask gives 0.
    """
    if loss_agg == "token_mean":
        return masked_mean(x, mask)
    if loss_agg == "sequence_mean":
        return masked_mean(x, mask, dim=-1).mean()
    if loss_agg == "constant":
        if norm_tokens is None or norm_tokens <= 0:
            raise ValueError(f"loss_agg 'constant' needs norm_tokens > 0, got {norm_tokens}")
        return (x * mask.to(x.dtype)).sum() / (x.shape[0] * norm_tokens)
    raise ValueError(f"unknown loss_agg '{loss_agg}'; available: {', '.join(LOSS_AGGREGATIONS)}")


def importance_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, ratio_level: str = "token") -> torch.Tensor:
    """Per-token log importance ratio ``[B, T]`` from the per-token ``log pi - log pi_old``.

    * ``"token"``: the token's own log-ratio (PPO, GRPO, DAPO);
    * ``"sequence"``: every token of row ``b`` gets ``(1 / n_b) sum_t m_bt log_ratio_bt``, so its
      ratio is GSPO's ``s_b = (pi(y_b|x) / pi_old(y_b|x))^(1 / |y_b|)``, with the gradient flowing
      through the sequence mean (TRL ``importance_sampling_level="sequence"``; a row without valid
      tokens gets 0, TRL clamps the count at 1).
    """
    if ratio_level == "token":
        return log_ratio
    if ratio_level == "sequence":
        return masked_mean(log_ratio, mask, dim=-1, keepdim=True).expand_as(log_ratio)
    raise ValueError(f"unknown ratio_level '{ratio_level}'; available: {', '.join(RATIO_LEVELS)}")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_eps: float, clip_eps_high: float | None = None,
                loss_agg: str = "token_mean", norm_tokens: float | None = None,
                ratio_level: str = "token") -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: ``aggregate(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)))``.

    ``ratio = exp(importance_log_ratio(logprobs - old_logprobs))``: the token's ratio, or with
    ``ratio_level="sequence"`` its sequence's GSPO ratio ``s_b`` (clipped with the same range, the
    advantage still per token). ``eps_high = clip_eps_high`` (DAPO's decoupled upper bound, e.g.
    0.28 with ``clip_eps`` 0.2), ``clip_eps`` when None. ``loss_agg`` / ``norm_tokens``: see
    :func:`aggregate`. ``old_logprobs`` and ``advantages`` are treated as constants (detached).
    Where the clipped branch is the max, the token has zero gradient.

    TRL 1.16 (``GRPOTrainer._compute_loss``) computes the same per-token loss ``-min(coef_1 * A,
    clamp(coef_1, 1 - epsilon, 1 + epsilon_high) * A)``, with ``coef_1`` the token ratio or, for
    ``importance_sampling_level="sequence"``, ``exp`` of the masked mean log-ratio (one value per
    row, broadcast over its tokens when aggregated); its ``loss_type`` picks the aggregation
    (:func:`aggregate` names the matching ones). TRL's ``"dapo"`` divides by the token count of the
    whole accumulated batch, not of the micro-batch as ``token_mean`` does.

    Metrics (masked token means, whatever ``loss_agg``): ``clip_frac`` (fraction of valid tokens
    where -A*clipped > -A*ratio, i.e. clipping binds), split into ``clip_frac_low`` (A < 0, ratio
    below 1 - eps) and ``clip_frac_high`` (A > 0, ratio above 1 + eps_high), TRL's
    ``clip_ratio/low_mean`` / ``high_mean``; ``approx_kl`` (k3 of the *token* ratios: masked mean of
    (r - 1) - log r, estimates KL(old || new)); ``ratio_mean`` (of the ratios used in the loss).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    token_ratio = torch.exp(log_ratio)
    ratio = token_ratio if ratio_level == "token" else torch.exp(importance_log_ratio(log_ratio, mask, ratio_level))
    surr = -advantages * ratio
    surr_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    loss = aggregate(torch.maximum(surr, surr_clipped), mask, loss_agg, norm_tokens)
    with torch.no_grad():
        binds = surr_clipped > surr
        metrics = {
            "clip_frac": masked_mean(binds.to(ratio.dtype), mask),
            "clip_frac_low": masked_mean((binds & (advantages < 0)).to(ratio.dtype), mask),
            "clip_frac_high": masked_mean((binds & (advantages > 0)).to(ratio.dtype), mask),
            "approx_kl": masked_mean((token_ratio - 1.0) - log_ratio, mask),
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
