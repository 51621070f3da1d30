"""Implicit process rewards ("Free Process Rewards without Process Labels", Yuan et al. 2024,
arXiv 2412.01981): the outcome reward is parameterised as ``beta * log pi_theta(y) / pi_ref(y)``, so
the token-level reward is ``beta * (log pi_theta(y_t) - log pi_ref(y_t))`` and the process reward of
step k is its sum over the tokens of step k. All steps come from one forward of the PRM and one of its
reference model (PRIME, Cui et al. 2025, trains such a PRM online).
"""
from __future__ import annotations

import torch


def _num_steps(step_index: torch.Tensor) -> int:
    return int(step_index.max().item()) + 1 if step_index.numel() else 0


def step_rewards(policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, step_index: torch.Tensor, *,
                 beta: float) -> torch.Tensor:
    """Per-step implicit process rewards ``[B, K]``.

    Args:
        policy_token_logps: ``[B, T]`` log-probabilities of the response tokens under the PRM.
        ref_token_logps: ``[B, T]`` the same under its reference model.
        step_index: ``[B, T]`` long, each token's step (0..K-1), or -1 for a token in no step
            (prompt, padding).
        beta: the implicit reward's scale.

    Returns:
        ``[B, K]`` with K = max step index + 1 over the batch (``[B, 0]`` when no token is in a step);
        entry ``[b, k] = beta * sum_{t: step_index[b, t] == k} (policy - ref)``; 0 for a step row b
        does not have (see :func:`step_mask`).

    Raises:
        ValueError: the three inputs are not 2-D tensors of one shape.
    """
    if policy_token_logps.dim() != 2:
        raise ValueError(f"policy_token_logps must be [B, T], got shape {tuple(policy_token_logps.shape)}")
    if ref_token_logps.shape != policy_token_logps.shape or step_index.shape != policy_token_logps.shape:
        raise ValueError(f"shape mismatch: policy_token_logps {tuple(policy_token_logps.shape)}, ref_token_logps "
                         f"{tuple(ref_token_logps.shape)}, step_index {tuple(step_index.shape)}")
    step_index = step_index.long()
    B = policy_token_logps.shape[0]
    K = _num_steps(step_index)
    token_rewards = beta * (policy_token_logps - ref_token_logps)
    in_step = step_index >= 0
    # Tokens in no step are sent to an extra column K, dropped afterwards.
    idx = torch.where(in_step, step_index, torch.full_like(step_index, K))
    out = token_rewards.new_zeros(B, K + 1)
    out.scatter_add_(1, idx, token_rewards)
    return out[:, :K]


def step_mask(step_index: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` bool, True where row b has at least one token of step k (K as in :func:`step_rewards`).
    ``step_index`` ``[B, T]`` long, -1 for tokens in no step."""
    if step_index.dim() != 2:
        raise ValueError(f"step_index must be [B, T], got shape {tuple(step_index.shape)}")
    step_index = step_index.long()
    B = step_index.shape[0]
    K = _num_steps(step_index)
    idx = torch.where(step_index >= 0, step_index, torch.full_like(step_index, K))
    counts = torch.zeros(B, K + 1, dtype=torch.long, device=step_index.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx))
    return counts[:, :K] > 0
