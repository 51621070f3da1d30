"""Supervised fine-tuning: the negative log-likelihood of the response tokens given the prompt.

    loss = mean over examples of ( -(1/|y|) * sum_t log pi(y_t | x, y_<t) )

Each response is averaged over its own tokens, then over examples ("sequence mean"): the loss of a
global batch does not depend on how it is split into micro-batches or learners (tested: 1 learner
x 8 = 2 learners x 4 = 2 micro-batches of 4). The prompt's tokens are not trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.objectives.base import LossOut, Objective, ObjectiveParams, PolicyOutput, register_objective


def sft_loss(response_logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Per-example SFT losses ``[B]``: the mean negative log-likelihood of each response's tokens.

    Args:
        response_logps: ``[B]`` summed log-probs of each response's tokens.
        num_tokens: ``[B]`` the number of response tokens (float).
    """
    return -response_logps / num_tokens.clamp(min=1.0)


@register_objective
class SFT(Objective):
    """SFT on ``{prompt, response}`` rows (or chat ``messages``, the last one the response)."""

    name = "sft"
    needs = frozenset()
    batch_kind = "sft"
    algorithm = "sft"
    accuracy_metric = "nll"

    @dataclass
    class Params(ObjectiveParams):
        name: str = "sft"

    def loss(self, policy: PolicyOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        losses = sft_loss(policy.logps, policy.num_tokens)
        return LossOut(loss=losses.mean(), metrics={"nll": losses.detach(),
                                                    "response_tokens": policy.num_tokens.detach()})
