"""Advantage estimators and masked statistics for online RLHF.

Conventions (shared with :mod:`prefopt.rl.ppo`):

* token tensors are ``[B, T]`` over *response* tokens; ``mask`` is 1 on response tokens and 0 on
  padding. Rollouts are left-aligned (the valid tokens are a prefix of each row, padding at the
  end), but every function here also accepts a general mask: masked positions are skipped.
* sequence-level scores are ``[N]`` with the ``group_size`` samples of a prompt contiguous
  (``N = num_prompts * group_size``, as TRL's ``GRPOTrainer`` and OpenRLHF lay them out), or
  ``[P, G]``.

Sources: GAE -- Schulman et al. 2016 (arXiv 1506.02438); GRPO -- Shao et al. 2024, DeepSeekMath
(arXiv 2402.03300), as in TRL ``trainer/grpo_trainer.py``; RLOO -- Ahmadian et al. 2024 (arXiv
2402.14740); whitening as ``masked_whiten`` in TRL / OpenRLHF.
"""
from __future__ import annotations

import torch

from prefopt.errors import ConfigError
from prefopt.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is nonzero (mask used as weights).

    An empty mask gives 0 (not NaN), so a micro-batch without valid tokens contributes no loss.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        num, den = (x * mask).sum(), mask.sum()
    else:
        num, den = (x * mask).sum(dim, keepdim=keepdim), mask.sum(dim, keepdim=keepdim)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(num))


def masked_var(x: torch.Tensor, mask: torch.Tensor, dim=None, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions; ``unbiased`` applies Bessel's correction
    n / (n - 1) as TRL's / OpenRLHF's ``masked_var`` do (n = number of valid positions)."""
    keep = dim is not None
    mean = masked_mean(x, mask, dim=dim, keepdim=keep)
    var = masked_mean((x - mean) ** 2, mask, dim=dim)
    if unbiased:
        n = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
        var = var * n / (n - 1).clamp_min(1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening over the whole batch: (x - mean) / sqrt(var + eps) (unbiased var).

    With ``shift_mean=False`` the mean is added back (only the scale changes), as TRL's
    ``masked_whiten``. Masked positions of the result are 0. Shapes: ``x``, ``mask`` ``[B, T]``.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) on ``[B, T]`` tensors.

    Over the valid positions t_1 < t_2 < ... < t_n of a row (masked positions are skipped, so
    "next" means the next *valid* position)::

        delta_i = r_{t_i} + gamma * V_{t_{i+1}} - V_{t_i}     (V_{t_{n+1}} = 0: episode ends)
        A_i     = delta_i + gamma * lam * A_{i+1}              (A_{n+1} = 0)
        R_i     = A_i + V_{t_i}

    ``rewards`` are per-token rewards (KL penalty and sequence reward already placed), ``values``
    are V(s_t) from the critic; rewards/values at masked positions are ignored. Returns
    ``(advantages, returns)``, both ``[B, T]``, 0 at masked positions, without gradient.
    With gamma = lam = 1, returns are the reward-to-go sums.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"gae expects equal [B, T] shapes, got rewards {tuple(rewards.shape)}, "
                         f"values {tuple(values.shape)}, mask {tuple(mask.shape)}")
    rewards, values = rewards.detach(), values.detach()
    valid = mask.bool()
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in range(T - 1, -1, -1):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a_t = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a_t, torch.zeros_like(a_t))
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, a_t, next_adv)
    returns = torch.where(valid, adv + values, torch.zeros_like(adv))
    return adv, returns


def _grouped(scores: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[N]`` (groups contiguous) or ``[P, G]`` scores -> ``[P, G]``."""
    if scores.dim() == 2:
        if group_size is not None and scores.shape[1] != group_size:
            raise ValueError(f"scores of shape {tuple(scores.shape)} but group_size={group_size}")
        return scores
    if scores.dim() != 1 or group_size is None or group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} must be [P, G], or [N] with N a "
                         f"multiple of group_size (got group_size={group_size})")
    return scores.view(-1, group_size)


@torch.no_grad()
def grpo_advantages(scores: torch.Tensor, group_size: int | None = None, *,
                    group_ids: torch.Tensor | None = None, eps: float = 1e-6,
                    std_normalize: bool = True) -> torch.Tensor:
    """GRPO outcome advantages (DeepSeekMath, Shao et al. 2024): (r - mean_g) / (std_g + eps).

    ``std_g`` is the **unbiased** group std (Bessel-corrected), as TRL's ``GRPOTrainer`` (1.16:
    ``nanstd`` with correction n/(n-1), ``scale_rewards="group"``; TRL adds eps 1e-4, ours
    defaults to 1e-6). A group of one sample has std 0 and advantage 0 (TRL: NaN).
    ``std_normalize=False`` gives the mean-only baseline (Dr. GRPO, TRL ``scale_rewards="none"``).

    Groups are given by ``group_size`` (scores ``[N]`` contiguous, or ``[P, G]``) or by
    ``group_ids`` (``[N]`` integer labels, any order). Returns the shape of ``scores``.
    """
    if group_ids is None:
        g = _grouped(scores.detach(), group_size)
        mean = g.mean(dim=1, keepdim=True)
        n = g.shape[1]
        std = (((g - mean) ** 2).sum(dim=1, keepdim=True) / max(n - 1, 1)).sqrt()
        adv = g - mean
        if std_normalize:
            adv = adv / (std + eps)
        return adv.reshape(scores.shape)
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError("group_ids needs [N] scores and [N] group_ids")
    s = scores.detach()
    _, inv = torch.unique(group_ids, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(k, dtype=s.dtype, device=s.device).index_add_(0, inv, torch.ones_like(s))
    mean = torch.zeros(k, dtype=s.dtype, device=s.device).index_add_(0, inv, s) / count
    adv = s - mean[inv]
    if std_normalize:
        ss = torch.zeros(k, dtype=s.dtype, device=s.device).index_add_(0, inv, adv ** 2)
        std = (ss / (count - 1).clamp_min(1)).sqrt()
        adv = adv / (std[inv] + eps)
    return adv


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j within each group.

    Equivalently G/(G-1) * (r_i - mean_g). Scores ``[N]`` (groups contiguous) or ``[P, G]``;
    needs G >= 2. Returns the shape of ``scores``.
    """
    g = _grouped(scores.detach(), group_size)
    n = g.shape[1]
    if n < 2:
        raise ValueError("rloo_advantages needs group_size >= 2")
    loo_mean = (g.sum(dim=1, keepdim=True) - g) / (n - 1)
    return (g - loo_mean).reshape(scores.shape)


# --- registry adapters --------------------------------------------------------------------
# Common signature: fn(*, token_rewards, values, mask, scores, group_size, gamma, lam)
#   -> (advantages [B, T], returns [B, T] | None).
# "gae" needs a critic (values). The group estimators ("grpo", "rloo") need no critic: they use
# sequence scores [B] (B = num_prompts * group_size, groups contiguous; defaults to the masked sum
# of token_rewards), broadcast the sequence advantage to every response token and return None.

def _sequence_scores(scores, token_rewards, mask):
    if scores is not None:
        return scores
    if token_rewards is None:
        raise ValueError("group advantage estimators need scores [B] or token_rewards [B, T]")
    return (token_rewards * mask.to(token_rewards.dtype)).sum(dim=-1)


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return seq_adv.reshape(-1, 1) * mask.to(seq_adv.dtype)


@ADVANTAGES.register("gae")
def gae_estimator(*, token_rewards=None, values=None, mask, scores=None, group_size=None,
                  gamma: float = 1.0, lam: float = 0.95):
    """GAE over per-token rewards with critic values (``scores``/``group_size`` ignored)."""
    if values is None:
        raise ConfigError("advantage estimator 'gae' needs a critic (values); use 'grpo' or "
                          "'rloo' to train without one")
    if token_rewards is None:
        raise ValueError("advantage estimator 'gae' needs token_rewards [B, T]")
    return gae(token_rewards, values, mask, gamma=gamma, lam=lam)


@ADVANTAGES.register("grpo")
def grpo_estimator(*, token_rewards=None, values=None, mask, scores=None, group_size=None,
                   gamma: float = 1.0, lam: float = 0.95):
    """GRPO group baseline broadcast over response tokens; no critic, returns None."""
    seq = grpo_advantages(_sequence_scores(scores, token_rewards, mask).reshape(-1), group_size)
    return _broadcast(seq, mask), None


@ADVANTAGES.register("dr_grpo")
def dr_grpo_estimator(*, token_rewards=None, values=None, mask, scores=None, group_size=None,
                      gamma: float = 1.0, lam: float = 0.95):
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): GRPO's group-mean baseline without the division
    by the group std (TRL ``scale_rewards="none"``, verl ``norm_adv_by_std_in_grpo: false``); pair it
    with ``loss_agg: constant`` and ``whiten_advantages: false`` for the paper's whole recipe."""
    seq = grpo_advantages(_sequence_scores(scores, token_rewards, mask).reshape(-1), group_size, std_normalize=False)
    return _broadcast(seq, mask), None


@ADVANTAGES.register("rloo")
def rloo_estimator(*, token_rewards=None, values=None, mask, scores=None, group_size=None,
                   gamma: float = 1.0, lam: float = 0.95):
    """RLOO leave-one-out baseline broadcast over response tokens; no critic, returns None."""
    seq = rloo_advantages(_sequence_scores(scores, token_rewards, mask).reshape(-1), group_size)
    return _broadcast(seq, mask), None
