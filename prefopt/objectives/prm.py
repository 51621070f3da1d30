"""Process reward models trained on step labels (Math-Shepherd, Wang et al. 2023): a score read at
the last token of every step, binary cross-entropy against the step's label (0/1, or a soft label in
[0, 1], the fraction of Monte Carlo completions from that step that reach the right answer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.objectives.base import LossOut, Objective, ObjectiveParams, ScoreOutput, register_objective


def step_bce_loss(step_logits: torch.Tensor, labels: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Per-example process-reward losses ``[B]``: the mean over the example's valid steps of the
    binary cross-entropy of ``sigma(step_logits)`` against ``labels`` (hard or soft, in [0, 1]).
    ``step_logits``/``labels``/``step_mask`` ``[B, K]``."""
    bce = F.binary_cross_entropy_with_logits(step_logits, labels.to(step_logits.dtype), reduction="none")
    mask = step_mask.to(bce.dtype)
    return (bce * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


@register_objective
class ProcessRewardModel(Objective):
    """A process reward model on step-labelled rows: the score head read at the last token of every
    step (``data.step_delimiter`` ends each step), binary cross-entropy against the step labels."""

    name = "prm"
    batch_kind = "sft"              # one response per example
    algorithm = "reward_model"
    model_kind = "reward"
    accuracy_metric = "step_accuracy"

    @dataclass
    class Params(ObjectiveParams):
        name: str = "prm"

    @classmethod
    def data_kinds(cls) -> tuple[str, ...]:
        return ("steps",)

    @classmethod
    def head_labels(cls, recipe) -> list[str]:
        return ["step_correct"]

    def loss(self, out: ScoreOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        logits, labels, mask = out.scores[:, :, 0], batch["step_labels"], batch["step_mask"]
        losses = step_bce_loss(logits, labels, mask)
        with torch.no_grad():
            m = mask.to(losses.dtype)
            right = ((logits > 0) == (labels >= 0.5)).to(losses.dtype)
            metrics = {"step_accuracy": (right * m).sum(-1) / m.sum(-1).clamp(min=1.0),
                       "steps": m.sum(-1)}
        return LossOut(loss=losses.mean(), metrics=metrics)
