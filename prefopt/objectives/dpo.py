"""DPO (Rafailov et al. 2023, arXiv 2305.18290), its label-smoothed variant cDPO, and IPO
(Azar et al. 2023, arXiv 2310.12036).

With h = [logp_pi(y_w) - logp_ref(y_w)] - [logp_pi(y_l) - logp_ref(y_l)] and a pair's margin m
(0 for a pair without one):

* DPO:  -log sigma(beta h - m)
* cDPO: -(1 - eps) log sigma(beta h - m) - eps log sigma(-(beta h - m))   (eps = ``label_smoothing``)
* IPO:  (h - 1/(2 beta))^2, on log-probs averaged over response tokens (as TRL does; see below).

The margin is ODPO's offset (Amini et al. 2024, arXiv 2402.10571: -log sigma(beta h - Delta), the
chosen implicit reward must exceed the rejected one by Delta), in reward units like the reward models'
Llama 2 margin (:func:`prefopt.objectives.reward_model.bradley_terry_loss` with the implicit rewards is
this loss). IPO has no published per-pair margin, so IPO refuses rows that carry one.

A pair's weight w >= 0 (1 for a pair without one) scales its loss: the batch loss is the mean over
pairs of w_i * l_i (divided by the number of pairs, not by sum w_i), so weights of 1 give exactly the
unweighted loss and micro-batches and learners combine as plain means; TRL's WPO weighting
(``use_weighting``) reduces the same way (``(losses * weights).mean()``).

The implicit reward of a response is beta * (logp_pi(y) - logp_ref(y)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.errors import ConfigError
from prefopt.objectives.base import (LossOut, Objective, ObjectiveParams, PolicyOutput,
                                     register_objective, split_pairs)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float, label_smoothing: float = 0.0, ipo: bool = False,
             margin: torch.Tensor | float | None = None, weight: torch.Tensor | float | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO / cDPO / IPO losses.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
            response log-probs. For DPO/cDPO these are *summed* over response tokens. For IPO the
            caller passes log-probs *averaged* over response tokens, as TRL's DPOTrainer does for
            ``loss_type="ipo"`` (the IPO authors' normalisation); :class:`DPO` does this division.
        beta: inverse temperature (for IPO the regulariser tau of the paper, Eq. 17).
        label_smoothing: eps of cDPO, the assumed probability that a label is flipped; 0 is DPO.
        ipo: use the IPO squared loss instead of the logistic one.
        margin: ``[B]`` (or a constant) ODPO offset subtracted from the logit ``beta * h``; None is 0.
            Not for IPO.
        weight: ``[B]`` (or a constant) factor on each example's loss; None is 1.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; ``losses`` are the weighted
        per-example losses (their mean is the batch loss); rewards are ``beta * (policy - ref)`` of
        the inputs given, detached.
    """
    if ipo and label_smoothing != 0.0:
        raise ValueError("label_smoothing does not apply to the IPO loss")
    if ipo and margin is not None:
        raise ValueError("IPO has no published per-pair margin; margin applies to DPO / cDPO only")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if ipo:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        z = beta * h if margin is None else beta * h - margin
        losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if weight is not None:
        losses = losses * weight
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example ``[B]`` metrics of a pairwise objective (all detached)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        # ties count half: a policy that cannot tell the two apart scores chance (0.5), not 0
        "rewards/accuracy": ((chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)
                             + 0.5 * (chosen_rewards == rejected_rewards).to(chosen_rewards.dtype)),
        "rewards/margin": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def refuse_margin_rows(objective: str, examples: list, source: str) -> None:
    """Before Ray starts: a DataError naming the first row that carries a per-pair margin, for an
    objective without one (IPO, SimPO)."""
    row = next((ex.row for ex in examples if ex.margin is not None), None)
    if row is not None:
        from prefopt.errors import DataError
        raise DataError(f"objective '{objective}' has no per-pair margin (ODPO's offset is published for DPO "
                        f"only): remove the field from the rows or set data.margin_field to a name they do not "
                        f"use", source=source, row=row, field="margin (data.margin_field)")


def refuse_margin(objective: str, batch: dict[str, torch.Tensor]) -> None:
    """Raise ConfigError when ``batch`` carries per-pair margins, for an objective without a
    published per-pair margin (IPO, SimPO)."""
    if "margin" in batch:
        raise ConfigError(
            f"objective '{objective}' has no per-pair margin (ODPO's offset is published for DPO only), but the "
            f"data rows carry one (data.margin_field): remove that field from the rows or set "
            f"data.margin_field to a name they do not use")


@register_objective
class DPO(Objective):
    """DPO / cDPO (``label_smoothing > 0``) / IPO (``ipo=True``) on pairs; needs the reference. Reads
    the batch's per-pair ``margin`` (DPO / cDPO; IPO raises ConfigError) and ``weight``, when present."""

    name = "dpo"
    needs = frozenset({"reference"})
    batch_kind = "pairs"

    @dataclass
    class Params(ObjectiveParams):
        name: str = "dpo"
        beta: float = 0.1
        label_smoothing: float = 0.0   # cDPO eps, in [0, 0.5)
        ipo: bool = False

        def __post_init__(self):
            self.validate()

        def validate(self) -> None:
            if not self.beta > 0:
                raise ConfigError(f"objective.beta must be > 0, got {self.beta}")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ConfigError(
                    f"objective.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
            if self.ipo and self.label_smoothing != 0.0:
                raise ConfigError("objective.label_smoothing does not apply to IPO; set it to 0")

    @classmethod
    def check_examples(cls, params, examples: list, source: str) -> None:
        if params.ipo:
            refuse_margin_rows("ipo", examples, source)

    def loss(self, policy: PolicyOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        p = self.params
        policy_logps, ref_logps = policy.logps, batch["ref_logps"]
        if p.ipo:  # IPO works on per-token averages (TRL clamps the count at 1 the same way)
            n = policy.num_tokens.clamp(min=1.0)
            policy_logps, ref_logps = policy_logps / n, ref_logps / n
        if p.ipo:
            refuse_margin("ipo", batch)
        pol_c, pol_r = split_pairs(policy_logps)
        ref_c, ref_r = split_pairs(ref_logps)
        losses, rew_c, rew_r = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=p.beta,
                                        label_smoothing=p.label_smoothing, ipo=p.ipo,
                                        margin=batch.get("margin"), weight=batch.get("weight"))
        # logps/* report the summed policy log-probs whatever the loss works on.
        sum_c, sum_r = split_pairs(policy.logps)
        return LossOut(loss=losses.mean(), metrics=pair_metrics(rew_c, rew_r, sum_c, sum_r))


@register_objective
class IPO(DPO):
    """IPO (Azar et al. 2023, arXiv 2310.12036): :class:`DPO` with ``ipo=True`` by default.

    For IPO, ``rewards/*`` are beta times the per-token-averaged log-ratios the loss works on.
    """

    name = "ipo"

    @dataclass
    class Params(DPO.Params):
        name: str = "ipo"
        ipo: bool = True
