"""From scored rollout samples to per-token training signals (pure torch; no actors).

Samples are dicts with ``response_ids`` and per-token lists (``old_logps``, ``ref_logps``,
``values``, ``process_rewards``) plus the sequence ``reward``; :func:`compute_advantages` writes
``advantages`` (and ``returns`` with a critic) back into them.
"""
from __future__ import annotations

import math

import torch


def per_token(samples: list[dict], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack each sample's per-token list under ``key`` into ``[N, T]`` plus the response mask."""
    width = max(len(s["response_ids"]) for s in samples)
    values = torch.zeros(len(samples), width, dtype=torch.float64)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["response_ids"])
        mask[i, :n] = True
        if key in s:
            values[i, :n] = torch.tensor(s[key], dtype=torch.float64)
    return values, mask


def compute_advantages(samples: list[dict], params, group_size: int) -> dict[str, float]:
    """Token rewards (sequence reward at the last token + process rewards at step ends - kl_coef * KL)
    -> advantages (whitened if asked) and, with a critic, returns; written into the samples."""
    from prefopt.rl.advantages import ADVANTAGES, masked_mean, whiten
    from prefopt.rl.ppo import kl_penalty

    old, mask = per_token(samples, "old_logps")
    token_rewards = torch.zeros_like(old)
    last = mask.sum(-1) - 1
    token_rewards[torch.arange(len(samples)), last] = torch.tensor([s["reward"] for s in samples],
                                                                   dtype=torch.float64)
    if any("process_rewards" in s for s in samples):
        token_rewards = token_rewards + per_token(samples, "process_rewards")[0]   # at step ends
    stats = {}
    if params.kl_coef > 0:
        ref, _ = per_token(samples, "ref_logps")
        kl = kl_penalty(old, ref, kind=params.kl_estimator) * mask
        stats["kl"] = float(masked_mean(kl, mask))
        if params.kl_in_reward:
            token_rewards = token_rewards - params.kl_coef * kl
    values = per_token(samples, "values")[0] if params.advantage == "gae" else None
    # group estimators (grpo, rloo) score whole sequences: the sum of token rewards, KL included
    adv, returns = ADVANTAGES.get(params.advantage)(
        token_rewards=token_rewards, values=values, mask=mask, scores=None, group_size=group_size,
        gamma=params.gamma, lam=params.lam)
    if params.whiten_advantages:
        adv = whiten(adv, mask)
    for i, s in enumerate(samples):
        n = len(s["response_ids"])
        s["advantages"] = adv[i, :n].tolist()
        if returns is not None:
            s["returns"] = returns[i, :n].tolist()
    if returns is not None and values is not None:
        from prefopt.rl.ppo import explained_variance
        stats["critic/explained_variance"] = float(explained_variance(values, returns, mask))
    return stats


class RewardNormalizer:
    """Running mean/std of sequence rewards (Welford), part of the resumable state."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        for v in values:
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    def __call__(self, v: float) -> float:
        std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0
        return (v - self.mean) / (std + 1e-8)


def shape_sequence_rewards(totals: list[float], params, normalizer: RewardNormalizer) -> list[float]:
    """Clip sequence rewards to ``objective.reward_clip``, then (optionally) normalise them with
    running statistics (updated with this batch first, as OpenRLHF does)."""
    if params.reward_clip is not None:
        lo, hi = params.reward_clip
        totals = [min(max(v, lo), hi) for v in totals]
    if params.normalize_rewards:
        normalizer.update(totals)
        totals = [normalizer(v) for v in totals]
    return totals
