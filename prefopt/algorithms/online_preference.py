"""Online preference optimization: DPO, IPO, SimPO, LiPO-λ or ListMLE on responses the policy samples.

Online / iterative DPO (Guo et al. 2024, arXiv 2402.04792; Xiong et al. 2024, arXiv 2312.11456): the
offline objectives, but each iteration's preference data come from the current policy, ranked by the
reward sources. The algorithm box, one iteration (:meth:`OnlinePreference.step`):

1. generate: ``train.prompts_per_iteration`` prompts, ``sampling.n`` responses each (vLLM engines);
2. score: the reward sources rank each prompt's responses;
3. data: per prompt, the best and the worst response form a pair (pairs objectives: dpo, ipo, simpo)
   or all ``n`` form a list graded by the rank of their rewards (lists objectives: lipo, listmle); a prompt whose
   rewards differ by no more than ``train.min_reward_gap`` (all tie) gives nothing and is counted,
   and with ``train.dynamic_sampling`` more prompts are sampled in its place;
4. reference: the reference actors' summed log-probs of every response (objectives that need them);
5. learn: optimizer steps over seeded batches of ``train.batch_size`` pairs or lists
   (``loops.online.learn``, one pass; what does not fill a batch is left out and counted);
6. sync: the new policy weights stream to every engine.

With ``train.async_rollouts`` the next iteration's generation starts before step 5 (one-step off-policy).
"""
from __future__ import annotations

from prefopt.algorithms import register_algorithm
from prefopt.algorithms.ppo import PPO, eval_summary, reference_on_policy
from prefopt.data import batching
from prefopt.errors import ConfigError
from prefopt.roles.spec import RoleSpec


@register_algorithm
class OnlinePreference(PPO):
    name = "online_preference"
    pipelines_reference = False     # its reference pass is of summed log-probs, after the pairs are built

    def __init__(self, run):
        super().__init__(run)
        self.objective_cls = run.pre.objective_cls

    @classmethod
    def check_recipe(cls, recipe) -> None:
        r, t = recipe.roles, recipe.train
        name = recipe.objective.name
        if r.reward is None or not r.reward.sources:
            raise ConfigError(f"roles.reward: online {name} ranks the policy's samples with reward sources; "
                              f"set roles.reward.sources")
        if r.reward.process is not None:
            raise ConfigError(f"roles.reward.process: online {name} ranks whole responses; process rewards "
                              f"need objective.name: ppo")
        if r.rollout.sampling.n < 2:
            raise ConfigError(f"roles.rollout.sampling.n must be >= 2 for online {name} (it compares a "
                              f"prompt's samples), got {r.rollout.sampling.n}")
        from prefopt.objectives import get_objective
        needs_reference = "reference" in get_objective(name).needs
        if needs_reference and r.reference is not None and r.reference.placement != "actor" \
                and recipe.model.lora is None:
            raise ConfigError(f"roles.reference.placement: online {name} takes reference log-probs of new samples "
                              f"every iteration, from reference actors (roles.reference.placement: actor) or, "
                              f"with model.lora, from the policy learners with their adapters disabled")
        if t.prompts_per_iteration < t.batch_size:
            raise ConfigError(f"train.prompts_per_iteration ({t.prompts_per_iteration}) gives at most that many "
                              f"pairs or lists per iteration: it must be >= train.batch_size ({t.batch_size})")

    @classmethod
    def role_spec(cls, recipe) -> RoleSpec:
        """Policy learners, vLLM engines, reference actors (objectives that need a reference) and an
        actor per reward model."""
        from prefopt.objectives import get_objective
        r = recipe.roles
        needs_reference = "reference" in get_objective(recipe.objective.name).needs
        on_policy = needs_reference and reference_on_policy(recipe)
        models = [(f"roles.reward.sources[{i}]", s) for i, s in enumerate(r.reward.sources) if not s.fn]
        return RoleSpec(policy=r.learner, rollout=r.rollout, reward_models=models, reference_on_policy=on_policy,
                        reference=r.reference if needs_reference and not on_policy else None)

    def setup(self) -> list[dict]:
        t = self.recipe.train
        return self.roles.setup(self.recipe, total_steps=t.iterations * (t.prompts_per_iteration // t.batch_size),
                                pad_id=self.run.tokenizer.pad_token_id)

    def score(self, samples: list) -> dict[str, float]:
        """Raw rewards (no clipping or normalisation: only their order within a prompt matters)."""
        from prefopt.loops.online import score
        return score(samples, self.run.tokenizer, self.rewards, None, None, self.normalizer)

    def step(self, it: int, *, next_follows: bool) -> tuple[dict[str, float], int]:
        from prefopt.loops.groups import groups_of, preference_examples
        from prefopt.loops.online import Timer, learn
        from prefopt.rewards.sources import NonFiniteReward
        r, t = self.recipe, self.recipe.train
        timings = {}
        try:
            samples, stats = self.sample(it, timings)                                 # 1-2. generate, score
        except NonFiniteReward as e:
            return self.non_finite_reward(it, e, timings), 0
        groups = groups_of(samples, r.roles.rollout.sampling.n)
        examples = preference_examples(groups, self.objective_cls.batch_kind, t.min_reward_gap)   # 3. data
        tied = len(groups) - len(examples) + stats.get("sampling/dropped_groups", 0)   # dynamic sampling dropped some
        stats.update({"data/examples": len(examples), "data/tied_groups": tied,
                      "data/dropped_examples": len(examples) % t.batch_size})
        steps = 0
        if len(examples) >= t.batch_size:
            if "reference" in self.objective_cls.needs:                               # 4. reference
                with Timer(timings, "reference"):
                    self.reference_logps(examples)
            with Timer(timings, "learn"):                                             # 5. learn
                learn_stats, steps = learn(examples, self.roles, r, it, self.guard, epochs=1)
            stats.update(learn_stats)
        timings["sync"] = self.roles.sync_weights(version=it, wait=self.prefetch is None)   # 6. sync
        stats["rollout/engine_restarts"] = self.roles.engines.restarts
        self.observe(it, samples)
        if samples:
            stats["response_length"] = sum(len(s.response_ids) for s in samples) / len(samples)
        stats.update({f"time/{k}": v for k, v in timings.items()})
        return stats, steps

    def reference_logps(self, examples: list) -> None:
        """Each example's summed reference log-probs (one per response), from the reference actors or
        (LoRA) the policy learners with their adapters disabled."""
        from prefopt.roles.group import run_sharded
        micro = batching.inference_micro(self.recipe)
        if self.roles.reference_on_policy:
            per_micro = self.roles.policy.infer("compute_reference_logps", examples, micro)
        else:
            per_micro = run_sharded(self.roles.references, "compute_logps", examples, micro, self.roles.timeout)
        for ex, logps in zip(examples, [x for micro in per_micro for x in micro]):
            ex.ref_logps = logps

    def postfix(self, stats: dict) -> dict[str, str]:
        return {"reward": f"{stats['reward/mean']:.3f}", "loss": f"{stats.get('loss', float('nan')):.4f}"}

    def summary(self) -> dict:
        result, t = self.run.result, self.recipe.train
        history = result.train_history
        out = {"iterations": t.iterations, "steps": result.steps,
               "reward_first": history[0]["reward/mean"], "reward_final": result.final_train["reward/mean"],
               "tied_groups": sum(h.get("data/tied_groups", 0) for h in history),
               "examples": result.steps * t.batch_size}
        from prefopt.run import trends
        out.update(trends(history, {"response_length": "response_length", "loss": "loss"}))
        components = {f"reward_{s.name}": f"reward/{s.name}" for s in self.recipe.roles.reward.sources if s.name}
        out.update(trends(history, components))
        out.update(eval_summary(result.eval_history))
        return out
