"""Reward sources of the online loop: Python functions named in the recipe, combined with weights.

``roles.reward.sources: [{fn: "mypkg.rewards:exact_match", weight: 1.0}, ...]``. A function is
imported only from the module the recipe names (no plugin scanning) and is called as
``fn(prompt=..., response=..., row=...)`` with the prompt text, the decoded response and the prompt
row's fields; it returns a float.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from prefopt.config_schema import RewardRoleConfig
from prefopt.errors import ConfigError


def import_reward_fn(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (ConfigError naming what is missing)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward fn '{spec}' must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward fn '{spec}': cannot import module '{module_name}': {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward fn '{spec}': module '{module_name}' has no function '{attr}'")
    return fn


class SequenceRewards:
    """The weighted sum of the recipe's reward sources, per sample, with each component kept."""

    def __init__(self, cfg: RewardRoleConfig):
        if not cfg.sources:
            raise ConfigError("roles.reward.sources is empty: name at least one reward source")
        self.sources = []
        for i, src in enumerate(cfg.sources):
            if not src.fn:
                raise ConfigError(f"roles.reward.sources[{i}] needs 'fn' (a 'package.module:function')")
            name = src.name or src.fn.rpartition(":")[2]
            self.sources.append((name, import_reward_fn(src.fn), float(src.weight)))

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict]):
        totals = [0.0] * len(responses)
        components: dict[str, list[float]] = {}
        for name, fn, weight in self.sources:
            values = []
            for i, (p, r, row) in enumerate(zip(prompts, responses, rows)):
                v = float(fn(prompt=p, response=r, row=row))
                if not math.isfinite(v):
                    raise ValueError(f"reward '{name}' returned {v} for sample {i}")
                values.append(v)
                totals[i] += weight * v
            components[name] = values
        return totals, components
