"""From scored rollout samples to per-token training signals (pure torch; no actors).

Samples are :class:`prefopt.data.rollouts.RolloutSample` with per-token lists (``old_logps``,
``ref_logps``, ``values``, ``process_rewards``) and the sequence ``reward``; :func:`compute_advantages`
fills in ``advantages`` (and ``returns`` with a critic).
"""
from __future__ import annotations

import math

import torch


def per_token(samples: list, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack each sample's per-token field ``key`` into ``[N, T]`` (``[N, T, H]`` when each token
    holds H values, e.g. a multi-head critic) plus the ``[N, T]`` response mask."""
    width = max(len(s.response_ids) for s in samples)
    first = next((getattr(s, key) for s in samples if getattr(s, key)), None)
    heads = (len(first[0]),) if first and isinstance(first[0], list) else ()
    values = torch.zeros((len(samples), width) + heads, dtype=torch.float64)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        mask[i, :n] = True
        if getattr(s, key) is not None:
            values[i, :n] = torch.tensor(getattr(s, key), dtype=torch.float64)
    return values, mask


def task_token_rewards(samples: list, params) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Token rewards: sequence ``reward`` at the last token + process rewards at step ends
    - kl_coef * KL (if ``kl_in_reward``). Returns ``(token_rewards [N, T], mask, stats)``."""
    from prefopt.rl.advantages import masked_mean
    from prefopt.rl.ppo import kl_penalty

    old, mask = per_token(samples, "old_logps")
    token_rewards = at_last_token([s.reward for s in samples], mask)
    if any(s.process_rewards is not None for s in samples):
        token_rewards = token_rewards + per_token(samples, "process_rewards")[0]   # at step ends
    stats = {}
    if params.kl_coef > 0:
        ref, _ = per_token(samples, "ref_logps")
        kl = kl_penalty(old, ref, kind=params.kl_estimator) * mask
        stats["kl"] = float(masked_mean(kl, mask))
        if params.kl_in_reward:
            token_rewards = token_rewards - params.kl_coef * kl
    return token_rewards, mask, stats


def at_last_token(values: list[float], mask: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` zeros with each sample's value at its last response token."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    out[torch.arange(mask.shape[0]), mask.sum(-1) - 1] = torch.tensor(values, dtype=torch.float64)
    return out


def estimate_advantages(token_rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, params,
                        group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recipe's estimator (gae | grpo | dr_grpo | rloo) on one reward channel, whitened if asked.
    Group estimators score whole sequences: the sum of token rewards, KL included."""
    from prefopt.rl.advantages import ADVANTAGES, whiten
    adv, returns = ADVANTAGES.get(params.advantage)(
        token_rewards=token_rewards, values=values, mask=mask, scores=None, group_size=group_size,
        gamma=params.gamma, lam=params.lam)
    if params.whiten_advantages:
        adv = whiten(adv, mask)
    return adv, returns


def write_signals(samples: list, advantages: torch.Tensor, returns: torch.Tensor | None) -> None:
    """Per-sample ``advantages`` (and ``returns``, ``[T]`` or ``[T, H]``) lists for the learners."""
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        s.advantages = advantages[i, :n].tolist()
        if returns is not None:
            s.returns = returns[i, :n].tolist()


def compute_advantages(samples: list, params, group_size: int) -> dict[str, float]:
    """Token rewards -> advantages (whitened if asked) and, with a critic, returns; written into
    the samples. Returns KL / critic metrics."""
    from prefopt.rl.ppo import explained_variance

    token_rewards, mask, stats = task_token_rewards(samples, params)
    values = per_token(samples, "values")[0] if samples[0].values is not None else None   # a critic ran
    adv, returns = estimate_advantages(token_rewards, values, mask, params, group_size)
    write_signals(samples, adv, returns)
    if returns is not None and values is not None:
        stats["critic/explained_variance"] = float(explained_variance(values, returns, mask))
    return stats


class RewardNormalizer:
    """Running mean/std of sequence rewards (Welford), part of the resumable state."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])

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


def overlong_penalty(lengths: list[int], max_tokens: int, buffer: int, factor: float = 1.0) -> list[float]:
    """DAPO's soft overlong penalty (Yu et al. 2025, arXiv 2503.14476, eq. 13), one per response.

    With ``L_max = max_tokens``, ``L_cache = buffer`` and ``|y|`` a response's token count:
    ``0`` if ``|y| <= L_max - L_cache``; ``(L_max - L_cache - |y|) / L_cache`` if
    ``L_max - L_cache < |y| <= L_max`` (linear from 0 down to -1 at ``L_max``); ``-1`` beyond;
    all times ``factor``. Same values as TRL's ``trl.rewards.get_soft_overlong_punishment``
    (``max_completion_len``, ``soft_punish_cache``) at ``factor`` 1.
    """
    if buffer < 1 or buffer > max_tokens:
        raise ValueError(f"overlong buffer must be in [1, max_tokens={max_tokens}], got {buffer}")
    expected = max_tokens - buffer
    out = []
    for n in lengths:
        if n <= expected:
            value = 0.0
        elif n <= max_tokens:
            value = (expected - n) / buffer
        else:
            value = -1.0
        out.append(factor * value)
    return out
