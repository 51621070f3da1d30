"""Process reward models trained on step labels (Math-Shepherd, Wang et al. 2023): a score read at
the last token of every step, binary cross-entropy against the step's label (0/1, or a soft label in
[0, 1], the fraction of Monte Carlo completions from that step that reach the right answer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def step_bce_loss(step_logits: torch.Tensor, labels: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Per-example process-reward losses ``[B]``: the mean over the example's valid steps of the
    binary cross-entropy of ``sigma(step_logits)`` against ``labels`` (hard or soft, in [0, 1]).
    ``step_logits``/``labels``/``step_mask`` ``[B, K]``."""
    bce = F.binary_cross_entropy_with_logits(step_logits, labels.to(step_logits.dtype), reduction="none")
    mask = step_mask.to(bce.dtype)
    return (bce * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
