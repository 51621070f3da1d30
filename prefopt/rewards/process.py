"""Process-reward refinements Clip and Delta (Gao et al. 2024, "On Designing Effective RL Reward
at Training Time for LLM Reasoning", arXiv 2410.15115) and their placement on tokens.

A process reward model scores the K reasoning steps of a response: ``step_rewards`` ``[B, K]``.
Raw step rewards are hackable (repeating correct-but-useless steps keeps paying); both
refinements bound the return of any trajectory:

* Clip:  r~_k = min(r_k - eta, 0)           -- every step reward <= 0, so extra steps never pay;
* Delta: r~_k = r_k - r_{k+1} (k < K_b), r~_{K_b} = r_{K_b}
                                             -- sum_{j >= k} r~_j = r_k telescopes (bounded).

``step_mask`` ``[B, K]`` marks valid steps; the valid steps of a row must be a **prefix**
(steps left-aligned, padding at the end; validated). K_b is the number of valid steps of row b.
Padded steps get refined reward 0.

Stacking order: **Clip first, then Delta** ("Clip-Delta" in the paper's naming). Delta applied
to clipped rewards keeps the telescoping property, so the return from step k equals
min(r_k - eta, 0) <= 0: bounded above by 0 and below by the single step's clipped reward.
(The stored copy of the paper available to us showed only the abstract; the order follows the
paper's "Clip-Delta" naming and the property above.)

The final per-token reward of Gao et al.: success reward at the last token plus alpha * refined
step rewards at the last token of each step -- :func:`place_step_rewards`.
"""
from __future__ import annotations

import torch


def _step_mask(step_rewards: torch.Tensor, step_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate ``[B, K]`` rewards and a prefix mask; returns a bool mask."""
    if step_rewards.dim() != 2:
        raise ValueError(f"step_rewards must be [B, K], got shape {tuple(step_rewards.shape)}")
    if step_mask is None:
        return torch.ones_like(step_rewards, dtype=torch.bool)
    if step_mask.shape != step_rewards.shape:
        raise ValueError(f"step_mask shape {tuple(step_mask.shape)} != step_rewards shape "
                         f"{tuple(step_rewards.shape)}")
    m = step_mask.bool()
    if (m[:, 1:] & ~m[:, :-1]).any():
        raise ValueError("step_mask must mark a prefix of the steps in every row "
                         "(valid steps first, padding at the end)")
    return m


def clip_process_rewards(step_rewards: torch.Tensor, eta: float,
                         step_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Clip mechanism: r~_k = min(r_k - eta, 0) on valid steps, 0 on padded steps. ``[B, K]``."""
    m = _step_mask(step_rewards, step_mask)
    out = torch.clamp(step_rewards - eta, max=0.0)
    return torch.where(m, out, torch.zeros_like(out))


def delta_process_rewards(step_rewards: torch.Tensor,
                          step_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Delta mechanism: r~_k = r_k - r_{k+1} for k < K_b, r~_{K_b} = r_{K_b}; padded steps 0.

    For every valid k, sum_{j >= k} r~_j = r_k. ``[B, K]`` -> ``[B, K]``.
    """
    m = _step_mask(step_rewards, step_mask)
    r = torch.where(m, step_rewards, torch.zeros_like(step_rewards))
    nxt = torch.zeros_like(r)
    nxt[:, :-1] = r[:, 1:]          # 0 after the last valid step, since padding is zeroed
    return torch.where(m, r - nxt, torch.zeros_like(r))


def refine_process_rewards(step_rewards: torch.Tensor, step_mask: torch.Tensor | None, *,
                           clip_eta: float | None = None, delta: bool = False) -> torch.Tensor:
    """Apply Clip (when ``clip_eta`` is not None) and then Delta (when ``delta``).

    With neither enabled, returns the raw rewards with padded steps set to 0. ``[B, K]``.
    """
    m = _step_mask(step_rewards, step_mask)
    out = torch.where(m, step_rewards, torch.zeros_like(step_rewards))
    if clip_eta is not None:
        out = clip_process_rewards(out, clip_eta, m)
    if delta:
        out = delta_process_rewards(out, m)
    return out


def place_step_rewards(step_rewards: torch.Tensor, step_end_positions: torch.Tensor,
                       step_mask: torch.Tensor | None, seq_len: int, *,
                       success_reward: torch.Tensor | None = None,
                       last_positions: torch.Tensor | None = None,
                       alpha: float = 1.0) -> torch.Tensor:
    """Token-level rewards ``[B, T]`` (T = ``seq_len``) from step rewards.

    * ``step_rewards`` ``[B, K]``: the (already refined) step rewards;
    * ``step_end_positions`` ``[B, K]`` (int): token index, in the ``[B, T]`` grid the caller
      uses (e.g. response tokens), of the last token of each step; ignored on padded steps;
    * ``alpha * step_rewards[b, k]`` is added at ``[b, step_end_positions[b, k]]`` (rewards of
      steps ending on the same token add up);
    * ``success_reward`` ``[B]`` (sequence level, e.g. verifier correctness) is added at
      ``[b, last_positions[b]]`` (the final response token); ``last_positions`` is required then.
    """
    m = _step_mask(step_rewards, step_mask)
    if step_end_positions.shape != step_rewards.shape:
        raise ValueError(f"step_end_positions shape {tuple(step_end_positions.shape)} != "
                         f"step_rewards shape {tuple(step_rewards.shape)}")
    pos = step_end_positions.long()
    if ((pos < 0) | (pos >= seq_len))[m].any():
        raise ValueError(f"step_end_positions of valid steps must lie in [0, {seq_len})")
    B = step_rewards.shape[0]
    out = torch.zeros(B, seq_len, dtype=step_rewards.dtype, device=step_rewards.device)
    vals = torch.where(m, alpha * step_rewards, torch.zeros_like(step_rewards))
    out.scatter_add_(1, torch.where(m, pos, torch.zeros_like(pos)), vals)
    if success_reward is not None:
        if last_positions is None:
            raise ValueError("success_reward needs last_positions [B] (index of the final token)")
        last = last_positions.long().reshape(B, 1)
        if ((last < 0) | (last >= seq_len)).any():
            raise ValueError(f"last_positions must lie in [0, {seq_len})")
        out.scatter_add_(1, last, success_reward.to(out.dtype).reshape(B, 1))
    return out
