"""The stages of an online RL iteration, used by :class:`prefopt.algorithms.ppo.PPO`:

1. ``rollout``: the engines generate ``sampling.n`` responses per prompt;
2. ``score``: the recipe's reward sources (weighted sum; optional clip/normalise) and, if configured,
   process rewards per step (Clip / Delta refined, placed at step-end tokens);
3. ``annotate``: per-token log-probs of the frozen reference (KL) and of the current policy (PPO's
   "old" log-probs), values from the critic (GAE only);
4. advantages: ``prefopt.rl.signals.compute_advantages``;
5. ``learn``: ``ppo_epochs`` passes of optimizer steps over mini-batches of ``train.batch_size``
   samples for the policy (and the critic);
6. the new policy weights stream to every rollout engine (``OnlineRoles.sync_weights``).
"""
from __future__ import annotations

import math
import random
import time

from prefopt.config_schema import Recipe
from prefopt.data import batching
from prefopt.data.rollouts import RolloutSample
from prefopt.metrics import means, merge_summaries
from prefopt.rl.signals import overlong_penalty, shape_sequence_rewards


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


class Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start


def rollout(roles, prompts: list[dict], sampling, seed: int, eos_id: int, pending=None,
            generations=None) -> tuple[list[RolloutSample], float]:
    """Sample ``sampling.n`` responses per prompt (or collect ``pending``, started earlier, or take
    ``generations`` already collected) -> (samples, the engines' generation seconds: the slowest
    engine's, measured in the engine, so async rollouts do not count the driver's shorter wait)."""
    if generations is None and pending is not None:
        generations = roles.collect_generate(pending)
    elif generations is None:
        generations = roles.generate([p["prompt_ids"] for p in prompts], sampling, seed=seed)
    samples = [RolloutSample(prompt_ids=p["prompt_ids"], response_ids=g["response_ids"] or [eos_id],
                             rollout_logps=g["logprobs"], prompt_text=p["prompt_text"], row=p["row"])
               for p, gens in zip(prompts, generations) for g in gens]
    return samples, max((g.get("engine_s", 0.0) for gens in generations for g in gens), default=0.0)


def score(samples: list[RolloutSample], tokenizer, rewards, process_rewards, params, normalizer,
          max_tokens: int | None = None) -> dict[str, float]:
    """Set each sample's sequence ``reward`` (and ``process_rewards``); return reward metrics.
    ``params`` None (online preference optimization): the raw rewards, unshaped.

    The reward is the sources' raw value, shaped (clip / normalise), plus DAPO's overlong penalty
    when ``objective.overlong_buffer`` is set (its mean logged as ``reward/overlong_penalty``);
    ``reward/mean`` and ``reward/std`` are of the raw values."""
    prompts, rows = [s.prompt_text for s in samples], [s.row for s in samples]
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    raw, components = rewards(prompts, texts, rows)
    shaped = shape_sequence_rewards(raw, params, normalizer) if params is not None else list(raw)
    penalties = [0.0] * len(samples)
    if params is not None and params.overlong_buffer is not None:
        penalties = overlong_penalty([len(s.response_ids) for s in samples], params.overlong_max_tokens or max_tokens,
                                     params.overlong_buffer, params.overlong_penalty)
    for i, (s, v, penalty) in enumerate(zip(samples, shaped, penalties)):
        s.reward, s.task_reward = v + penalty, raw[i]
        s.reward_components = {name: values[i] for name, values in components.items()}
    mean = sum(raw) / len(raw)
    stats = {"reward/mean": mean,
             "reward/std": math.sqrt(sum((v - mean) ** 2 for v in raw) / max(1, len(raw) - 1))}
    if params is not None and params.overlong_buffer is not None:
        stats["reward/overlong_penalty"] = sum(penalties) / len(penalties)
    stats.update({f"reward/{name}": sum(v) / len(v) for name, v in components.items()})
    if process_rewards is not None:
        per_token, process_stats = process_rewards(prompts, [s.response_ids for s in samples], rows)
        for s, v in zip(samples, per_token):
            s.process_rewards = v
        stats.update(process_stats)
    return stats


def _attach(samples: list[RolloutSample], key: str, per_micro: list) -> None:
    for s, v in zip(samples, [x for micro in per_micro for x in micro]):
        setattr(s, key, v)


def annotate(samples: list[RolloutSample], roles, micro: int | batching.Budget, timings: dict, old_logprobs: str = "learner",
             pending_ref=None) -> dict[str, float]:
    """Reference / old log-probs and values per token (then advantages, in ``compute_advantages``).

    The reference, policy and critic passes run on different actors, so they run concurrently: the
    timings are the driver's waits in turn, ``reference`` (from the start), then ``old_logps`` and
    ``values`` (what is left of each after the one before).
    ``old_logprobs="rollout"`` takes the engines' log-probs as PPO's old ones (no policy pass);
    ``pending_ref`` (async rollouts) is a reference pass already started on these samples.
    """
    from prefopt.roles.group import collect_sharded, submit_sharded
    start = time.perf_counter()
    pending = {}
    use_rollout = old_logprobs == "rollout" and all(
        s.rollout_logps is not None and len(s.rollout_logps) == len(s.response_ids) for s in samples)
    if use_rollout:
        for s in samples:
            s.old_logps = list(s.rollout_logps)
    else:
        pending["old_logps"] = (roles.policy.submit("compute_token_logps", samples, micro), "policy log-probs")
    if roles.critic is not None:
        pending["values"] = (roles.critic.submit("compute_values", samples, micro), "critic values")
    if roles.reference_on_policy:     # LoRA: the policy learners with their adapters disabled
        pending["ref_logps"] = (roles.policy.submit("compute_reference_token_logps", samples, micro),
                                "reference log-probs (adapters disabled)")
    stats = {}
    if roles.references:
        ref = _collect_pipelined_reference(samples, pending_ref, roles.timeout)
        stats["reference/pipelined"] = float(ref is not None)
        if ref is None:
            ref = collect_sharded(submit_sharded(roles.references, "compute_token_logps", samples, micro),
                                  roles.timeout, "reference log-probs")
        _attach(samples, "ref_logps", ref)
    timings["reference"] = timings.get("reference", 0.0) + time.perf_counter() - start
    for key, (future, what) in pending.items():
        with Timer(timings, key):
            _attach(samples, key, collect_sharded(future, roles.timeout, what))
    if use_rollout:
        return stats
    # engine vs learner log-probs of the sampled tokens: ~0 when the weights are in sync
    diffs = [abs(a - b) for s in samples if s.rollout_logps for a, b in zip(s.rollout_logps, s.old_logps)]
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


def _collect_pipelined_reference(samples: list[RolloutSample], refs, timeout_s: float):
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
    if len(out) != len(samples) or any(len(o) != len(s.response_ids) for o, s in zip(out, samples)):
        return None
    return [out]


def learn(samples: list, roles, recipe: Recipe, iteration: int, guard=None, *,
          epochs: int | None = None) -> tuple[dict[str, float], int]:
    """``epochs`` (default ``objective.ppo_epochs``) seeded passes of policy (and critic) optimizer
    steps over batches of ``train.batch_size`` items (rollout samples, or online preference pairs /
    lists; an incomplete last batch is left out); returns the metrics and the optimizer step count.
    ``guard`` (``loops.guards.SkipGuard``) counts policy steps skipped for non-finite values."""
    t = recipe.train
    epochs = recipe.objective.ppo_epochs if epochs is None else epochs
    policy_stats, critic_stats, skipped, steps = [], [], 0, 0
    per_epoch = len(samples) // t.batch_size
    # mini-batches: a seeded shuffle per epoch (the offline loop's step_batches, seeded per iteration)
    for n, indices in enumerate(batching.step_batches(len(samples), t.batch_size, seed=f"{t.seed}-{iteration}",
                                                      epochs=epochs)):
        batch = [samples[i] for i in indices]
        step = roles.policy.train_step(batch, batching.train_micro(recipe),
                                       what=f"policy step (iteration {iteration})",
                                       inject_nan=iteration in t.debug_nan_steps)
        policy_stats += step
        steps += 1
        if guard is not None:
            check = {"loss": means(merge_summaries(step))["loss"], "skipped": step[0]["skipped"]}
            skipped += guard.check(check, f"{iteration} (epoch {n // per_epoch}, batch {n % per_epoch})",
                                   indices) > 0
        if roles.critic is not None:
            critic_stats += roles.critic.train_step(batch, batching.train_micro(recipe),
                                                    what=f"critic step (iteration {iteration})")
    if not policy_stats:
        return {}, 0
    stats = means(merge_summaries(policy_stats))
    stats.update(grad_norm=policy_stats[-1]["grad_norm"], lr=policy_stats[-1]["lr"], skipped_steps=skipped,
                 policy_steps_time_s=sum(p["time_s"] for p in policy_stats[::len(roles.policy)]))
    if critic_stats:
        critic = means(merge_summaries(critic_stats))
        stats.update({k: v for k, v in critic.items() if k.startswith("critic/")})
        stats.update({"critic/value_loss": critic["loss"], "critic/grad_norm": critic_stats[-1]["grad_norm"]})
    return stats, steps


def evaluate_prompts(roles, prompts: list[dict], sampling, eval_fn, tokenizer, *, seed: int) -> float:
    """Mean ``eval_fn(prompt, response, row)`` over one sampled response per held-out prompt (fixed seed)."""
    import dataclasses
    generations = roles.generate([p["prompt_ids"] for p in prompts], dataclasses.replace(sampling, n=1), seed=seed)
    texts = tokenizer.batch_decode([g[0]["response_ids"] for g in generations], skip_special_tokens=True)
    scores = [float(eval_fn(prompt=p["prompt_text"], response=x, row=p["row"])) for p, x in zip(prompts, texts)]
    return sum(scores) / len(scores)


def start_next_generation(roles, prefetch, sampler: PromptSampler, recipe: Recipe, iteration: int,
                          eos_id: int, *, reference: bool = True) -> None:
    """``train.async_rollouts``: start iteration ``iteration``'s generation (and, with ``reference``,
    its pipelined per-token reference pass) now, while this iteration's learners train;
    :meth:`Prefetch.pop` hands it over."""
    t, sampling = recipe.train, recipe.roles.rollout.sampling
    upcoming = sampler.take(t.prompts_per_iteration)
    started = roles.submit_generate([p["prompt_ids"] for p in upcoming], sampling, t.seed * 100003 + iteration)
    pending_ref = submit_pipelined_reference(roles, upcoming, started[-1], batching.inference_micro(recipe),
                                             eos_id) if reference else None
    prefetch.put(iteration, upcoming, started, pending_ref)
