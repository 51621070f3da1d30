"""Which actors a run starts: the one place that decides it is the algorithm's ``role_spec``
(:mod:`prefopt.algorithms`); the resource checks, the embedded cluster's size and the role
constructors read the :class:`RoleSpec` it returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoleSpec:
    """The actors of a run, each with the recipe key that configures it."""
    policy: object                                   # LearnerRoleConfig: the policy learner group
    reference: object | None = None                  # ReferenceRoleConfig, when reference *actors* run
    critic: object | None = None                     # CriticRoleConfig (GAE)
    rollout: object | None = None                    # RolloutRoleConfig: vLLM engines
    reward_models: list[tuple[str, object]] = field(default_factory=list)   # (recipe key, source config)
    # online with LoRA and roles.reference.placement: learner: the reference is the policy learners'
    # own model with its adapters disabled (no reference actors)
    reference_on_policy: bool = False

    def demand(self) -> list[tuple[str, int, dict[str, float]]]:
        """``(recipe key, actor count, resources per actor)`` of every actor the run starts."""
        rows = [("roles.learner", self.policy.num_actors, _need(self.policy, self.policy.resources))]
        if self.critic is not None:
            rows.append(("roles.critic", self.critic.num_actors, _need(self.critic, self.critic.resources)))
        if self.reference is not None:
            rows.append(("roles.reference", self.reference.num_actors, _need(self.reference)))
        if self.rollout is not None:
            rows.append(("roles.rollout", self.rollout.engines, _need(self.rollout, self.rollout.resources)))
        rows += [(key, 1, _need(cfg)) for key, cfg in self.reward_models]
        return rows

    def cpus(self) -> float:
        """Logical CPUs of all the actors (what an embedded local cluster must offer)."""
        return sum(count * per_actor.get("CPU", 0.0) for _, count, per_actor in self.demand())

    def uses_gpus(self) -> bool:
        return any(per_actor.get("GPU", 0.0) for _, _, per_actor in self.demand())


def _need(cfg, extra=None) -> dict[str, float]:
    out = {"CPU": float(cfg.num_cpus), "GPU": float(cfg.num_gpus), **{k: float(v) for k, v in (extra or {}).items()}}
    return {k: v for k, v in out.items() if v}
