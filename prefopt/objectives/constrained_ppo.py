"""Constrained PPO (mu-PPO / xi-PPO / NM-PPO; Moskovitz et al. 2023, arXiv 2310.04373).

Reward sources that carry ``constraint: ge|eq`` and a ``threshold`` are *components*: instead of a
fixed weight, each gets a Lagrange multiplier (``prefopt.rl.lagrange``) that is updated
every iteration from its batch-mean return, and its own critic head / advantage. The remaining
sources (weighted sum) plus the KL penalty form the task term. The policy step is the PPO step of
:class:`~prefopt.objectives.ppo.PPO` on the combined advantage
``A = (N - sum_i lambda_i) * A_task + sum_i lambda_i * A_i``; the loop side is
``prefopt.loops.constrained``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from prefopt.errors import ConfigError
from prefopt.objectives.base import register_objective
from prefopt.objectives.ppo import PPO, PPOParams


def constrained_sources(recipe) -> list[tuple[str, object]]:
    """``(metric name, source config)`` of every reward source that carries a constraint."""
    from prefopt.rewards.sources import source_name
    sources = recipe.roles.reward.sources if recipe.roles.reward else []
    return [(source_name(i, s), s) for i, s in enumerate(sources) if s.constraint]


def value_heads(recipe) -> int:
    """Critic outputs: one per reward channel under constrained PPO, else one."""
    if recipe.objective.name != "constrained_ppo":
        return 1
    return 1 + len(constrained_sources(recipe))


@dataclass
class NelderMeadConfig:
    """NM-PPO: a Nelder-Mead search over the threshold vector within one run."""
    eval_fn: str = ""                      # "package.module:function" (prompt, response, row) -> score
    iterations_per_eval: int = 5           # training iterations per evaluated threshold vector; the search
                                           # runs train.iterations // iterations_per_eval evaluations
    eval_prompts: int = 32                 # prompts scored per evaluation (greedy responses)
    initial_step: float = 0.25             # simplex size, as a fraction of each threshold (or absolute if 0)


@dataclass
class ConstrainedPPOParams(PPOParams):
    name: str = "constrained_ppo"
    multiplier_lr: float = 0.1              # SGD on the multipliers (public code: lr 0.1, momentum 0.1)
    multiplier_momentum: float = 0.1
    multiplier_max_grad_norm: Optional[float] = None
    multiplier_kp: float = 0.0              # PID-Lagrangian gains (Stooke et al. 2020), in raw units per unit
    multiplier_kd: float = 0.0              # of J_i - theta_i; 0 = the paper's gradient step only
    nelder_mead: Optional[NelderMeadConfig] = None

    def validate(self) -> None:
        super().validate()
        if self.multiplier_lr <= 0:
            raise ConfigError(f"objective.multiplier_lr must be > 0, got {self.multiplier_lr}")
        if not 0 <= self.multiplier_momentum < 1:
            raise ConfigError(f"objective.multiplier_momentum must be in [0, 1), got {self.multiplier_momentum}")
        if self.multiplier_kp < 0 or self.multiplier_kd < 0:
            raise ConfigError("objective.multiplier_kp and objective.multiplier_kd must be >= 0")
        nm = self.nelder_mead
        if nm is not None:
            if not nm.eval_fn:
                raise ConfigError("objective.nelder_mead.eval_fn must name a 'package.module:function'")
            if nm.iterations_per_eval < 1 or nm.eval_prompts < 1:
                raise ConfigError("objective.nelder_mead needs iterations_per_eval >= 1 and eval_prompts >= 1")


@register_objective
class ConstrainedPPO(PPO):
    name = "constrained_ppo"
    algorithm = "constrained_ppo"
    Params = ConstrainedPPOParams

    @staticmethod
    def check_recipe(recipe) -> None:
        """At least one constrained reward source, each with a kind and a threshold; PPO's checks
        and length checks (the GRPO family's options apply to the combined-advantage step)."""
        PPO.check_old_logprobs(recipe)
        PPO.check_lengths(recipe)
        if recipe.train.dynamic_sampling:
            raise ConfigError("train.dynamic_sampling keeps only the groups whose rewards differ, which biases the "
                              "batch-mean constraint values the Lagrange multipliers step on: not with "
                              "objective.name: constrained_ppo")
        sources = recipe.roles.reward.sources if recipe.roles.reward else []
        constrained = 0
        for i, src in enumerate(sources):
            key = f"roles.reward.sources[{i}]"
            if src.constraint is None:
                if src.threshold is not None or src.multiplier_init is not None:
                    raise ConfigError(f"{key} has a threshold/multiplier_init but no 'constraint: ge|eq'")
                continue
            if src.constraint not in ("ge", "eq"):
                raise ConfigError(f"{key}.constraint must be 'ge' (J >= threshold) or 'eq' (J = threshold), "
                                  f"got '{src.constraint}'")
            if src.threshold is None:
                raise ConfigError(f"{key}.threshold is required with constraint '{src.constraint}'")
            constrained += 1
        if constrained == 0:
            raise ConfigError("objective 'constrained_ppo' needs at least one reward source with "
                              "'constraint: ge|eq' and a 'threshold'")
        if recipe.objective.nelder_mead is not None:
            from prefopt.rewards.sources import import_reward_fn
            import_reward_fn(recipe.objective.nelder_mead.eval_fn)
