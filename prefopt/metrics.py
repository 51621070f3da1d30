"""Reduce per-example objective metrics over micro-batches, learners and steps.

A *summary* is a plain dict of sums and counts (picklable, cheap to send from an actor):
``{"loss": (sum, count), "<metric>": (sum, count), ...}``. Non-finite per-example values (e.g. the
ranking accuracy of a list without any ordered pair) are left out of their metric's count.
"""
from __future__ import annotations

import math

from prefopt.objectives.base import LossOut


def summarize_loss(out: LossOut, num_examples: int) -> dict[str, tuple[float, float]]:
    import torch

    summary = {"loss": (float(out.loss.detach()) * num_examples, float(num_examples))}
    for name, value in out.metrics.items():
        value = value.detach().double().reshape(-1)
        finite = torch.isfinite(value)
        if value.numel() == 1 and num_examples > 1:        # a scalar metric: weight like the loss
            summary[name] = (float(value[0]) * num_examples, float(num_examples)) if finite.all() else (0.0, 0.0)
        else:
            summary[name] = (float(value[finite].sum()), float(finite.sum()))
    return summary


def merge_summaries(summaries: list[dict]) -> dict:
    merged: dict[str, tuple[float, float]] = {}
    for summary in summaries:
        for name, value in summary.items():
            if isinstance(value, tuple):
                s, c = merged.get(name, (0.0, 0.0))
                merged[name] = (s + value[0], c + value[1])
    return merged


def means(summary: dict) -> dict[str, float]:
    """{"name": sum / count} for every (sum, count) entry of a merged summary."""
    return {name: (v[0] / v[1] if v[1] else math.nan) for name, v in summary.items() if isinstance(v, tuple)}
