"""The online RLHF driver: rollouts (vLLM) -> rewards -> KL -> advantages -> PPO -> weight sync.

One iteration, top to bottom:

1. sample ``prompts_per_iteration`` prompts; every rollout engine generates ``sampling.n``
   responses for its share;
2. score each response with the recipe's reward sources (weighted sum; optional clip/normalise) and,
   if configured, process rewards per step (Clip / Delta refined, placed at step-end tokens);
3. per-token log-probs of the frozen reference (reference actors) and of the current policy
   (learner group: the PPO "old" log-probs), values from the critic group (GAE only);
4. token rewards = sequence reward at the last token - kl_coef * KL per token; advantages from the
   registered estimator (gae | grpo | rloo), whitened;
5. ``ppo_epochs`` passes of optimizer steps over mini-batches of ``train.batch_size`` samples for
   the policy (and the critic);
6. stream the new policy weights to every rollout engine (no checkpoint on disk).
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from prefopt.cluster import release
from prefopt.config_schema import Recipe
from prefopt.io.run_dir import MetricsLogger, create_run_dir, write_config
from prefopt.loops.metrics import means, merge_summaries
from prefopt.loops.offline import RunResult


class OnlineRoles:
    def __init__(self, recipe: Recipe, pad_id: int):
        import ray

        from prefopt.objectives.ppo import ValueObjective
        from prefopt.roles.group import LearnerGroup
        from prefopt.roles.reference import ReferenceWorker
        from prefopt.roles.rollout import RolloutWorker

        r, roles = recipe, recipe.roles
        self.timeout = r.ray.call_timeout_s
        ro = roles.rollout
        colocated = {"CPU": ro.num_cpus, "GPU": ro.num_gpus} if ro.colocate_with_learners else None
        self.policy = LearnerGroup(r, roles.learner, colocated=colocated)
        self.critic = None
        if r.objective.advantage == "gae":
            self.critic = LearnerGroup(r, roles.critic, model_kind="critic", objective=ValueObjective(r.objective))
        self.references = []
        if r.objective.kl_coef > 0:
            ref = roles.reference
            rcls = ray.remote(num_cpus=ref.num_cpus, num_gpus=ref.num_gpus)(ReferenceWorker)
            self.references = [rcls.remote(r, pad_id) for _ in range(ref.num_actors)]
        ecls = ray.remote(num_cpus=ro.num_cpus, num_gpus=ro.num_gpus)(RolloutWorker)
        self.transport = ro.weight_sync
        self.engines = []
        for i in range(ro.engines):
            opts = {"scheduling_strategy": self.policy.bundle_strategy(i)} if ro.colocate_with_learners else {}
            self.engines.append(ecls.options(**opts).remote(r.model.path, ro, seed=r.train.seed + i,
                                                            trust_remote_code=r.model.trust_remote_code))
        from prefopt.roles.reward_model import RewardModelWorker
        self.reward_models, self.process_model = {}, None
        proc = roles.reward.process
        if proc is not None and proc.model:
            pcls = ray.remote(num_cpus=proc.num_cpus, num_gpus=proc.num_gpus)(RewardModelWorker)
            self.process_model = pcls.remote(proc.model, trust_remote_code=r.model.trust_remote_code)
        for i, src in enumerate(roles.reward.sources):
            if src.model:
                mcls = ray.remote(num_cpus=src.num_cpus, num_gpus=src.num_gpus)(RewardModelWorker)
                self.reward_models[i] = mcls.remote(src.model, trust_remote_code=r.model.trust_remote_code)

    def generate(self, prompt_ids: list[list[int]], sampling, seed: int, greedy: bool = False):
        from prefopt.cluster import remote_get
        share = -(-len(prompt_ids) // len(self.engines))
        parts = [prompt_ids[i * share:(i + 1) * share] for i in range(len(self.engines))]
        refs = [e.generate.remote(p, sampling, greedy=greedy, seed=seed + i)
                for i, (e, p) in enumerate(zip(self.engines, parts)) if p]
        return [item for part in remote_get(refs, self.timeout, "rollout.generate") for item in part]

    def open_sync_group(self) -> None:
        """``process_group`` transport: learner rank 0 + every engine join a group of their own."""
        from prefopt.cluster import remote_get
        host, port = remote_get(self.policy.actors[0].address.remote(), self.timeout, "learner.address")
        size = 1 + len(self.engines)
        refs = [self.policy.actors[0].join_sync_group.remote(host, port, size, self.timeout)]
        refs += [e.join_sync_group.remote(host, port, i + 1, size, self.timeout) for i, e in enumerate(self.engines)]
        self.sync_specs = remote_get(refs, self.timeout, "weight-sync group")[0]

    def sync_weights(self, version: int) -> float:
        """Policy learners -> every rollout engine (no disk). Returns seconds."""
        from prefopt.cluster import remote_get
        start = time.perf_counter()
        if self.transport == "process_group":
            refs = [a.sync_broadcast.remote() for a in self.policy.actors]
            refs += [e.receive_weights.remote(self.sync_specs, version) for e in self.engines]
            remote_get(refs, self.timeout, "weight sync (process group)")
        else:
            refs = [a.export_weights.remote() for a in self.policy.actors]
            weights = refs[0]                        # rank 0 holds the full (gathered) tensors
            loads = [e.update_weights.remote(weights, version) for e in self.engines]
            remote_get(refs[1:] + loads, self.timeout, "weight sync (object store)")
        return time.perf_counter() - start

    def shutdown(self) -> None:
        import ray
        extra = list(self.reward_models.values()) + ([self.process_model] if self.process_model else [])
        for actor in self.references + self.engines + extra:
            ray.kill(actor)
        self.policy.kill()
        if self.critic is not None:
            self.critic.kill()


def _per_token(samples: list[dict], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack each sample's per-token list under ``key`` into ``[N, T]`` plus the response mask."""
    width = max(len(s["response_ids"]) for s in samples)
    values = torch.zeros(len(samples), width, dtype=torch.float64)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["response_ids"])
        mask[i, :n] = True
        if key in s:
            values[i, :n] = torch.tensor(s[key], dtype=torch.float64)
    return values, mask


def compute_advantages(samples: list[dict], params, group_size: int) -> dict[str, float]:
    """Token rewards (sequence reward at the last token, minus the KL penalty) -> advantages."""
    from prefopt.rl.advantages import ADVANTAGES, masked_mean, whiten
    from prefopt.rl.ppo import kl_penalty

    old, mask = _per_token(samples, "old_logps")
    token_rewards = torch.zeros_like(old)
    last = mask.sum(-1) - 1
    token_rewards[torch.arange(len(samples)), last] = torch.tensor([s["reward"] for s in samples],
                                                                   dtype=torch.float64)
    if any("process_rewards" in s for s in samples):
        token_rewards = token_rewards + _per_token(samples, "process_rewards")[0]   # at step ends
    stats = {}
    if params.kl_coef > 0:
        ref, _ = _per_token(samples, "ref_logps")
        kl = kl_penalty(old, ref, kind=params.kl_estimator) * mask
        stats["kl"] = float(masked_mean(kl, mask))
        if params.kl_in_reward:
            token_rewards = token_rewards - params.kl_coef * kl
    values = _per_token(samples, "values")[0] if params.advantage == "gae" else None
    # group estimators (grpo, rloo) score whole sequences: the sum of token rewards, KL included
    adv, returns = ADVANTAGES.get(params.advantage)(
        token_rewards=token_rewards, values=values, mask=mask, scores=None, group_size=group_size,
        gamma=params.gamma, lam=params.lam)
    if params.whiten_advantages:
        adv = whiten(adv, mask)
    for i, s in enumerate(samples):
        n = len(s["response_ids"])
        s["advantages"] = adv[i, :n].tolist()
        if returns is not None:
            s["returns"] = returns[i, :n].tolist()
    if returns is not None and values is not None:
        from prefopt.rl.ppo import explained_variance
        stats["critic/explained_variance"] = float(explained_variance(values, returns, mask))
    return stats


class RewardNormalizer:
    """Running mean/std of sequence rewards (Welford), part of the resumable state."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        for v in values:
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    def __call__(self, v: float) -> float:
        std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0
        return (v - self.mean) / (std + 1e-8)


def shape_sequence_rewards(totals: list[float], params, normalizer: RewardNormalizer) -> list[float]:
    """Clip sequence rewards to ``objective.reward_clip``, then (optionally) normalise them with
    running statistics (updated with this batch first, as OpenRLHF does)."""
    if params.reward_clip is not None:
        lo, hi = params.reward_clip
        totals = [min(max(v, lo), hi) for v in totals]
    if params.normalize_rewards:
        normalizer.update(totals)
        totals = [normalizer(v) for v in totals]
    return totals


def verify_sync(roles: OnlineRoles, prompt_ids: list[list[int]], sampling) -> dict[str, float]:
    """Engine vs learner after a sync: greedy outputs and the log-probs of the greedy tokens."""
    from prefopt.cluster import remote_get
    engine_out = [g[0] for g in roles.generate(prompt_ids, sampling, seed=0, greedy=True)]
    learner_out = roles.policy.call("greedy_generate", [(prompt_ids, sampling.max_tokens)] * len(roles.policy),
                                    what="learner greedy generate")[0]
    matches = [e["response_ids"] == l for e, l in zip(engine_out, learner_out)]
    samples = [{"kind": "rollouts", "prompt_ids": p, "response_ids": e["response_ids"]}
               for p, e in zip(prompt_ids, engine_out) if e["response_ids"]]
    learner_logps = [x for m in roles.policy.infer("compute_token_values", samples, 8) for x in m]
    engine_logps = [e["logprobs"] for e in engine_out if e["response_ids"]]
    diff = max(abs(a - b) for le, ee in zip(learner_logps, engine_logps) for a, b in zip(le, ee))
    return {"greedy_match": sum(matches) / len(matches), "logp_max_abs_diff": diff}


def train(recipe: Recipe, *, run_dir: Path | None = None, quiet: bool = False) -> RunResult:
    from prefopt.cache import cache_dir
    from prefopt.cluster import init_ray
    from prefopt.config import validate_recipe
    from prefopt.data.prompts import load_prompts
    from prefopt.models.load import load_tokenizer
    from prefopt.models.tiny import resolve_model_path
    from prefopt.rewards.sources import SequenceRewards

    validate_recipe(recipe)
    r, t, params = recipe, recipe.train, recipe.objective
    ro = r.roles.rollout
    r.model.path = resolve_model_path(r.model.path)
    if r.roles.critic is not None and r.roles.critic.path:
        r.roles.critic.path = resolve_model_path(r.roles.critic.path)
    tokenizer = load_tokenizer(r.model.tokenizer or r.model.path, trust_remote_code=r.model.trust_remote_code)
    prompts = load_prompts(r.data, tokenizer, cache_dir=cache_dir()).prompts
    from prefopt.rewards.sources import check_sources
    check_sources(r.roles.reward)
    group = ro.sampling.n
    samples_per_iter = t.prompts_per_iteration * group
    steps_per_iter = samples_per_iter // t.batch_size * params.ppo_epochs
    grad_accum = t.batch_size // (t.micro_batch_size * r.roles.learner.num_actors)

    run_dir = Path(run_dir) if run_dir else create_run_dir(r)
    write_config(run_dir, r)
    logger = MetricsLogger(run_dir, tensorboard=r.output.tensorboard)
    needed = (r.roles.learner.num_cpus * r.roles.learner.num_actors + ro.num_cpus * ro.engines
              + (r.roles.critic.num_cpus * r.roles.critic.num_actors if params.advantage == "gae" else 0)
              + (r.roles.reference.num_cpus * r.roles.reference.num_actors if params.kl_coef > 0 else 0))
    started_ray = init_ray(r.ray, num_cpus_needed=needed)
    roles = None
    normalizer = RewardNormalizer()
    try:
        roles = OnlineRoles(r, tokenizer.pad_token_id)
        rewards = SequenceRewards(r.roles.reward, roles.reward_models, timeout_s=roles.timeout)
        process_rewards = None
        if r.roles.reward.process is not None:
            from prefopt.rewards.process_source import ProcessRewards
            process_rewards = ProcessRewards(r.roles.reward.process, tokenizer, roles.process_model,
                                             timeout_s=roles.timeout)
        total_steps = t.iterations * steps_per_iter
        info = roles.policy.setup(total_steps=total_steps, grad_accum=grad_accum, pad_id=tokenizer.pad_token_id)
        if roles.critic is not None:
            c = r.roles.critic
            info += roles.critic.setup(total_steps=total_steps, grad_accum=t.batch_size // (t.micro_batch_size * c.num_actors),
                                       pad_id=tokenizer.pad_token_id, lr=c.lr)
        if roles.transport == "process_group":
            roles.open_sync_group()
        from prefopt.cluster import remote_get
        info += remote_get([e.node_info.remote() for e in roles.engines], roles.timeout, "rollout.node_info")
        (run_dir / "placement.json").write_text(json.dumps(info, indent=1))
        result = RunResult(run_dir=run_dir, steps=0, final_train={})
        order = list(range(len(prompts)))
        rng = random.Random(t.seed)
        rng.shuffle(order)
        cursor = 0
        from tqdm.auto import tqdm
        progress = tqdm(total=t.iterations, desc=r.name, unit="it", disable=quiet or not r.output.progress_bar)
        for it in range(1, t.iterations + 1):
            timings, stats = {}, {}
            batch_prompts = []
            for _ in range(t.prompts_per_iteration):
                if cursor == len(order):
                    rng.shuffle(order)
                    cursor = 0
                batch_prompts.append(prompts[order[cursor]])
                cursor += 1

            start = time.perf_counter()
            generations = roles.generate([p["prompt_ids"] for p in batch_prompts], ro.sampling, seed=t.seed * 100003 + it)
            samples = [{"kind": "rollouts", "prompt_ids": p["prompt_ids"], "response_ids": g["response_ids"] or [tokenizer.eos_token_id],
                        "rollout_logps": g["logprobs"],
                        "prompt_text": p["prompt_text"], "row": p["row"], "finish_reason": g["finish_reason"]}
                       for p, gens in zip(batch_prompts, generations) for g in gens]
            timings["generate"] = time.perf_counter() - start

            start = time.perf_counter()
            texts = tokenizer.batch_decode([s["response_ids"] for s in samples], skip_special_tokens=True)
            totals, components = rewards([s["prompt_text"] for s in samples], texts, [s["row"] for s in samples])
            raw = list(totals)
            totals = shape_sequence_rewards(totals, params, normalizer)
            for s, v in zip(samples, totals):
                s["reward"] = v
            if process_rewards is not None:
                per_token, process_stats = process_rewards(
                    [s["prompt_text"] for s in samples], [s["response_ids"] for s in samples],
                    [s["row"] for s in samples])
                for s, v in zip(samples, per_token):
                    s["process_rewards"] = v
                stats.update(process_stats)
            timings["reward"] = time.perf_counter() - start

            start = time.perf_counter()
            micro = t.micro_batch_size
            if roles.references:
                from prefopt.roles.group import run_sharded
                ref = run_sharded(roles.references, "compute_token_logps", samples, micro, roles.timeout)
                for s, v in zip(samples, [x for m in ref for x in m]):
                    s["ref_logps"] = v
            timings["reference"] = time.perf_counter() - start
            start = time.perf_counter()
            old = roles.policy.infer("compute_token_values", samples, micro)
            for s, v in zip(samples, [x for m in old for x in m]):
                s["old_logps"] = v
            if roles.critic is not None:
                vals = roles.critic.infer("compute_token_values", samples, micro)
                for s, v in zip(samples, [x for m in vals for x in m]):
                    s["values"] = v
            stats.update(compute_advantages(samples, params, group))
            # engine vs learner log-probs of the sampled tokens: ~0 when weights are in sync
            diffs = [abs(a - b) for s in samples for a, b in zip(s["rollout_logps"], s["old_logps"])]
            stats["rollout/logp_abs_diff"] = max(diffs) if diffs else 0.0
            policy_stats, critic_stats = [], []
            for epoch in range(params.ppo_epochs):
                # shuffle whole samples; mini-batches of train.batch_size samples
                perm = list(range(len(samples)))
                random.Random(f"{t.seed}-{it}-{epoch}").shuffle(perm)
                for b in range(0, len(perm) - t.batch_size + 1, t.batch_size):
                    mb = [samples[i] for i in perm[b:b + t.batch_size]]
                    policy_stats += roles.policy.train_step(mb, micro, what=f"policy step (iteration {it})")
                    if roles.critic is not None:
                        critic_stats += roles.critic.train_step(mb, micro, what=f"critic step (iteration {it})")
                    result.steps += 1
            timings["learn"] = time.perf_counter() - start
            timings["sync"] = roles.sync_weights(version=it)

            lengths = [len(s["response_ids"]) for s in samples]
            stats.update({"reward/mean": sum(raw) / len(raw),
                          "reward/std": float(torch.tensor(raw).std()) if len(raw) > 1 else 0.0,
                          "response_length": sum(lengths) / len(lengths),
                          "tokens_per_s": sum(lengths) / max(timings["generate"], 1e-9)})
            for name, values in components.items():
                stats[f"reward/{name}"] = sum(values) / len(values)
            stats.update(means(merge_summaries(policy_stats)))
            stats["grad_norm"] = policy_stats[-1]["grad_norm"] if policy_stats else math.nan
            stats["lr"] = policy_stats[-1]["lr"] if policy_stats else math.nan
            if critic_stats:
                critic_means = means(merge_summaries(critic_stats))
                stats.update({k: v for k, v in critic_means.items() if k.startswith("critic/")})
                stats["critic/value_loss"] = critic_means["loss"]
                stats["critic/grad_norm"] = critic_stats[-1]["grad_norm"]
            stats.update({f"time/{k}": v for k, v in timings.items()})
            result.train_history.append({"iteration": it, **stats})
            logger.log(it, stats)
            progress.update(1)
            progress.set_postfix(reward=f"{stats['reward/mean']:.3f}")
        progress.close()
        result.final_train = result.train_history[-1] if result.train_history else {}
        if ro.verify_sync_prompts > 0:
            check = verify_sync(roles, [p["prompt_ids"] for p in prompts[:ro.verify_sync_prompts]], ro.sampling)
            result.final_train.update(check)
            logger.log(t.iterations, check, prefix="sync_check")
        if r.output.save_model:
            model_dir = run_dir / "model"
            roles.policy.call("save_model", [(str(model_dir),)] * len(roles.policy), what="save model")
            tokenizer.save_pretrained(str(model_dir))
        summary = {"name": r.name, "objective": "ppo", "advantage": params.advantage, "iterations": t.iterations,
                   "steps": result.steps, "reward_first": result.train_history[0]["reward/mean"],
                   "reward_final": result.final_train.get("reward/mean"), "run_dir": str(run_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return result
    finally:
        logger.close()
        release(roles, started_ray)
