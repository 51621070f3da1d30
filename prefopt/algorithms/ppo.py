"""Online RL: PPO with GAE, GRPO or RLOO advantages, vLLM rollouts and a KL penalty.

The algorithm box, one iteration (:meth:`PPO.step`; the stages live in :mod:`prefopt.loops.online`):

1. generate: ``train.prompts_per_iteration`` prompts, ``sampling.n`` responses each (vLLM engines);
2. score: the reward sources (weighted sum; clip / normalise) and process rewards per step;
3. annotate: reference log-probs (KL), the policy's old log-probs, the critic's values (GAE);
4. advantages: token rewards = sequence reward at the last token + process rewards − kl_coef·KL,
   then the registered estimator (gae | grpo | dr_grpo | rloo), whitened;
5. learn: ``ppo_epochs`` passes of optimizer steps over mini-batches (policy and critic);
6. sync: the new policy weights stream to every engine.

With ``train.async_rollouts`` the next iteration's generation starts before step 5 (one-step
off-policy). Constrained PPO (:mod:`prefopt.algorithms.constrained`) overrides the advantage and
after-update hooks.
"""
from __future__ import annotations

import math

from prefopt.algorithms import register_algorithm
from prefopt.data import batching
from prefopt.roles.spec import RoleSpec
from prefopt.run import Algorithm, trends


@register_algorithm
class PPO(Algorithm):
    name = "ppo"
    unit = "iteration"
    reads = "prompts"

    def __init__(self, run):
        super().__init__(run)
        from prefopt.loops.online import PromptSampler
        from prefopt.rl.signals import RewardNormalizer
        t, prompts = self.recipe.train, run.pre.prompts
        self.held_out = self.held_out_prompts(prompts)
        self.eval_prompts = run.pre.eval_prompts or []      # train.eval_every: answered greedily, scored
        self.pending_ref = None
        self.min_reward_gap = t.min_reward_gap   # dynamic sampling drops groups whose reward range is not above it
        self.sampler = PromptSampler(prompts[:len(prompts) - len(self.held_out)], t.seed)
        self.normalizer = RewardNormalizer()
        self.prefetch = None

    def held_out_prompts(self, prompts: list[dict]) -> list[dict]:
        """Prompts kept out of training (NM-PPO's evaluation set)."""
        return []

    @classmethod
    def role_spec(cls, recipe) -> RoleSpec:
        """Policy learners, vLLM engines, reference actors when the KL coefficient is positive, a critic
        group with GAE, and an actor per reward model (sequence sources and a process reward model)."""
        from prefopt.objectives import get_objective
        r = recipe.roles
        needed = get_objective(recipe.objective.name).required_roles(recipe.objective)   # the objective says
        models = [(f"roles.reward.sources[{i}]", s) for i, s in enumerate(r.reward.sources) if not s.fn]
        if r.reward.process is not None and r.reward.process.model:
            models.append(("roles.reward.process", r.reward.process))
        on_policy = "reference" in needed and reference_on_policy(recipe)
        return RoleSpec(policy=r.learner, rollout=r.rollout, reward_models=models,
                        reference=r.reference if "reference" in needed and not on_policy else None,
                        reference_on_policy=on_policy, critic=r.critic if "critic" in needed else None)

    def build_roles(self):
        from prefopt.rewards.sources import SequenceRewards
        from prefopt.roles.online import OnlineRoles
        r, tokenizer = self.recipe, self.run.tokenizer
        roles = OnlineRoles(r, tokenizer.pad_token_id, self.run.spec)
        self.rewards = SequenceRewards(r.roles.reward, roles.reward_models, timeout_s=roles.timeout,
                                       prompt_field=r.data.prompt_field)
        self.process_rewards = None
        if r.roles.reward.process is not None:
            from prefopt.rewards.process_source import ProcessRewards
            self.process_rewards = ProcessRewards(r.roles.reward.process, tokenizer, roles.process_model,
                                                  timeout_s=roles.timeout, prompt_field=r.data.prompt_field)
        if r.train.async_rollouts:
            from prefopt.loops.prefetch import Prefetch
            self.prefetch = Prefetch(roles)
        return roles

    def setup(self) -> list[dict]:
        r, t = self.recipe, self.recipe.train
        per_iteration = t.prompts_per_iteration * r.roles.rollout.sampling.n // t.batch_size * r.objective.ppo_epochs
        return self.roles.setup(r, total_steps=t.iterations * per_iteration, pad_id=self.run.tokenizer.pad_token_id)

    def driver_state(self) -> dict:
        return {"sampler": self.sampler, "normalizer": self.normalizer, "prefetch": self.prefetch,
                "reward_sources": self.rewards}

    def start(self) -> None:
        """Before the first update: for log-sigmoid sources with ``reference_from: reference_samples``,
        one sample per prompt from the engines (they still hold the initial, reference weights), scored
        once: each prompt's r_ref (Wang et al. 2024). A resumed run restores them from its checkpoint.
        The held-out prompts (``train.eval_every``) are written to ``held_out_prompts.jsonl``, so that
        ``prefopt eval`` can answer exactly them."""
        if self.eval_prompts and self.run.pre.resume_from is None:
            import json
            with open(self.run.run_dir / "held_out_prompts.jsonl", "x") as f:
                f.writelines(json.dumps(p["row"], default=str) + "\n" for p in self.eval_prompts)
        if not self.rewards.needs_reference_samples() or self.run.pre.resume_from is not None:
            return
        import dataclasses

        from prefopt import console
        prompts, tokenizer = self.run.pre.prompts + self.eval_prompts, self.run.tokenizer
        console.status(f"scoring one reference-policy sample for each of {len(prompts)} prompts (r_ref)")
        sampling = dataclasses.replace(self.recipe.roles.rollout.sampling, n=1)
        generations = self.roles.generate([p["prompt_ids"] for p in prompts], sampling, seed=self.recipe.train.seed)
        texts = tokenizer.batch_decode([g[0]["response_ids"] for g in generations], skip_special_tokens=True)
        self.rewards.score_references([p["prompt_text"] for p in prompts], texts, [p["row"] for p in prompts])

    def resumed(self, resumed: bool) -> None:
        if resumed:   # the engines get the restored policy
            self.roles.sync_weights(version=len(self.run.result.train_history))
        elif self.recipe.train.eval_every:
            self.evaluate(0)

    def total_units(self) -> int:
        return self.recipe.train.iterations

    def sample(self, it: int, timings: dict) -> tuple[list, dict[str, float]]:
        """Steps 1-2: generate this iteration's samples and score them; with ``train.dynamic_sampling``,
        groups whose rewards all tie are dropped and more prompts sampled (``loops.groups.fill_groups``).
        The reward metrics describe the first generation (an unbiased sample of the prompts)."""
        from prefopt.loops.online import Timer, rollout, start_next_generation
        r, t, tokenizer = self.recipe, self.recipe.train, self.run.tokenizer
        sampling = r.roles.rollout.sampling
        with Timer(timings, "generate"):
            ready = self.prefetch.pop(it) if self.prefetch is not None else None
            prompts = ready["prompts"] if ready else self.sampler.take(t.prompts_per_iteration)
            samples, engine_s = rollout(self.roles, prompts, sampling, t.seed * 100003 + it, tokenizer.eos_token_id,
                                        ready and ready["pending"], ready and ready["generations"])
        self.pending_ref = ready and ready["pending_ref"]
        if self.prefetch is not None and it < t.iterations:   # async: the engines sample the next batch now
            start_next_generation(self.roles, self.prefetch, self.sampler, r, it + 1, tokenizer.eos_token_id,
                                  reference=self.pipelines_reference)
        with Timer(timings, "reward"):
            stats = self.score(samples)
        stats["engine_generate_s"] = engine_s
        stats["tokens_per_s"] = sum(len(s.response_ids) for s in samples) / max(engine_s, 1e-9)
        if not t.dynamic_sampling:
            return samples, stats
        from prefopt.loops.groups import fill_groups

        def sample_more(count: int, round_: int) -> list:
            more_prompts = self.sampler.take(count)
            with Timer(timings, "generate"):
                more, _ = rollout(self.roles, more_prompts, sampling, resample_seed(t.seed, it, round_),
                                  tokenizer.eos_token_id)
            with Timer(timings, "reward"):
                self.score(more)
            return more

        kept, fill = fill_groups(samples, sampling.n, want=len(prompts), max_rounds=t.max_sampling_rounds,
                                 min_gap=self.min_reward_gap, sample_more=sample_more)
        if fill["sampling/dropped_groups"]:
            self.pending_ref = None     # the pipelined reference pass was of the first batch as drawn
        return kept, {**stats, **fill}

    def score(self, samples: list) -> dict[str, float]:
        """Each sample's sequence reward (and process rewards); returns the reward metrics."""
        from prefopt.loops.online import score
        return score(samples, self.run.tokenizer, self.rewards, self.process_rewards, self.recipe.objective,
                     self.normalizer, max_tokens=self.recipe.roles.rollout.sampling.max_tokens)

    pipelines_reference = True      # async rollouts: start the reference pass of the next batch early

    def step(self, it: int, *, next_follows: bool) -> tuple[dict[str, float], int]:
        from prefopt.loops.online import Timer, annotate, learn
        from prefopt.rewards.sources import NonFiniteReward
        r, t = self.recipe, self.recipe.train
        params, micro = r.objective, batching.inference_micro(r)
        timings = {}
        try:
            samples, stats = self.sample(it, timings)                                 # 1-2. generate, score
        except NonFiniteReward as e:   # no update from this batch (counted like a skipped optimizer step)
            return self.non_finite_reward(it, e, timings), 0
        # dynamic sampling may fall short of the batch: whole groups that fill whole optimizer batches
        whole = math.lcm(r.roles.rollout.sampling.n, t.batch_size)
        usable = len(samples) // whole * whole
        if usable < len(samples):
            stats["sampling/unused_samples"] = len(samples) - usable
        samples, steps = samples[:usable], 0
        if samples:
            stats.update(annotate(samples, self.roles, micro, timings, params.old_logprobs,   # 3. annotate
                                  self.pending_ref))
            with Timer(timings, "learn"):
                stats.update(self.advantages(samples))                                # 4. advantages
                learn_stats, steps = learn(samples, self.roles, r, it, self.guard)    # 5. learn
            stats.update(learn_stats)
            stats.update(self.after_update(samples))
        # 6. sync; async rollouts: submitted, not awaited (checked by the next engine or sync call)
        timings["sync"] = self.roles.sync_weights(version=it, wait=self.prefetch is None)
        stats["rollout/engine_restarts"] = self.roles.engines.restarts
        self.observe(it, samples)
        if samples:
            stats["response_length"] = sum(len(s.response_ids) for s in samples) / len(samples)
        stats.update({f"time/{k}": v for k, v in timings.items()})
        return stats, steps

    def non_finite_reward(self, it: int, e, timings: dict) -> dict[str, float]:
        """The metrics of an iteration whose reward was not finite (no update; the guard counts it). Its
        scheduled evaluation still runs."""
        self.guard.check({"loss": math.nan, "skipped": 1}, f"{it} ({e})", e.samples)
        self.observe(it, [])
        return {"reward/mean": math.nan, "skipped_steps": 1, "reward/non_finite": len(e.samples),
                "rollout/engine_restarts": self.roles.engines.restarts, **{f"time/{k}": v for k, v in timings.items()}}

    def observe(self, it: int, samples: list) -> None:
        """After the update: every ``train.sample_log_every`` iterations some of this batch's samples go
        to ``samples.jsonl`` (and the loggers); every ``train.eval_every`` iterations and after the last,
        the held-out evaluation."""
        from prefopt.loops.online_eval import sample_records
        t = self.recipe.train
        if t.sample_log_every and it % t.sample_log_every == 0 and samples:
            self.run.logger.log_samples(it, sample_records(samples, self.run.tokenizer,
                                                           self.recipe.roles.rollout.sampling.n))
        if t.eval_every and (it % t.eval_every == 0 or it == t.iterations):
            self.evaluate(it)

    def evaluate(self, it: int) -> None:
        """The held-out prompts answered greedily by the current weights, scored into the eval split."""
        if not self.eval_prompts:
            return
        from prefopt.loops.online_eval import evaluate_held_out
        from prefopt.rewards.sources import NonFiniteReward
        try:
            record = evaluate_held_out(self.roles, self.eval_prompts, self.recipe.roles.rollout.sampling,
                                       self.rewards, self.run.tokenizer, seed=self.recipe.train.seed)
        except NonFiniteReward as e:     # logged as NaN, like a training batch's; the run goes on
            import logging
            logging.getLogger("prefopt").warning("held-out evaluation at iteration %d: %s", it, e)
            record = {"reward/mean": math.nan, "reward/non_finite": float(len(e.samples))}
        self.run.result.eval_history.append({"iteration": it, **record})
        self.run.logger.log(it, record, prefix="eval")

    def advantages(self, samples: list) -> dict[str, float]:
        """Token rewards, advantages and returns of every sample (in place); returns metrics."""
        from prefopt.rl.signals import compute_advantages
        return compute_advantages(samples, self.recipe.objective, self.recipe.roles.rollout.sampling.n)

    def after_update(self, samples: list) -> dict[str, float]:
        """After the policy update of an iteration (e.g. Lagrange multipliers); returns metrics."""
        return {}

    def postfix(self, stats: dict) -> dict[str, str]:
        return {"reward": f"{stats['reward/mean']:.3f}"}

    def finish(self) -> None:
        ro, result = self.recipe.roles.rollout, self.run.result
        if ro.verify_sync_prompts > 0:
            from prefopt.roles.online import verify_sync
            prompts = self.run.pre.prompts[:ro.verify_sync_prompts]
            check = verify_sync(self.roles, [p["prompt_ids"] for p in prompts], ro.sampling)
            result.final_train.update(check)
            self.run.logger.log(self.recipe.train.iterations, check, prefix="sync_check")

    def summary(self) -> dict:
        result, t = self.run.result, self.recipe.train
        out = {"advantage": self.recipe.objective.advantage, "iterations": t.iterations, "steps": result.steps,
               "reward_first": result.train_history[0]["reward/mean"],
               "reward_final": result.final_train["reward/mean"]}
        out.update(trends(result.train_history, {"kl": "kl", "entropy": "policy/entropy",
                                                 "response_length": "response_length"}))
        components = {f"reward_{s.name}": f"reward/{s.name}" for s in self.recipe.roles.reward.sources if s.name}
        out.update(trends(result.train_history, components))     # named reward sources: first / final
        out.update(eval_summary(result.eval_history))
        return out


def eval_summary(history: list[dict]) -> dict[str, float]:
    """``eval_reward_first`` / ``eval_reward_final`` (and the response lengths) of the held-out evaluations."""
    if not history:
        return {}
    return {"eval_reward_first": history[0]["reward/mean"], "eval_reward_final": history[-1]["reward/mean"],
            "eval_response_length_first": history[0].get("length/mean", math.nan),
            "eval_response_length_final": history[-1].get("length/mean", math.nan)}


def resample_seed(seed: int, iteration: int, round_: int) -> int:
    """The engines' seed of dynamic sampling's round ``round_`` (2, 3, ...) of an iteration: drawn from
    the triple, in [2^31, 2^32), so it never equals a first-generation seed ``seed * 100003 + it``
    (below 2^31 for any seed under ~21,000)."""
    import random
    return random.Random(f"resample-{seed}-{iteration}-{round_}").getrandbits(31) | (1 << 31)


def reference_on_policy(recipe) -> bool:
    """Whether an online run's reference is the policy learners' model with its LoRA adapters disabled
    (``model.lora`` and ``roles.reference.placement: learner``) instead of reference actors."""
    return recipe.model.lora is not None and recipe.roles.reference is not None \
        and recipe.roles.reference.placement == "learner"
