"""Training algorithms on the shared run lifecycle (:mod:`prefopt.run`), registered by name.

An objective names the algorithm that trains it (``Objective.algorithm``): ``preference`` (offline
DPO family, LiPO, ListMLE), ``ppo`` (online RL: PPO / GRPO / RLOO), ``constrained_ppo`` (PPO with
Lagrange multipliers; NM-PPO), ``sft``, ``reward_model`` (reward models: Bradley–Terry,
attribute regression, process reward models). Modules import their heavy dependencies inside functions.
"""
from __future__ import annotations

from prefopt.registry import Registry

ALGORITHMS: Registry = Registry("algorithm")


def register_algorithm(cls):
    """Class decorator: registers an :class:`prefopt.run.Algorithm` under ``cls.name``."""
    return ALGORITHMS.register(cls.name)(cls)


def algorithm_for(recipe):
    """The algorithm class that trains ``recipe.objective``."""
    from prefopt.algorithms import constrained, ppo, preference, reward_model, sft  # noqa: F401  (registration)
    from prefopt.objectives import get_objective
    return ALGORITHMS.get(get_objective(recipe.objective.name).algorithm)


def role_spec(recipe):
    """The actors a run of ``recipe`` starts (its algorithm's :meth:`~prefopt.run.Algorithm.role_spec`)."""
    return algorithm_for(recipe).role_spec(recipe)
