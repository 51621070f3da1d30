"""Training algorithms on the shared run lifecycle (:mod:`prefopt.run`), registered by name.

An objective names the algorithm that trains it (``Objective.algorithm``): ``preference`` (offline
DPO family, LiPO, ListMLE; with ``roles.rollout`` in the recipe, ``online_preference``: the same
objectives on pairs or lists the policy samples each iteration), ``ppo`` (online RL: PPO / GRPO / RLOO), ``constrained_ppo`` (PPO with
Lagrange multipliers; NM-PPO), ``sft``, ``reward_model`` (reward models: Bradley–Terry,
attribute regression, process reward models). Modules import their heavy dependencies inside functions.
"""
from __future__ import annotations

from prefopt.registry import Registry

ALGORITHMS: Registry = Registry("algorithm")


def register_algorithm(cls):
    """Class decorator: registers an :class:`prefopt.run.Algorithm` under ``cls.name``."""
    return ALGORITHMS.register(cls.name)(cls)


def algorithm_name(recipe) -> str:
    """The name of the algorithm that trains ``recipe``: the objective's, except that a policy
    preference objective (DPO, IPO, SimPO, LiPO-λ, ListMLE) in a recipe with ``roles.rollout``
    trains online, on responses the policy samples (``online_preference``)."""
    from prefopt.objectives import get_objective
    objective = get_objective(recipe.objective.name)
    if objective.algorithm == "preference" and objective.model_kind == "policy" and recipe.roles.rollout is not None:
        return "online_preference"
    return objective.algorithm


def algorithm_for(recipe):
    """The algorithm class that trains ``recipe``."""
    from prefopt.algorithms import (constrained, online_preference, ppo, preference,  # noqa: F401  (registration)
                                    reward_model, sft)
    return ALGORITHMS.get(algorithm_name(recipe))


def role_spec(recipe):
    """The actors a run of ``recipe`` starts (its algorithm's :meth:`~prefopt.run.Algorithm.role_spec`)."""
    return algorithm_for(recipe).role_spec(recipe)
