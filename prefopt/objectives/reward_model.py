"""Bradley–Terry reward models (InstructGPT; Llama 2's margin; Secrets of RLHF in LLMs Part II's
label smoothing), with ``d = r_c - r_r - margin``:

    loss = -(1 - eps) * log sigma(d) - eps * log sigma(-d) + center_coef * (r_c + r_r)^2

``center_coef`` is TRL's ``center_rewards_coefficient`` (keeps rewards centred on 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                       margin: torch.Tensor | float | None = None, label_smoothing: float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley–Terry losses ``[B]``.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` scalar rewards of the preferred / dispreferred response.
        margin: ``[B]`` (or a constant) the chosen reward must exceed the rejected one by; None is 0.
        label_smoothing: eps, the assumed probability that a pair's label is flipped.
        center_coef: weight of the ``(r_c + r_r)^2`` penalty.
    """
    d = chosen_rewards - rejected_rewards
    if margin is not None:
        d = d - margin
    losses = -(1.0 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses
