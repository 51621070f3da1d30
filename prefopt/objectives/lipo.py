"""LiPO-lambda (Liu et al. 2024, arXiv 2402.01878): listwise preference optimisation with the
LambdaLoss pair weights of learning-to-rank.

A prompt has a list of K responses with graded labels psi (``scores``, higher is better) and
implicit rewards s_i = beta * (logp_pi(y_i) - logp_ref(y_i)). The per-list loss is

    loss = - sum over pairs (i, j) with psi_i > psi_j of  Delta_ij * log sigma(s_i - s_j)
    Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|,  G = 2^psi - 1,  D(tau) = log2(1 + tau)

Choices (documented, tested):

* **Discount base.** The paper writes D(tau) = log(1 + tau), the NDCG discount; NDCG and
  TF-Ranking (``tfr.keras.utils.log2_inverse``, used by its NDCG lambda weights) take the log in
  base 2, which we use. Another base only rescales every Delta by one constant (natural log:
  Delta / ln 2), i.e. it acts like a change of learning rate.
* **No normalisation.** The loss is the plain sum over ordered pairs of a list, as in the paper
  (no division by the number of pairs, no 1/maxDCG); the objective averages it over lists.
* **Ranks.** tau_i is the 1-based position of item i when the *valid* items are sorted by the
  current s, descending; ties (e.g. every s = 0 at the first step, when policy == reference) are
  broken by slot order. Delta is a constant: computed under ``no_grad`` from detached s.
* **Padding.** Slots with ``mask`` False take no part in ranks, pairs, weights or metrics, and
  whatever values they hold (even NaN/inf) change neither the loss nor other gradients; their own
  gradient is zero.
* With ``weights="unit"`` every Delta is 1: the pairwise logistic loss (for K = 2 exactly DPO).

Large labels make G = 2^psi - 1 large; use labels on a small scale (grades, ranks, [0, 1] scores).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.errors import ConfigError
from prefopt.objectives.base import (LossOut, Objective, ObjectiveParams, PolicyOutput,
                                     register_objective, scatter_slots)


def valid_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``mask`` as bool, or all True (shaped like ``x``) when it is None."""
    return torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """s = beta * (policy - ref), ``[B, K]``, 0 on padded slots (whose inputs get no gradient)."""
    mask = valid_mask(policy_logps, mask)
    return beta * (policy_logps.masked_fill(~mask, 0.0) - ref_logps.masked_fill(~mask, 0.0))


def ranks(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each slot among the valid slots sorted by ``values`` descending.

    Ties go to the lower slot index first (a stable sort). Padded slots are not counted; their
    own rank is meaningless. Returns a long tensor shaped like ``values``.
    """
    mask = valid_mask(values, mask)
    v = values.detach().masked_fill(~mask, 0.0)
    k = v.shape[-1]
    idx = torch.arange(k, device=v.device)
    vi, vj = v.unsqueeze(-1), v.unsqueeze(-2)                  # [.., i, 1], [.., 1, j]
    ahead = (vj > vi) | ((vj == vi) & (idx[None, :] < idx[:, None]))   # j sorts before i
    return 1 + (ahead & mask.unsqueeze(-2)).sum(-1)


def ordered_pairs(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, K, K]`` bool: (i, j) both valid and psi_i > psi_j."""
    mask = valid_mask(scores, mask)
    psi = scores.masked_fill(~mask, 0.0)
    return (psi.unsqueeze(-1) > psi.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)


def lambda_weights(scores: torch.Tensor, s: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """LambdaRank weights Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|, ``[B, K, K]``.

    G = 2^psi - 1, D(tau) = log2(1 + tau), tau = :func:`ranks` of the current ``s``. Zero where
    either slot is padded. Computed without gradient.
    """
    with torch.no_grad():
        mask = valid_mask(s, mask)
        psi = scores.detach().to(s.dtype).masked_fill(~mask, 0.0)
        tau = ranks(s, mask).to(s.dtype)
        gain = torch.pow(2.0, psi) - 1.0
        inv_discount = math.log(2.0) / torch.log1p(tau)             # 1 / log2(1 + tau)
        delta = ((gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs()
                 * (inv_discount.unsqueeze(-1) - inv_discount.unsqueeze(-2)).abs())
        return delta * (mask.unsqueeze(-1) & mask.unsqueeze(-2))


def lipo_lambda_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, *,
                     beta: float, mask: torch.Tensor | None = None,
                     weights: str = "lambda") -> torch.Tensor:
    """Per-list LiPO-lambda loss, ``[B]`` (sum over the ordered pairs of each list).

    Args:
        policy_logps, ref_logps: ``[B, K]`` summed response log-probs.
        scores: ``[B, K]`` labels psi (higher is better).
        beta: reward scale of s = beta * (policy - ref).
        mask: ``[B, K]`` bool, True for real slots (default: all).
        weights: ``"lambda"`` (LiPO-lambda) or ``"unit"`` (plain pairwise logistic loss).
    """
    if weights not in ("lambda", "unit"):
        raise ValueError(f"weights must be 'lambda' or 'unit', got {weights!r}")
    mask = valid_mask(policy_logps, mask)
    s = implicit_rewards(policy_logps, ref_logps, beta=beta, mask=mask)
    pairs = ordered_pairs(scores, mask)
    pair_loss = -F.logsigmoid(s.unsqueeze(-1) - s.unsqueeze(-2))          # [B, i, j]
    if weights == "lambda":
        pair_loss = pair_loss * lambda_weights(scores, s, mask)
    return torch.where(pairs, pair_loss, torch.zeros_like(pair_loss)).sum((-2, -1))


def pairwise_logistic_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                           scores: torch.Tensor, *, beta: float,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over ordered pairs of -log sigma(s_i - s_j) (DPO's loss when K = 2), ``[B]``."""
    return lipo_lambda_loss(policy_logps, ref_logps, scores, beta=beta, mask=mask, weights="unit")


def list_metrics(s: torch.Tensor, scores: torch.Tensor,
                 mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-list ``[B]`` metrics of a listwise objective (shared by LiPO and ListMLE), detached.

    * ``ranking/accuracy``: fraction of ordered pairs (psi_i > psi_j) with s_i > s_j, ties s_i = s_j
      counting half (so an untrained policy scores chance, 0.5). A list with
      no ordered pair (one valid slot, or all labels tied) has no accuracy; to keep the values
      NaN-free and the plain mean over the micro-batch equal to the mean over lists that have
      pairs, such a list gets the mean of the others (0.5 if no list in the batch has a pair).
    * ``ranking/pairs``: number of ordered pairs (a weight for exact aggregation).
    * ``rewards/mean``: mean s over valid slots.
    * ``rewards/top_minus_bottom``: s of the best-labelled slot minus s of the worst-labelled one
      (first slot on label ties).
    """
    with torch.no_grad():
        mask = valid_mask(s, mask)
        s = s.detach().masked_fill(~mask, 0.0)
        psi = scores.detach().to(s.dtype)
        pairs = ordered_pairs(psi, mask)
        diff = s.unsqueeze(-1) - s.unsqueeze(-2)
        correct = (pairs & (diff > 0)).to(s.dtype) + 0.5 * (pairs & (diff == 0)).to(s.dtype)  # ties: half
        n_pairs = pairs.sum((-2, -1)).to(s.dtype)
        acc = correct.sum((-2, -1)) / n_pairs.clamp(min=1.0)
        has = n_pairs > 0
        fill = acc[has].mean() if bool(has.any()) else acc.new_tensor(0.5)
        acc = torch.where(has, acc, fill)
        top = psi.masked_fill(~mask, float("-inf")).argmax(-1, keepdim=True)
        bottom = psi.masked_fill(~mask, float("inf")).argmin(-1, keepdim=True)
        return {
            "ranking/accuracy": acc,
            "ranking/pairs": n_pairs,
            "rewards/mean": s.sum(-1) / mask.sum(-1).clamp(min=1).to(s.dtype),
            "rewards/top_minus_bottom": (s.gather(-1, top) - s.gather(-1, bottom)).squeeze(-1),
        }


def list_inputs(policy: PolicyOutput, batch: dict[str, torch.Tensor]):
    """``(policy_logps, ref_logps, scores, mask)`` as ``[B, K]`` tensors from a lists batch."""
    mask = batch["slot_mask"].bool()
    policy_logps = scatter_slots(policy.logps, mask)
    ref_logps = scatter_slots(batch["ref_logps"].to(policy_logps.dtype), mask)
    return policy_logps, ref_logps, batch["scores"].to(policy_logps.dtype), mask


@register_objective
class LiPO(Objective):
    """LiPO-lambda on lists; needs the reference."""

    name = "lipo"
    needs = frozenset({"reference"})
    batch_kind = "lists"
    accuracy_metric = "ranking/accuracy"

    @dataclass
    class Params(ObjectiveParams):
        name: str = "lipo"
        beta: float = 0.1          # DPO's customary default (an untuned starting point)
        weights: str = "lambda"    # "lambda" (LiPO-lambda) | "unit" (pairwise logistic)

        def __post_init__(self):
            self.validate()

        def validate(self) -> None:
            if not self.beta > 0:
                raise ConfigError(f"objective.beta must be > 0, got {self.beta}")
            if self.weights not in ("lambda", "unit"):
                raise ConfigError(
                    f"objective.weights must be 'lambda' or 'unit', got {self.weights!r}")

    def loss(self, policy: PolicyOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        p = self.params
        pol, ref, scores, mask = list_inputs(policy, batch)
        losses = lipo_lambda_loss(pol, ref, scores, beta=p.beta, mask=mask, weights=p.weights)
        s = implicit_rewards(pol, ref, beta=p.beta, mask=mask)
        return LossOut(loss=losses.mean(), metrics=list_metrics(s, scores, mask))
