"""Bradley–Terry reward models (InstructGPT; Llama 2's margin; Secrets of RLHF in LLMs Part II's
label smoothing), with ``d = r_c - r_r - margin``:

    loss = -(1 - eps) * log sigma(d) - eps * log sigma(-d) + center_coef * (r_c + r_r)^2

``center_coef`` is TRL's ``center_rewards_coefficient`` (keeps rewards centred on 0). Graded lists
(``{prompt, responses, scores}``) train on every ordered pair of a list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.errors import ConfigError
from prefopt.objectives.base import (LossOut, Objective, ObjectiveParams, ScoreOutput, register_objective,
                                     scatter_slots)


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


def ordered_pairs(scores: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
    """``[B, K, K]`` bool: (i, j) where response i of an example is labelled better than response j."""
    valid = slot_mask[:, :, None] & slot_mask[:, None, :]
    return valid & (scores[:, :, None] > scores[:, None, :])


@register_objective
class RewardModel(Objective):
    """A Bradley–Terry reward model on pairs (an optional per-row margin and weight) or graded lists
    (every ordered pair of a list; the example's loss is the mean over its pairs)."""

    name = "reward_model"
    batch_kind = "lists"            # a pair collates as a list of two (chosen, rejected)
    algorithm = "reward_model"
    model_kind = "reward"
    accuracy_metric = "accuracy"

    @dataclass
    class Params(ObjectiveParams):
        name: str = "reward_model"
        label_smoothing: float = 0.0      # eps: the assumed probability that a label is flipped
        center_coef: float = 0.0          # weight of (r_c + r_r)^2 (TRL's center_rewards_coefficient)
        use_margin: bool = True           # subtract the rows' margin field from r_c - r_r

        def validate(self) -> None:
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ConfigError(f"objective.label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
            if self.center_coef < 0:
                raise ConfigError(f"objective.center_coef must be >= 0 (got {self.center_coef})")

    @classmethod
    def data_kinds(cls) -> tuple[str, ...]:
        return ("pairs", "lists")

    @classmethod
    def head_labels(cls, recipe) -> list[str]:
        return ["reward"]

    def loss(self, out: ScoreOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        p = self.params
        slot_mask = batch["slot_mask"]
        rewards = scatter_slots(out.scores[:, 0, 0], slot_mask)               # [B, K]
        pairs = ordered_pairs(batch["scores"], slot_mask)                      # [B, K, K]
        b, i, j = pairs.nonzero(as_tuple=True)
        margin = batch["margin"][b] if p.use_margin and "margin" in batch else None
        losses = bradley_terry_loss(rewards[b, i], rewards[b, j], margin=margin,
                                    label_smoothing=p.label_smoothing, center_coef=p.center_coef)
        count = pairs.sum((1, 2)).to(losses.dtype)
        per_example = torch.zeros_like(count).index_add_(0, b, losses) / count
        with torch.no_grad():
            diff = rewards[b, i] - rewards[b, j]
            correct = (diff > 0).to(losses.dtype) + 0.5 * (diff == 0).to(losses.dtype)
            n = slot_mask.sum(-1).to(losses.dtype)
            valid = torch.where(slot_mask, rewards, torch.zeros_like(rewards))
            first = batch["scores"].masked_fill(~slot_mask, float("-inf")).argmax(-1)
            last = batch["scores"].masked_fill(~slot_mask, float("inf")).argmin(-1)
            rows = torch.arange(rewards.shape[0], device=rewards.device)
            metrics = {
                "accuracy": torch.zeros_like(count).index_add_(0, b, correct) / count,
                "margin": torch.zeros_like(count).index_add_(0, b, diff) / count,
                "rewards/chosen": rewards[rows, first], "rewards/rejected": rewards[rows, last],
                "rewards/mean": valid.sum(-1) / n, "rewards/second_moment": (valid ** 2).sum(-1) / n,
            }
        if "weight" in batch:   # a pair's data.weight_field: the mean of w_i * l_i, as the policy objectives
            per_example = per_example * batch["weight"].to(per_example.dtype)
        return LossOut(loss=per_example.mean(), metrics=metrics)
