"""Reward-model training (objectives ``reward_model``, ``reward_regression``, ``prm``) on the offline lifecycle.

The algorithm box is the preference loop's (fixed data, one optimizer step per global batch,
held-out evaluations at the start, every ``train.eval_every`` steps and at the end) with a
``*ForSequenceClassification`` model on the learners instead of a causal LM, and no reference.
The saved ``model/`` is an HF checkpoint (safetensors, tokenizer with its chat template) that
``AutoModelForSequenceClassification.from_pretrained`` and ``roles.reward.sources[].model`` load;
its ``config.json`` names the heads (``id2label``) and says how to serve it (``prefopt_reward``).
"""
from __future__ import annotations

import json
import math

from prefopt.algorithms import register_algorithm
from prefopt.algorithms.preference import PreferenceOptimization
from prefopt.rewards.scorer import METADATA_KEY

KINDS = {"reward_model": "outcome", "reward_regression": "attributes", "prm": "process"}


def with_reward_std(stats: dict) -> dict:
    """Adds ``rewards/std`` from the means of r and r^2 (a Bradley–Terry model's reward spread)."""
    if "rewards/second_moment" in stats:
        mean, second = stats["rewards/mean"], stats.pop("rewards/second_moment")
        stats["rewards/std"] = math.sqrt(max(0.0, second - mean * mean))
    return stats


@register_algorithm
class RewardModeling(PreferenceOptimization):
    name = "reward_model"

    def derived(self, stats: dict[str, float]) -> dict[str, float]:
        return with_reward_std(stats)

    def saved_model(self, model_dir) -> None:
        path = model_dir / "config.json"
        config = json.loads(path.read_text())
        meta = {"kind": KINDS[self.recipe.objective.name],
                "heads": self.objective_cls.head_labels(self.recipe)}
        if meta["kind"] == "process":
            meta["step_delimiter"] = self.recipe.data.step_delimiter
        config[METADATA_KEY] = meta
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def summary(self) -> dict:
        out = super().summary()
        out["heads"] = self.objective_cls.head_labels(self.recipe)
        return out
