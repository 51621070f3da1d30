"""Transforming and combining rewards (Wang et al. 2024, "Transforming and Combining Rewards for
Aligning Large Language Models", arXiv 2402.00742): the log-sigmoid transform
``u = log sigma(r(x, y) - r_ref(x))`` against a per-prompt reference reward, and the sum of the
transformed rewards of several sources (a logical AND: the sum is high only if every source is good).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def log_sigmoid_transform(rewards: torch.Tensor, reference_rewards: torch.Tensor | float) -> torch.Tensor:
    """``log sigma(rewards - reference_rewards)`` elementwise (broadcasting), computed stably
    (no inf/nan for large differences of either sign). Output has the broadcast shape; <= 0."""
    return F.logsigmoid(rewards - reference_rewards)


def combine_transformed(rewards_list: Sequence[torch.Tensor],
                        reference_list: Sequence[torch.Tensor | float]) -> torch.Tensor:
    """Sum over reward sources of ``log_sigmoid_transform(rewards_i, reference_i)``.

    Args:
        rewards_list: one ``[N]`` tensor per source.
        reference_list: the matching ``[N]`` reference rewards (or constants), same length.

    Returns:
        ``[N]`` combined reward.
    """
    if len(rewards_list) != len(reference_list):
        raise ValueError(f"{len(rewards_list)} reward sources but {len(reference_list)} references")
    if not rewards_list:
        raise ValueError("combine_transformed needs at least one reward source")
    total = log_sigmoid_transform(rewards_list[0], reference_list[0])
    for r, ref in zip(rewards_list[1:], reference_list[1:]):
        total = total + log_sigmoid_transform(r, ref)
    return total
