"""SimPO (Meng et al. 2024, arXiv 2405.14734): reference-free, length-normalised DPO with a margin.

    loss = -log sigma( beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma )

where avg_logp(y) = logp_pi(y) / |y| is the mean token log-prob of the response and gamma is the
*absolute* target reward margin. The official code (princeton-nlp/SimPO) is parameterised by
``gamma_beta_ratio = gamma / beta`` instead; TRL's CPOTrainer (``loss_type="simpo"``) by the
absolute ``simpo_gamma``, like here. ``label_smoothing`` eps gives the conservative form of the
official code: -(1 - eps) log sigma(z) - eps log sigma(-z).

A pair's weight w >= 0 (the rows' ``data.weight_field``; 1 where a pair has none) scales its loss, and
the batch loss is the mean of w_i * l_i, as for DPO (:mod:`prefopt.objectives.dpo`). gamma is one
margin for all pairs: SimPO has no published per-pair margin, so rows that carry one
(``data.margin_field``) are refused (ConfigError) rather than given an invented form.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.errors import ConfigError
from prefopt.objectives.base import (LossOut, Objective, ObjectiveParams, PolicyOutput,
                                     register_objective, split_pairs)
from prefopt.objectives.dpo import pair_metrics, refuse_margin, refuse_margin_rows


def simpo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor, *,
               beta: float, gamma: float, label_smoothing: float = 0.0,
               weight: torch.Tensor | float | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example SimPO losses.

    Args:
        policy_chosen_avg_logps, policy_rejected_avg_logps: ``[B]`` response log-probs *averaged*
            over response tokens.
        beta: reward scale.
        gamma: absolute target margin (official code: ``gamma_beta_ratio * beta``).
        label_smoothing: eps of the conservative loss; 0 is the paper's loss.
        weight: ``[B]`` (or a constant) factor on each example's loss; None is 1.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; ``losses`` are the weighted
        per-example losses (their mean is the batch loss); rewards are ``beta * avg_logp``, detached.
    """
    z = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if weight is not None:
        losses = losses * weight
    return losses, beta * policy_chosen_avg_logps.detach(), beta * policy_rejected_avg_logps.detach()


@register_objective
class SimPO(Objective):
    """SimPO on pairs; reference-free (needs no role beyond the learner). Reads the batch's per-pair
    ``weight`` when present; a per-pair ``margin`` raises ConfigError."""

    name = "simpo"
    needs = frozenset()
    batch_kind = "pairs"

    @dataclass
    class Params(ObjectiveParams):
        name: str = "simpo"
        beta: float = 2.0
        gamma: float = 1.0             # absolute margin; official code's gamma_beta_ratio = gamma / beta
        label_smoothing: float = 0.0

        def __post_init__(self):
            self.validate()

        def validate(self) -> None:
            if not self.beta > 0:
                raise ConfigError(f"objective.beta must be > 0, got {self.beta}")
            if not self.gamma >= 0:
                raise ConfigError(f"objective.gamma (absolute margin) must be >= 0, got {self.gamma}")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ConfigError(
                    f"objective.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @classmethod
    def check_examples(cls, params, examples: list, source: str) -> None:
        refuse_margin_rows(cls.name, examples, source)

    def loss(self, policy: PolicyOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        p = self.params
        refuse_margin(self.name, batch)
        avg_c, avg_r = split_pairs(policy.logps / policy.num_tokens.clamp(min=1.0))
        losses, rew_c, rew_r = simpo_loss(avg_c, avg_r, beta=p.beta, gamma=p.gamma,
                                          label_smoothing=p.label_smoothing, weight=batch.get("weight"))
        # logps/* are the average log-probs the loss works on.
        return LossOut(loss=losses.mean(), metrics=pair_metrics(rew_c, rew_r, avg_c, avg_r))
