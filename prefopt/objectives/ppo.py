"""PPO for RLHF (token level), with a pluggable advantage estimator (gae | grpo | dr_grpo | rloo).

The pure losses live in :mod:`prefopt.rl.ppo`; this thin class adapts a rollout micro-batch to
them (``clip_eps_high``, ``loss_agg``, ``ratio_level``: the loss options of DAPO, GRPO, Dr. GRPO
and GSPO; ``overlong_buffer``: DAPO's overlong penalty, which ``loops.online.score`` adds to the
sequence reward). The loop (``loops/online.py``) fills each sample's ``old_logps`` (recomputed by
the learner before the update), ``ref_logps``, ``advantages`` and, with a critic, ``values`` /
``returns``; :class:`ValueObjective` trains the critic on the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from prefopt.errors import ConfigError
from prefopt.objectives.base import (LossOut, Objective, ObjectiveParams, PolicyOutput, ValueOutput,
                                     register_objective)


@dataclass
class PPOParams(ObjectiveParams):
    name: str = "ppo"
    advantage: str = "grpo"             # gae (needs roles.critic) | grpo | dr_grpo (no std division) | rloo
    gamma: float = 1.0                  # GAE discount
    lam: float = 0.95                   # GAE lambda
    clip_eps: float = 0.2               # policy ratio clip: [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: Optional[float] = None   # DAPO's decoupled upper clip (e.g. 0.28); None: clip_eps
    loss_agg: str = "token_mean"        # token_mean (DAPO) | sequence_mean (GRPO) | constant (Dr. GRPO):
                                        # policy loss, KL loss term and entropy bonus (rl.ppo.aggregate)
    norm_tokens: Optional[int] = None   # constant's divisor per sequence; None: roles.rollout.sampling.max_tokens
    ratio_level: str = "token"          # token | sequence (GSPO: (pi/pi_old)^(1/|y|) per sequence)
    overlong_buffer: Optional[int] = None   # DAPO's soft overlong penalty: L_cache (None: off)
    overlong_penalty: float = 1.0       # its scale: the penalty falls linearly to -overlong_penalty at L_max
    overlong_max_tokens: Optional[int] = None   # its L_max; None: roles.rollout.sampling.max_tokens
    value_clip_eps: Optional[float] = 0.2
    kl_coef: float = 0.05               # KL(policy || reference) coefficient (0: no reference needed)
    kl_estimator: str = "k1"            # k1 | k2 | k3 | abs
    kl_in_reward: bool = True           # per-token penalty in the reward (PPO) or a loss term (GRPO)
    entropy_coef: float = 0.0           # > 0: entropy bonus in the policy loss
    log_entropy: bool = True            # compute and log policy/entropy (an extra [N, T, V] softmax)
    whiten_advantages: bool = True
    reward_clip: Optional[list[float]] = None   # [low, high] on the sequence reward
    normalize_rewards: bool = False     # running mean/std normalisation of the sequence reward
    ppo_epochs: int = 1                 # passes over each iteration's rollouts
    temperature: float = 1.0            # must match the rollout sampling temperature
    old_logprobs: str = "learner"       # PPO's "old" log-probs: "learner" recomputes them before the
                                        # update; "rollout" takes the engines' sampled-token log-probs
                                        # (the behaviour policy; no learner pass; needs sampling.logprobs)

    def validate(self) -> None:
        from prefopt.rl.advantages import ADVANTAGES
        if self.advantage not in ADVANTAGES:
            ADVANTAGES.get(self.advantage)  # raises with a suggestion
        if self.clip_eps <= 0:
            raise ConfigError(f"objective.clip_eps must be > 0, got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ConfigError(f"objective.clip_eps_high must be > 0 (or null: clip_eps), got {self.clip_eps_high}")
        self.validate_loss_options()
        if self.kl_coef < 0:
            raise ConfigError(f"objective.kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in ("k1", "k2", "k3", "abs"):
            raise ConfigError(f"objective.kl_estimator must be one of k1, k2, k3, abs, got '{self.kl_estimator}'")
        if self.reward_clip is not None and (len(self.reward_clip) != 2 or self.reward_clip[0] >= self.reward_clip[1]):
            raise ConfigError(f"objective.reward_clip must be [low, high] with low < high, got {self.reward_clip}")
        if self.old_logprobs not in ("learner", "rollout"):
            raise ConfigError(f"objective.old_logprobs must be 'learner' or 'rollout', got '{self.old_logprobs}'")
        if self.old_logprobs == "rollout" and self.temperature != 1.0:
            raise ConfigError("objective.old_logprobs: rollout needs objective.temperature: 1.0 (the engines "
                              "return log-probs of the unscaled distribution)")
        if self.ppo_epochs < 1:
            raise ConfigError(f"objective.ppo_epochs must be >= 1, got {self.ppo_epochs}")

    def validate_loss_options(self) -> None:
        """The GRPO family's options: aggregation, ratio level, DAPO's overlong penalty."""
        from prefopt.rl.ppo import LOSS_AGGREGATIONS, RATIO_LEVELS
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ConfigError(f"objective.loss_agg must be one of {', '.join(LOSS_AGGREGATIONS)}, "
                              f"got '{self.loss_agg}'")
        if self.norm_tokens is not None:
            if self.loss_agg != "constant":
                raise ConfigError(f"objective.norm_tokens is only used with objective.loss_agg: constant "
                                  f"(loss_agg is '{self.loss_agg}')")
            if self.norm_tokens < 1:
                raise ConfigError(f"objective.norm_tokens must be >= 1, got {self.norm_tokens}")
        if self.ratio_level not in RATIO_LEVELS:
            raise ConfigError(f"objective.ratio_level must be one of {', '.join(RATIO_LEVELS)}, "
                              f"got '{self.ratio_level}'")
        if self.overlong_buffer is None:
            if self.overlong_max_tokens is not None:
                raise ConfigError("objective.overlong_max_tokens is only used with objective.overlong_buffer")
            return
        if self.overlong_buffer < 1:
            raise ConfigError(f"objective.overlong_buffer must be >= 1 (or null: no penalty), "
                              f"got {self.overlong_buffer}")
        if self.overlong_penalty <= 0:
            raise ConfigError(f"objective.overlong_penalty must be > 0, got {self.overlong_penalty}")
        if self.overlong_max_tokens is not None and self.overlong_max_tokens < self.overlong_buffer:
            raise ConfigError(f"objective.overlong_max_tokens ({self.overlong_max_tokens}) must be >= "
                              f"objective.overlong_buffer ({self.overlong_buffer})")


@register_objective
class PPO(Objective):
    name = "ppo"
    Params = PPOParams
    needs = frozenset({"rollout", "reward"})
    batch_kind = "rollouts"
    algorithm = "ppo"
    accuracy_metric = "reward/mean"

    @property
    def temperature(self) -> float:
        return self.params.temperature

    @property
    def wants_entropy(self) -> bool:
        return self.params.entropy_coef > 0 or self.params.log_entropy

    @classmethod
    def required_roles(cls, params: PPOParams) -> set[str]:
        roles = {"rollout", "reward"}
        if params.advantage == "gae":
            roles.add("critic")
        if params.kl_coef > 0:
            roles.add("reference")
        return roles

    @staticmethod
    def check_old_logprobs(recipe) -> None:
        rollout = recipe.roles.rollout
        if recipe.objective.old_logprobs == "rollout" and rollout is not None and not rollout.sampling.logprobs:
            raise ConfigError("objective.old_logprobs: rollout needs roles.rollout.sampling.logprobs: true")

    @staticmethod
    def check_lengths(recipe) -> None:
        """The length options against ``roles.rollout.sampling.max_tokens``, their default (resolved
        where they are used, :meth:`from_recipe` and ``loops.online.score``, so a saved config.yaml
        rerun with another ``max_tokens`` follows it): the overlong buffer must fit in L_max."""
        p, rollout = recipe.objective, recipe.roles.rollout
        max_tokens = rollout.sampling.max_tokens if rollout is not None else None
        if p.loss_agg == "constant" and p.norm_tokens is None and max_tokens is None:
            raise ConfigError("objective.norm_tokens is required with objective.loss_agg: constant "
                              "(no roles.rollout.sampling.max_tokens to default to)")
        if p.overlong_buffer is not None and p.overlong_max_tokens is None:
            if max_tokens is None:
                raise ConfigError("objective.overlong_max_tokens is required with objective.overlong_buffer "
                                  "(no roles.rollout.sampling.max_tokens to default to)")
            if p.overlong_buffer > max_tokens:
                raise ConfigError(f"objective.overlong_buffer ({p.overlong_buffer}) must be <= "
                                  f"roles.rollout.sampling.max_tokens ({max_tokens}), its L_max")

    @classmethod
    def from_recipe(cls, recipe):
        """The objective with ``norm_tokens`` (``loss_agg: constant``) defaulting to the rollout's
        ``max_tokens``, on a copy of the recipe's parameters."""
        import dataclasses
        p, rollout = recipe.objective, recipe.roles.rollout
        if p.loss_agg == "constant" and p.norm_tokens is None and rollout is not None:
            p = dataclasses.replace(p, norm_tokens=rollout.sampling.max_tokens)
        return cls(p)

    @staticmethod
    def check_recipe(recipe) -> None:
        PPO.check_old_logprobs(recipe)
        PPO.check_lengths(recipe)
        for i, src in enumerate(recipe.roles.reward.sources if recipe.roles.reward else []):
            if src.constraint is not None:
                raise ConfigError(f"roles.reward.sources[{i}].constraint needs objective.name: constrained_ppo "
                                  f"(objective '{recipe.objective.name}' combines sources with fixed weights)")

    def loss(self, policy: PolicyOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        """Policy loss + ``kl_coef`` * k3 KL term (``kl_in_reward: false``) - ``entropy_coef`` *
        entropy, the three aggregated alike (``loss_agg``; TRL also adds its KL per token before
        aggregating, but always takes the token mean of the entropy). The ``kl_loss`` and ``entropy``
        metrics are token means whatever ``loss_agg``."""
        from prefopt.rl.advantages import masked_mean
        from prefopt.rl.ppo import aggregate, kl_penalty, policy_loss

        p = self.params
        mask = policy.token_mask
        dtype = policy.token_logps.dtype
        loss, metrics = policy_loss(policy.token_logps, batch["old_logps"].to(dtype),
                                    batch["advantages"].to(dtype), mask, clip_eps=p.clip_eps,
                                    clip_eps_high=p.clip_eps_high, loss_agg=p.loss_agg,
                                    norm_tokens=p.norm_tokens, ratio_level=p.ratio_level)
        if p.kl_coef > 0 and not p.kl_in_reward:
            kl = kl_penalty(policy.token_logps, batch["ref_logps"].to(dtype), kind="k3")
            loss = loss + p.kl_coef * aggregate(kl, mask, p.loss_agg, p.norm_tokens)
            metrics["kl_loss"] = masked_mean(kl.detach(), mask)
        if policy.entropy is not None:
            if p.entropy_coef > 0:   # entropy bonus
                loss = loss - p.entropy_coef * aggregate(policy.entropy, mask, p.loss_agg, p.norm_tokens)
            metrics["entropy"] = masked_mean(policy.entropy.detach(), mask)
        return LossOut(loss=loss, metrics={f"policy/{k}": v for k, v in metrics.items()})


class ValueObjective(Objective):
    """Critic training on PPO rollouts: clipped value loss against the GAE returns (with H heads,
    ``[N, T, H]``: the mean over heads and tokens)."""
    name = "value"
    batch_kind = "rollouts"

    def loss(self, critic: ValueOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        from prefopt.rl.ppo import value_loss

        values, mask = critic.values, critic.token_mask
        if values.ndim == 3:
            mask = mask.unsqueeze(-1).expand_as(values)
        loss, metrics = value_loss(values, batch["values"].to(values.dtype), batch["returns"].to(values.dtype),
                                   mask, clip_eps=self.params.value_clip_eps)
        return LossOut(loss=loss, metrics={f"critic/{k}": v for k, v in metrics.items()})
