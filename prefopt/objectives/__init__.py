"""Objectives, registered by name (``objective.name`` in a recipe).

Importing this package registers every built-in objective.
"""
from prefopt.objectives.base import (OBJECTIVES, LossOut, Objective, ObjectiveParams,
                                     PolicyOutput, register_objective)
from prefopt.objectives import (constrained_ppo, dpo, lipo, listmle, ppo, prm, reward_model,  # noqa: F401
                                reward_regression, sft, simpo)   # (registration)

__all__ = ["OBJECTIVES", "LossOut", "Objective", "ObjectiveParams", "PolicyOutput",
           "register_objective", "get_objective"]


def get_objective(name: str) -> type[Objective]:
    return OBJECTIVES.get(name)
