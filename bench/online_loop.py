"""Part 2 of ``bench/online.py``: ``prefopt.train (online PPO)`` on ``recipes/tiny_grpo.yaml`` (worker
``online.py --worker loop``) and the per-iteration time-split table. Rows with a ``recipe`` run that
recipe of the 20m assets (``online_20m.py``: GRPO and online DPO on a ~20M-parameter model) instead.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from online_common import REPO, _load

# Part 2: the real loop. tiny: recipes/tiny_grpo.yaml as shipped (plus iterations / output settings).
LOOP = {
    "tiny": dict(label="tiny-llama, tiny_grpo.yaml", iterations=20, overrides=[]),
    "tiny-async": dict(label="tiny-llama, tiny_grpo.yaml, train.async_rollouts", iterations=20,
                       overrides=["train.async_rollouts=true"]),
    "tiny-async-rollout": dict(label="tiny-llama, tiny_grpo.yaml, async_rollouts + old_logprobs=rollout",
                               iterations=20, overrides=["train.async_rollouts=true", "objective.old_logprobs=rollout"]),
    "100m": dict(label="llama-100m, 8 prompts x 4, 32 tokens", iterations=3, overrides=[
        "model.path=builtin:llama-100m", "train.prompts_per_iteration=8", "roles.rollout.sampling.n=4",
        "roles.rollout.sampling.max_tokens=32", "train.batch_size=16", "train.micro_batch_size=8",
        "train.lr=1.0e-5"]),
    # the 20m part (online_20m.py): recipes built with its assets ("assets" is filled in by the driver)
    "20m": dict(label="llama-20m GRPO: grpo.yaml (synchronous, old log-probs from the learner)", iterations=10,
                recipe="grpo.yaml", overrides=[]),
    "20m-rollout": dict(label="llama-20m GRPO: grpo.yaml + objective.old_logprobs=rollout", iterations=10,
                        recipe="grpo.yaml", overrides=["objective.old_logprobs=rollout"]),
    "20m-async": dict(label="llama-20m GRPO: grpo.yaml + async_rollouts + old_logprobs=rollout", iterations=10,
                      recipe="grpo.yaml", overrides=["train.async_rollouts=true", "objective.old_logprobs=rollout"]),
    "online-dpo-20m": dict(label="llama-20m online DPO: online_dpo.yaml (synchronous)", iterations=10,
                           recipe="online_dpo.yaml", overrides=[]),
    "online-dpo-20m-async": dict(label="llama-20m online DPO: online_dpo.yaml + train.async_rollouts", iterations=10,
                                 recipe="online_dpo.yaml", overrides=["train.async_rollouts=true"]),
}
LOOP_QUICK = {"tiny": dict(iterations=6)}


def loop_worker(cfg: dict) -> dict:
    """Part 2: prefopt.train (online PPO); iteration wall time from metric-log timestamps."""
    import prefopt.io.run_dir as run_dir
    from prefopt.config import load_recipe
    from prefopt.train import train

    stamps = []

    class StampedLogger(run_dir.MetricsLogger):
        def log(self, step, metrics, prefix="train"):
            if prefix == "train":
                stamps.append(time.perf_counter())
            return super().log(step, metrics, prefix)

    run_dir.MetricsLogger = StampedLogger      # the lifecycle (prefopt.run) looks it up at run time
    spec = cfg["spec"]
    overrides = list(spec["overrides"]) + [
        f"name=bench-{cfg['id']}", f"train.iterations={spec['iterations']}", f"output.root={cfg['tmp']}",
        "output.save_model=false", "output.loggers=[]", "output.progress_bar=false"]
    recipe = load_recipe(Path(spec["assets"]) / spec["recipe"] if spec.get("recipe")
                         else REPO / "recipes" / "tiny_grpo.yaml", overrides)
    t0 = time.perf_counter()
    result = train(recipe, quiet=True)
    total = time.perf_counter() - t0
    hist = result.train_history
    keys = sorted({k for h in hist for k in h if k.startswith("time/")})
    walls = [b - a for a, b in zip(stamps, stamps[1:])]            # iterations 2..N
    timed = hist[1:]
    split = {k[5:]: statistics.mean(h[k] for h in timed) for k in keys}
    wall = statistics.mean(walls)
    r, ro = recipe.train, recipe.roles.rollout
    samples = r.prompts_per_iteration * ro.sampling.n
    first_iter = sum(hist[0][k] for k in keys)
    return {
        "iterations": len(hist), "timed_iterations": len(walls), "samples_per_iteration": samples,
        "split_s": split, "other_s": wall - sum(split.values()), "iteration_s": wall,
        "iteration_s_all": walls, "samples_per_s": samples / wall,
        "samples_per_s_median": samples / statistics.median(walls),
        "response_length": statistics.mean(h["response_length"] for h in timed),
        "gen_tokens_per_s": statistics.mean(h["tokens_per_s"] for h in timed),
        # the engines' own generation seconds per iteration (tokens_per_s = tokens / this; under async
        # rollouts time/generate is only the driver's wait for the prefetched batch)
        "engine_generate_s": statistics.mean(h.get("engine_generate_s", float("nan")) for h in timed),
        "startup_s": stamps[0] - t0 - first_iter, "total_s": total,
        "reward_first": hist[0]["reward/mean"], "reward_last": hist[-1]["reward/mean"],
        "recipe": {"model": recipe.model.path, "prompts_per_iteration": r.prompts_per_iteration,
                   "n": ro.sampling.n, "max_tokens": ro.sampling.max_tokens, "batch_size": r.batch_size,
                   "micro_batch_size": r.micro_batch_size, "lr": r.lr, "objective": recipe.objective.name,
                   "kl_coef": getattr(recipe.objective, "kl_coef", None), "beta": getattr(recipe.objective, "beta", None),
                   "ppo_epochs": getattr(recipe.objective, "ppo_epochs", None),
                   "old_logprobs": getattr(recipe.objective, "old_logprobs", None),
                   "async_rollouts": r.async_rollouts, "min_tokens": ro.sampling.min_tokens,
                   "ignore_eos": ro.sampling.ignore_eos, "zero_stage": recipe.roles.learner.zero_stage},
        "tied_groups": sum(h.get("data/tied_groups", 0) for h in timed),
    }


SPLIT_KEYS = ("generate", "reward", "reference", "old_logps", "values", "learn", "sync")


def loop_table(results: dict) -> str:
    lines = ["| model / settings | samples / iteration | timed iterations | " + " | ".join(f"{k} s" for k in SPLIT_KEYS)
             + " | other s | iteration s | samples/s | gen tokens/s | engine gen s | start-up s | other load |",
             "|" + "---|" * (10 + len(SPLIT_KEYS))]
    for key, r in results.items():
        sp = r["split_s"]
        tot = r["iteration_s"]
        cells = " | ".join(f"{sp.get(k, 0.0):.3f} ({100 * sp.get(k, 0.0) / tot:.0f}%)" for k in SPLIT_KEYS)
        lines.append(f"| {LOOP[key]['label']} | {r['samples_per_iteration']} | {r['timed_iterations']} | {cells} "
                     f"| {r['other_s']:.3f} | {tot:.3f} | **{r['samples_per_s']:.1f}** | {r['gen_tokens_per_s']:,.0f} "
                     f"| {r.get('engine_generate_s', float('nan')):.3f} | {r['startup_s']:.0f} | {_load(r)} |")
    return "\n".join(lines)
