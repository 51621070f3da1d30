"""The online RLHF driver: rollouts (vLLM) -> rewards -> KL -> advantages -> PPO -> weight sync.

One iteration, top to bottom (:func:`run_iteration`):

1. ``rollout``: sample ``prompts_per_iteration`` prompts; the engines generate ``sampling.n``
   responses each;
2. ``score``: the recipe's reward sources (weighted sum; optional clip/normalise) and, if configured,
   process rewards per step (Clip / Delta refined, placed at step-end tokens);
3. ``annotate``: per-token log-probs of the frozen reference (KL) and of the current policy (PPO's
   "old" log-probs), values from the critic (GAE only); then token rewards = sequence reward at the
   last token + process rewards - kl_coef * KL, and advantages from the registered estimator
   (gae | grpo | rloo), whitened (``prefopt.rl.signals``);
4. ``learn``: ``ppo_epochs`` passes of optimizer steps over mini-batches of ``train.batch_size``
   samples for the policy (and the critic);
5. stream the new policy weights to every rollout engine (no checkpoint on disk).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path

from prefopt.cluster import release
from prefopt.config_schema import Recipe
from prefopt.io.plots import write_curves
from prefopt.io.run_dir import MetricsLogger
from prefopt.data import batching
from prefopt.metrics import means, merge_summaries
from prefopt.loops.offline import RunResult
from prefopt.rl.signals import RewardNormalizer, compute_advantages, shape_sequence_rewards


class PromptSampler:
    """Endless seeded passes over the prompt set, reshuffled every pass."""

    def __init__(self, prompts: list[dict], seed: int):
        self.prompts, self.rng = prompts, random.Random(seed)
        self.order, self.cursor = list(range(len(prompts))), len(prompts)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.cursor = list(state["order"]), int(state["cursor"])

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            if self.cursor == len(self.order):
                self.rng.shuffle(self.order)
                self.cursor = 0
            out.append(self.prompts[self.order[self.cursor]])
            self.cursor += 1
        return out


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start


def rollout(roles, prompts: list[dict], sampling, seed: int, eos_id: int, pending=None,
            generations=None) -> list[dict]:
    """Sample ``sampling.n`` responses per prompt (or collect ``pending``, started earlier, or take
    ``generations`` already collected) -> samples."""
    if generations is None and pending is not None:
        generations = roles.collect_generate(pending)
    elif generations is None:
        generations = roles.generate([p["prompt_ids"] for p in prompts], sampling, seed=seed)
    return [{"kind": "rollouts", "prompt_ids": p["prompt_ids"], "response_ids": g["response_ids"] or [eos_id],
             "rollout_logps": g["logprobs"], "prompt_text": p["prompt_text"], "row": p["row"]}
            for p, gens in zip(prompts, generations) for g in gens]


def score(samples: list[dict], tokenizer, rewards, process_rewards, params, normalizer) -> dict[str, float]:
    """Set each sample's sequence ``reward`` (and ``process_rewards``); return reward metrics."""
    prompts, rows = [s["prompt_text"] for s in samples], [s["row"] for s in samples]
    texts = tokenizer.batch_decode([s["response_ids"] for s in samples], skip_special_tokens=True)
    raw, components = rewards(prompts, texts, rows)
    for i, (s, v) in enumerate(zip(samples, shape_sequence_rewards(raw, params, normalizer))):
        s["reward"] = v
        s["reward_components"] = {name: values[i] for name, values in components.items()}
    mean = sum(raw) / len(raw)
    stats = {"reward/mean": mean,
             "reward/std": math.sqrt(sum((v - mean) ** 2 for v in raw) / max(1, len(raw) - 1))}
    stats.update({f"reward/{name}": sum(v) / len(v) for name, v in components.items()})
    if process_rewards is not None:
        per_token, process_stats = process_rewards(prompts, [s["response_ids"] for s in samples], rows)
        for s, v in zip(samples, per_token):
            s["process_rewards"] = v
        stats.update(process_stats)
    return stats


def _attach(samples: list[dict], key: str, per_micro: list) -> None:
    for s, v in zip(samples, [x for micro in per_micro for x in micro]):
        s[key] = v


def annotate(samples: list[dict], roles, micro: int | batching.Budget, timings: dict, old_logprobs: str = "learner",
             pending_ref=None) -> dict[str, float]:
    """Reference / old log-probs and values per token (then advantages, in ``compute_advantages``).

    The reference, policy and critic passes run on different actors, so they run concurrently:
    ``time/reference`` is the wait for the reference, ``time/learn`` gets the remaining wait.
    ``old_logprobs="rollout"`` takes the engines' log-probs as PPO's old ones (no policy pass);
    ``pending_ref`` (async rollouts) is a reference pass already started on these samples.
    """
    from prefopt.roles.group import collect_sharded, submit_sharded
    start = time.perf_counter()
    pending = {}
    use_rollout = old_logprobs == "rollout" and all(
        s["rollout_logps"] is not None and len(s["rollout_logps"]) == len(s["response_ids"]) for s in samples)
    if use_rollout:
        for s in samples:
            s["old_logps"] = list(s["rollout_logps"])
    else:
        pending["old_logps"] = (roles.policy.submit("compute_token_logps", samples, micro), "policy log-probs")
    if roles.critic is not None:
        pending["values"] = (roles.critic.submit("compute_values", samples, micro), "critic values")
    stats = {}
    if roles.references:
        ref = _collect_pipelined_reference(samples, pending_ref, roles.timeout)
        stats["reference/pipelined"] = float(ref is not None)
        if ref is None:
            ref = collect_sharded(submit_sharded(roles.references, "compute_token_logps", samples, micro),
                                  roles.timeout, "reference log-probs")
        _attach(samples, "ref_logps", ref)
    timings["reference"] = timings.get("reference", 0.0) + time.perf_counter() - start
    with _Timer(timings, "learn"):
        for key, (future, what) in pending.items():
            _attach(samples, key, collect_sharded(future, roles.timeout, what))
    if use_rollout:
        return stats
    # engine vs learner log-probs of the sampled tokens: ~0 when the weights are in sync
    diffs = [abs(a - b) for s in samples if s["rollout_logps"] for a, b in zip(s["rollout_logps"], s["old_logps"])]
    return {**stats, "rollout/logp_abs_diff": max(diffs)} if diffs else stats


def submit_pipelined_reference(roles, prompts: list[dict], generation_refs: list, micro: int | batching.Budget,
                               eos_id: int):
    """Start the reference pass of a generation still in flight: each engine's share of the prompts goes
    to a reference actor together with that engine's (unfinished) result, so the reference starts the
    moment the engine is done, with no driver round trip (``train.async_rollouts``)."""
    if not roles.references:
        return None
    parts = roles.engines.split([p["prompt_ids"] for p in prompts])
    return [roles.references[i % len(roles.references)].compute_generation_logps.remote(part, ref, micro, eos_id)
            for i, (part, ref) in enumerate(zip(parts, generation_refs))]


def _collect_pipelined_reference(samples: list[dict], refs, timeout_s: float):
    """Per-sample reference log-probs of a pipelined pass, as ``[[...]]`` (one "micro-batch"), or None
    when there is none or it failed (an engine died: the caller recomputes)."""
    if refs is None:
        return None
    from ray.exceptions import RayError

    from prefopt.cluster import ActorDiedError, remote_get
    try:
        out = [x for part in remote_get(refs, timeout_s, "reference log-probs (pipelined)") for x in part]
    except (ActorDiedError, RayError) as e:  # e.g. the generation it waited on failed: recompute
        import logging
        logging.getLogger("prefopt").warning("pipelined reference pass failed (%s); computing it again", e)
        return None
    if len(out) != len(samples) or any(len(o) != len(s["response_ids"]) for o, s in zip(out, samples)):
        return None
    return [out]


def learn(samples: list[dict], roles, recipe: Recipe, iteration: int, guard=None) -> tuple[dict[str, float], int]:
    """PPO epochs of policy (and critic) optimizer steps; returns their metrics and the step count.
    ``guard`` (``loops.guards.SkipGuard``) counts policy steps skipped for non-finite values."""
    t, params = recipe.train, recipe.objective
    policy_stats, critic_stats, skipped = [], [], 0
    for epoch in range(params.ppo_epochs):
        order = list(range(len(samples)))
        random.Random(f"{t.seed}-{iteration}-{epoch}").shuffle(order)
        for b in range(0, len(order) - t.batch_size + 1, t.batch_size):
            batch = [samples[i] for i in order[b:b + t.batch_size]]
            step = roles.policy.train_step(batch, batching.train_micro(recipe),
                                           what=f"policy step (iteration {iteration})",
                                           inject_nan=iteration in t.debug_nan_steps)
            policy_stats += step
            if guard is not None:
                check = {"loss": means(merge_summaries(step))["loss"], "skipped": step[0]["skipped"]}
                skipped += guard.check(check, f"{iteration} (PPO epoch {epoch}, batch {b // t.batch_size})",
                                       order[b:b + t.batch_size]) > 0
            if roles.critic is not None:
                critic_stats += roles.critic.train_step(batch, batching.train_micro(recipe),
                                                        what=f"critic step (iteration {iteration})")
    stats = means(merge_summaries(policy_stats))
    stats.update(grad_norm=policy_stats[-1]["grad_norm"], lr=policy_stats[-1]["lr"], skipped_steps=skipped,
                 policy_steps_time_s=sum(p["time_s"] for p in policy_stats[::len(roles.policy)]))
    if critic_stats:
        critic = means(merge_summaries(critic_stats))
        stats.update({k: v for k, v in critic.items() if k.startswith("critic/")})
        stats.update({"critic/value_loss": critic["loss"], "critic/grad_norm": critic_stats[-1]["grad_norm"]})
    return stats, len(policy_stats)


def evaluate_prompts(roles, prompts: list[dict], sampling, eval_fn, tokenizer, *, seed: int) -> float:
    """Mean ``eval_fn(prompt, response, row)`` over one sampled response per held-out prompt (fixed seed)."""
    import dataclasses
    generations = roles.generate([p["prompt_ids"] for p in prompts], dataclasses.replace(sampling, n=1), seed=seed)
    texts = tokenizer.batch_decode([g[0]["response_ids"] for g in generations], skip_special_tokens=True)
    scores = [float(eval_fn(prompt=p["prompt_text"], response=x, row=p["row"])) for p, x in zip(prompts, texts)]
    return sum(scores) / len(scores)


def run_iteration(it: int, roles, recipe: Recipe, sampler: PromptSampler, tokenizer, rewards, process_rewards,
                  normalizer: RewardNormalizer, constraints=None, guard=None,
                  prefetch=None) -> tuple[dict[str, float], int]:
    """One iteration; ``constraints`` (a ``loops.constrained.Constraints``) under constrained PPO.

    ``prefetch`` (``train.async_rollouts``, a ``loops.prefetch.Prefetch``): batches started early. This
    iteration's rollouts come from there when present, and the next iteration's generation is
    started before learning, so the engines sample while the learners train (one-step off-policy:
    those samples come from the weights before this iteration's update).
    """
    t, params, sampling = recipe.train, recipe.objective, recipe.roles.rollout.sampling
    timings, stats = {}, {}
    with _Timer(timings, "generate"):
        ready = prefetch.pop(it) if prefetch is not None else None
        prompts = ready["prompts"] if ready else sampler.take(t.prompts_per_iteration)
        samples = rollout(roles, prompts, sampling, t.seed * 100003 + it, tokenizer.eos_token_id,
                          ready and ready["pending"], ready and ready["generations"])
        pending_ref = ready and ready["pending_ref"]
    if prefetch is not None and it < t.iterations:
        upcoming = sampler.take(t.prompts_per_iteration)
        started = roles.submit_generate([p["prompt_ids"] for p in upcoming], sampling, t.seed * 100003 + it + 1)
        prefetch.put(it + 1, upcoming, started, submit_pipelined_reference(
            roles, upcoming, started[-1], batching.inference_micro(recipe), tokenizer.eos_token_id))
    from prefopt.rewards.sources import NonFiniteReward
    try:
        with _Timer(timings, "reward"):
            stats.update(score(samples, tokenizer, rewards, process_rewards, params, normalizer))
    except NonFiniteReward as e:   # no update from this batch (counted like a skipped optimizer step)
        if guard is None:
            raise
        guard.check({"loss": math.nan, "skipped": 1}, f"{it} ({e})", e.samples)
        return {"reward/mean": math.nan, "skipped_steps": 1, "reward/non_finite": len(e.samples),
                "rollout/engine_restarts": roles.engines.restarts,
                **{f"time/{k}": v for k, v in timings.items()}}, 0
    stats.update(annotate(samples, roles, batching.inference_micro(recipe), timings, params.old_logprobs, pending_ref))
    with _Timer(timings, "learn"):
        if constraints is None:
            stats.update(compute_advantages(samples, params, sampling.n))
        else:
            stats.update(constraints.compute_advantages(samples, params, sampling.n))
        learn_stats, steps = learn(samples, roles, recipe, it, guard)
    stats.update(learn_stats)
    if constraints is not None:
        stats.update(constraints.update(samples))
    # async rollouts: the sync is submitted, not awaited (checked by the next engine or sync call)
    timings["sync"] = roles.sync_weights(version=it, wait=prefetch is None)
    stats["rollout/engine_restarts"] = roles.engines.restarts
    lengths = [len(s["response_ids"]) for s in samples]
    stats.update({"response_length": sum(lengths) / len(lengths),
                  "tokens_per_s": sum(lengths) / max(timings["generate"], 1e-9),
                  **{f"time/{k}": v for k, v in timings.items()}})
    return stats, steps


def train(recipe: Recipe, *, quiet: bool = False) -> RunResult:
    """Run an online recipe end to end. Recipe and data errors surface before Ray starts."""
    from tqdm.auto import tqdm

    from prefopt.cluster import init_ray_for
    from prefopt.roles.online import OnlineRoles, verify_sync
    from prefopt.preflight import open_run_dir, prepare
    from prefopt.rewards.sources import SequenceRewards

    pre = prepare(recipe)        # every check, before Ray starts and before the run folder exists
    r, t, params, ro = recipe, recipe.train, recipe.objective, recipe.roles.rollout
    tokenizer, prompts = pre.tokenizer, pre.prompts
    run_dir, resume_from = open_run_dir(pre)
    logger = MetricsLogger(run_dir, tensorboard=r.output.tensorboard)
    started_ray = init_ray_for(r)
    roles = None
    stack = contextlib.ExitStack()
    try:
        from prefopt.cluster import check_cluster_resources
        check_cluster_resources(r)
        roles = OnlineRoles(r, tokenizer.pad_token_id)
        rewards = SequenceRewards(r.roles.reward, roles.reward_models, timeout_s=roles.timeout)
        process_rewards = None
        if r.roles.reward.process is not None:
            from prefopt.rewards.process_source import ProcessRewards
            process_rewards = ProcessRewards(r.roles.reward.process, tokenizer, roles.process_model,
                                             timeout_s=roles.timeout)
        steps_per_iteration = t.prompts_per_iteration * ro.sampling.n // t.batch_size * params.ppo_epochs
        info = roles.setup(r, total_steps=t.iterations * steps_per_iteration, pad_id=tokenizer.pad_token_id)
        (run_dir / "placement.json").write_text(json.dumps(info, indent=1))

        result = RunResult(run_dir=run_dir, steps=0, final_train={})
        constraints, nm = None, None
        if params.name == "constrained_ppo":
            from prefopt.loops.constrained import Constraints
            constraints, nm = Constraints(r), params.nelder_mead
        held_out = prompts[-nm.eval_prompts:] if nm is not None else []
        sampler = PromptSampler(prompts[:len(prompts) - len(held_out)], t.seed)
        normalizer = RewardNormalizer()
        from prefopt.loops.prefetch import Prefetch
        prefetch = Prefetch(roles) if t.async_rollouts else None
        driver_state = {"sampler": sampler, "normalizer": normalizer, "constraints": constraints,
                        "prefetch": prefetch}
        if resume_from is not None:
            from prefopt.loops import checkpointing
            result.steps = int(checkpointing.restore(resume_from, roles, driver_state)["steps"])
            result.train_history = checkpointing.history(run_dir, "train", "iteration")
            roles.sync_weights(version=len(result.train_history))   # the engines get the restored policy
        progress = tqdm(total=t.iterations, initial=len(result.train_history), desc=r.name, unit="it",
                        disable=quiet or not r.output.progress_bar)

        from prefopt.loops.checkpointing import Checkpointer, StopRequest
        from prefopt.loops.guards import SkipGuard
        stop, guard = stack.enter_context(StopRequest()), SkipGuard(t.max_skipped_steps)
        ckpt = Checkpointer(run_dir, roles, r.output, driver_state=driver_state, tokenizer=tokenizer)

        def advance(n: int) -> int:
            """Train ``n`` more iterations (at most up to train.iterations); returns the last one."""
            for it in range(len(result.train_history) + 1, min(len(result.train_history) + n, t.iterations) + 1):
                if stop.requested:
                    ckpt.stop_now(stop, f"iter_{it - 1:06d}", it - 1, steps=result.steps)
                stats, steps = run_iteration(it, roles, r, sampler, tokenizer, rewards, process_rewards, normalizer,
                                             constraints, guard, prefetch)
                result.steps += steps
                result.train_history.append({"iteration": it, **stats})
                logger.log(it, stats)
                progress.update(1)
                progress.set_postfix(reward=f"{stats['reward/mean']:.3f}")
                if ckpt.due(it, t.iterations):
                    ckpt.save(f"iter_{it:06d}", it, steps=result.steps)
            return len(result.train_history)

        if nm is not None:
            from prefopt.loops.constrained import search_thresholds
            from prefopt.rewards.sources import import_reward_fn
            eval_fn = import_reward_fn(nm.eval_fn)

            def evaluate() -> float:
                score = evaluate_prompts(roles, held_out, ro.sampling, eval_fn, tokenizer, seed=t.seed)
                logger.log(len(result.train_history), {"score": score, **{
                    f"threshold/{n}": v for n, v in zip(constraints.names, constraints.thresholds)}},
                    prefix="nelder_mead")
                return score

            search = search_thresholds(constraints, nm, t.iterations - len(result.train_history), advance, evaluate)
            constraints.thresholds = search["best_thresholds"]
            advance(t.iterations)                       # what the search left of the budget
            (run_dir / "nelder_mead.json").write_text(json.dumps(search, indent=1))
            result.final_train.update(nelder_mead_best_score=search["best_score"])
        else:
            advance(t.iterations)
        progress.close()
        result.final_train = {**result.train_history[-1], **result.final_train}
        if constraints is not None:
            from prefopt.loops.constrained import plot_constraints
            plot_constraints(result.train_history, constraints.names, run_dir / "constraints.png")
            (run_dir / "constraints.json").write_text(json.dumps(constraints.state_dict(), indent=1))

        if ro.verify_sync_prompts > 0:
            check = verify_sync(roles, [p["prompt_ids"] for p in prompts[:ro.verify_sync_prompts]], ro.sampling)
            result.final_train.update(check)
            logger.log(t.iterations, check, prefix="sync_check")
        if r.output.save_model:
            model_dir = run_dir / "model"
            roles.policy.call("save_model", [(str(model_dir),)] * len(roles.policy), what="save model")
            tokenizer.save_pretrained(str(model_dir))
        summary = {"name": r.name, "objective": params.name, "advantage": params.advantage, "iterations": t.iterations,
                   "steps": result.steps, "reward_first": result.train_history[0]["reward/mean"],
                   "reward_final": result.final_train["reward/mean"], "run_dir": str(run_dir)}
        summary.update(trends(result.train_history, {"kl": "kl", "entropy": "policy/entropy",
                                                     "response_length": "response_length"}))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return result
    finally:
        stack.close()
        logger.close()
        write_curves(run_dir, best_effort=True)
        release(roles, started_ray)


def trends(history: list[dict], keys: dict[str, str]) -> dict[str, float]:
    """``{name}_first`` / ``{name}_final``: the first and last finite value of each metric in ``history``."""
    from prefopt.io.plots import summary_trend
    out = {}
    for name, key in keys.items():
        trend = summary_trend([{**h, "split": "train"} for h in history], key)
        if trend is not None:
            out[f"{name}_first"], out[f"{name}_final"] = trend
    return out
