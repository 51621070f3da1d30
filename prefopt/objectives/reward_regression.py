"""Multi-attribute regression reward models (HelpSteer2, Wang et al. 2024): one linear head per
attribute on the last token, mean squared error against the attribute ratings."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefopt.errors import ConfigError
from prefopt.objectives.base import LossOut, Objective, ObjectiveParams, ScoreOutput, register_objective


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


@register_objective
class RewardRegression(Objective):
    """One regression head per attribute, read at the response's last token; the loss of an example
    is the mean squared error over the attributes its row rates."""

    name = "reward_regression"
    batch_kind = "sft"              # one response per example
    algorithm = "reward_model"
    model_kind = "reward"
    accuracy_metric = "mse"

    @dataclass
    class Params(ObjectiveParams):
        name: str = "reward_regression"
        # the heads, in order (default: the attributes of the training rows, first seen first)
        attributes: list[str] = field(default_factory=list)

        def validate(self) -> None:
            if not all(isinstance(a, str) and a for a in self.attributes) or \
                    len(set(self.attributes)) != len(self.attributes):
                raise ConfigError(f"objective.attributes must be distinct attribute names (got {self.attributes})")

    @classmethod
    def data_kinds(cls) -> tuple[str, ...]:
        return ("attributes",)

    @classmethod
    def head_labels(cls, recipe) -> list[str]:
        return list(recipe.objective.attributes)

    def loss(self, out: ScoreOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        predicted, mask = out.scores[:, 0, :], batch["target_mask"]
        losses = attribute_mse_loss(predicted, batch["targets"], mask)
        with torch.no_grad():
            sq = ((predicted - batch["targets"]) ** 2).masked_fill(~mask, float("nan"))   # NaN: left out of means
            metrics = {"mse": losses.detach()}
            metrics.update({f"mse/{name}": sq[:, a] for a, name in enumerate(self.params.attributes)})
        return LossOut(loss=losses.mean(), metrics=metrics)
