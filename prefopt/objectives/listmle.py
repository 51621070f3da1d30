"""ListMLE / Plackett-Luce preference optimisation ("DPO-PL"), one of the listwise losses compared
in LiPO (Liu et al. 2024, arXiv 2402.01878); the Plackett-Luce generalisation of DPO is in
Rafailov et al. 2023 (arXiv 2305.18290, Appendix A.3).

With s_i = beta * (logp_pi(y_i) - logp_ref(y_i)) and pi the permutation sorting the valid slots
by label psi descending, the loss is the negative Plackett-Luce log-likelihood of pi:

    loss = - sum_k [ s_pi(k) - logsumexp_{m >= k} s_pi(m) ]

Tied labels are handled as tied events in Cox's partial likelihood with Breslow's approximation
(Breslow 1974): a response's denominator runs over every response graded no higher than it, its tied
peers included, and the responses of the lowest grade contribute no term (they are preferred over
nothing). Without ties this is the formula above; with ties no order among tied responses is
invented (a list whose labels all tie has loss 0), which matters online, where a 0/1 reward ties most
of a prompt's samples. Padded slots (``mask`` False) take no part and get no gradient.
For K = 2 this is DPO: -log sigma(s_w - s_l).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.errors import ConfigError
from prefopt.objectives.base import (LossOut, Objective, ObjectiveParams, PolicyOutput,
                                     register_objective)
from prefopt.objectives.lipo import implicit_rewards, list_inputs, list_metrics, valid_mask


def listmle_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, *,
                 beta: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-list Plackett-Luce negative log-likelihood, ``[B]``.

    Args:
        policy_logps, ref_logps: ``[B, K]`` summed response log-probs.
        scores: ``[B, K]`` labels psi (higher is better).
        beta: reward scale of s = beta * (policy - ref).
        mask: ``[B, K]`` bool, True for real slots (default: all).
    """
    mask = valid_mask(policy_logps, mask)
    s = implicit_rewards(policy_logps, ref_logps, beta=beta, mask=mask)
    k = s.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=s.device)
    # rest[b, i, m]: slot m is valid and graded no higher than slot i (Breslow's risk set). The
    # diagonal keeps every row non-empty so padded rows stay finite (their terms are dropped below).
    rest = ((scores.unsqueeze(-2) <= scores.unsqueeze(-1)) & mask.unsqueeze(-2)) | eye
    denom = torch.logsumexp(s.unsqueeze(-2).expand(rest.shape).masked_fill(~rest, float("-inf")), -1)
    lowest = scores.masked_fill(~mask, float("inf")).min(-1, keepdim=True).values
    terms = torch.where(mask & (scores > lowest), s - denom, torch.zeros_like(s))
    return -terms.sum(-1)


@register_objective
class ListMLE(Objective):
    """ListMLE / Plackett-Luce DPO on lists; needs the reference."""

    name = "listmle"
    needs = frozenset({"reference"})
    batch_kind = "lists"
    accuracy_metric = "ranking/accuracy"

    @dataclass
    class Params(ObjectiveParams):
        name: str = "listmle"
        beta: float = 0.1          # DPO's customary default (an untuned starting point)

        def __post_init__(self):
            self.validate()

        def validate(self) -> None:
            if not self.beta > 0:
                raise ConfigError(f"objective.beta must be > 0, got {self.beta}")

    def loss(self, policy: PolicyOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        p = self.params
        pol, ref, scores, mask = list_inputs(policy, batch)
        losses = listmle_loss(pol, ref, scores, beta=p.beta, mask=mask)
        s = implicit_rewards(pol, ref, beta=p.beta, mask=mask)
        return LossOut(loss=losses.mean(), metrics=list_metrics(s, scores, mask))
