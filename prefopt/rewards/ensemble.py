"""Reward-model ensembles against reward over-optimisation (Coste et al. 2023, "Reward Model Ensembles
Help Mitigate Overoptimization", arXiv 2310.02743): the mean, the worst case ``min_i R_i`` (WCO) and
the uncertainty-weighted mean ``mean_i R_i - lambda * Var_i R_i`` (UWO) of M reward models' scores.

Also the preference strength of a pair from an ensemble (Secrets of RLHF in Large Language Models
Part II, Wang et al. 2024, arXiv 2401.06080): the mean and standard deviation over members of
``r_c - r_r``.
"""
from __future__ import annotations

import torch

AGGREGATES = ("mean", "min", "uwo")


def _check_scores(scores: torch.Tensor, name: str = "scores") -> None:
    if scores.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [M, N] tensor (M members, N samples), got shape "
                         f"{tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError(f"{name} has no ensemble members (M == 0)")


def aggregate(scores: torch.Tensor, mode: str, *, uwo_coef: float = 0.0) -> torch.Tensor:
    """Combine an ensemble's scores ``[M, N]`` (M members, N samples) into one score per sample ``[N]``.

    Args:
        scores: ``[M, N]`` reward of each member for each sample.
        mode: ``"mean"`` (mean over members), ``"min"`` (worst case, WCO) or ``"uwo"``
            (mean minus ``uwo_coef`` times the population variance over members, ddof 0).
        uwo_coef: lambda, the weight of the variance in ``"uwo"`` (>= 0; ignored by the other modes).

    Raises:
        ValueError: an unknown mode, a tensor that is not 2-D, no members, or a negative ``uwo_coef``.
    """
    if mode not in AGGREGATES:
        raise ValueError(f"unknown ensemble aggregate {mode!r}; valid: {', '.join(AGGREGATES)}")
    if uwo_coef < 0:
        raise ValueError(f"uwo_coef must be >= 0, got {uwo_coef}")
    _check_scores(scores)
    if mode == "mean":
        return scores.mean(0)
    if mode == "min":
        return scores.min(0).values
    return scores.mean(0) - uwo_coef * scores.var(0, unbiased=False)


def preference_strength(chosen_scores: torch.Tensor,
                        rejected_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble preference strength of N pairs: ``(mean [N], std [N])`` over the M members of
    ``r_c - r_r`` (std with ddof 0). ``chosen_scores``/``rejected_scores`` ``[M, N]``.

    A negative mean suggests a mislabelled pair; a mean near 0 with a large std an ambiguous one.
    """
    _check_scores(chosen_scores, "chosen_scores")
    _check_scores(rejected_scores, "rejected_scores")
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores "
                         f"{tuple(rejected_scores.shape)} differ in shape")
    diff = chosen_scores - rejected_scores
    return diff.mean(0), diff.std(0, unbiased=False)
