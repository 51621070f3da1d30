"""PPO for RLHF (token level), with a pluggable advantage estimator (gae | grpo | rloo).

The pure losses live in :mod:`prefopt.rl.ppo`; this thin class adapts a rollout micro-batch to
them. The loop (``loops/online.py``) fills each sample's ``old_logps`` (recomputed by the
learner before the update), ``ref_logps``, ``advantages`` and, with a critic, ``values`` /
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
    advantage: str = "grpo"             # gae (needs roles.critic) | grpo | rloo
    gamma: float = 1.0                  # GAE discount
    lam: float = 0.95                   # GAE lambda
    clip_eps: float = 0.2               # policy ratio clip
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
    def check_recipe(recipe) -> None:
        PPO.check_old_logprobs(recipe)
        for i, src in enumerate(recipe.roles.reward.sources if recipe.roles.reward else []):
            if src.constraint is not None:
                raise ConfigError(f"roles.reward.sources[{i}].constraint needs objective.name: constrained_ppo "
                                  f"(objective '{recipe.objective.name}' combines sources with fixed weights)")

    def loss(self, policy: PolicyOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        from prefopt.rl.advantages import masked_mean
        from prefopt.rl.ppo import kl_penalty, policy_loss

        p = self.params
        mask = policy.token_mask
        dtype = policy.token_logps.dtype
        loss, metrics = policy_loss(policy.token_logps, batch["old_logps"].to(dtype),
                                    batch["advantages"].to(dtype), mask, clip_eps=p.clip_eps)
        if p.kl_coef > 0 and not p.kl_in_reward:
            kl = masked_mean(kl_penalty(policy.token_logps, batch["ref_logps"].to(dtype), kind="k3"), mask)
            loss = loss + p.kl_coef * kl
            metrics["kl_loss"] = kl.detach()
        if policy.entropy is not None:
            entropy = masked_mean(policy.entropy, mask)
            if p.entropy_coef > 0:
                loss = loss - p.entropy_coef * entropy   # entropy bonus
            metrics["entropy"] = entropy.detach()
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
