"""Multi-attribute regression reward models (HelpSteer2, Wang et al. 2024): one linear head per
attribute on the last token, mean squared error against the attribute ratings."""
from __future__ import annotations

import torch


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
