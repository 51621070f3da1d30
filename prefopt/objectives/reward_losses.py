"""Pure losses of reward-model training (tensors in, per-example losses out).

* Bradley–Terry (InstructGPT; Llama 2's margin; Secrets of RLHF II's label smoothing), with
  ``d = r_c - r_r - margin``:

      loss = -(1 - eps) * log sigma(d) - eps * log sigma(-d) + center_coef * (r_c + r_r)^2

  ``center_coef`` is TRL's ``center_rewards_coefficient`` (keeps rewards centred on 0).
* Multi-attribute regression (HelpSteer2): mean squared error of each attribute head.
* Process rewards (Math-Shepherd): binary cross-entropy of each step's score against its label
  (0/1, or a soft label in [0, 1]).
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


def attribute_mse_loss(predicted: torch.Tensor, target: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example regression losses ``[B]``: the mean over the example's (present) attributes of
    ``(predicted - target)^2``. ``predicted``/``target``/``mask`` ``[B, A]``; a row without any
    present attribute has loss 0."""
    sq = (predicted - target) ** 2
    if mask is None:
        return sq.mean(-1)
    mask = mask.to(sq.dtype)
    return (sq * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def step_bce_loss(step_logits: torch.Tensor, labels: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Per-example process-reward losses ``[B]``: the mean over the example's valid steps of the
    binary cross-entropy of ``sigma(step_logits)`` against ``labels`` (hard or soft, in [0, 1]).
    ``step_logits``/``labels``/``step_mask`` ``[B, K]``."""
    bce = F.binary_cross_entropy_with_logits(step_logits, labels.to(step_logits.dtype), reduction="none")
    mask = step_mask.to(bce.dtype)
    return (bce * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
