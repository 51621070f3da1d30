"""Supervised fine-tuning (objective ``sft``) on the offline lifecycle.

The algorithm box: for each global batch of ``{prompt, response}`` examples, every learner takes
its shard and accumulates the gradient of the response tokens' negative log-likelihood
(:func:`prefopt.objectives.sft.sft_loss`) over its micro-batches; DeepSpeed all-reduces and steps.
The held-out loss (and its perplexity) is measured at the start, every ``train.eval_every`` steps
and at the end. The saved model (``model/``) is what a preference or RL stage starts from.
"""
from __future__ import annotations

import math

from prefopt.algorithms import register_algorithm
from prefopt.algorithms.preference import PreferenceOptimization


@register_algorithm
class SFT(PreferenceOptimization):
    """The preference loop's machinery (fixed data, optimizer steps, held-out evaluations) with the
    SFT objective: no reference pass, perplexity in the summary."""
    name = "sft"

    def postfix(self, stats: dict) -> dict[str, str]:
        return {"loss": f"{stats['loss']:.4f}"}

    def summary(self) -> dict:
        out = super().summary()
        first, last = self.run.result.eval_history[0], self.run.result.eval_history[-1]
        out.update(eval_loss_start=first["loss"], eval_perplexity_start=math.exp(first["loss"]),
                   eval_perplexity_final=math.exp(last["loss"]))
        for key in ("accuracy_metric", "eval_accuracy_start", "eval_accuracy_final"):
            out.pop(key)
        return out
