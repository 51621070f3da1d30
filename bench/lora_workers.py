"""Worker side of ``bench/lora.py``: one row = one ``prefopt.train`` run in its own process
(``bench/lora.py --worker CONFIG``), and the reading of its results (``derive``).

The worker stamps each logged unit (the lifecycle's ``MetricsLogger``, wrapped like
``online_loop.py`` does) and, right after the embedded Ray cluster starts, runs one zero-CPU task
that reports which ``prefopt`` a Ray worker process of this cluster imports (the venv's editable
install points elsewhere; ``PYTHONPATH`` must win in the actors too). Peak memory is not measured
here: the parent polls the actors' ``/proc/<pid>/status`` (``lora.py: MemoryMonitor``).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPLIT = ("generate", "reward", "reference", "ref_logps", "old_logps", "learn", "sync")   # ref_logps: on the learner (LoRA)


def worker(cfg: dict) -> dict:
    import prefopt
    import prefopt.cluster as cluster
    import prefopt.io.run_dir as run_dir
    from prefopt.config import load_recipe
    from prefopt.train import train

    stamps: list[float] = []

    class StampedLogger(run_dir.MetricsLogger):
        def log(self, step, metrics, prefix="train"):
            if prefix == "train":
                stamps.append(time.perf_counter())
            return super().log(step, metrics, prefix)

    probe: dict = {}
    init_ray_for = cluster.init_ray_for

    def init_and_probe(*args, **kwargs):
        started = init_ray_for(*args, **kwargs)
        import ray

        @ray.remote(num_cpus=0)
        def where() -> dict:
            import os
            import sys

            import prefopt as p
            return {"prefopt": p.__file__, "pid": os.getpid(), "pythonpath": os.environ.get("PYTHONPATH"),
                    "sys_path_head": sys.path[:4]}
        try:
            probe.update(ray.get(where.remote(), timeout=120))
        except Exception as e:           # the probe is evidence, not part of the row
            probe["error"] = repr(e)
        return started

    run_dir.MetricsLogger = StampedLogger     # the lifecycle (prefopt.run) looks both up at run time
    cluster.init_ray_for = init_and_probe
    recipe = load_recipe(REPO / "recipes" / cfg["recipe"], cfg["overrides"])
    t0 = time.perf_counter()
    result = train(recipe, quiet=True)
    total = time.perf_counter() - t0
    rd = Path(result.run_dir)
    return {"driver_prefopt": prefopt.__file__, "actor_probe": probe, "total_s": total,
            "stamps_s": [s - t0 for s in stamps], "history": result.train_history, "eval": result.eval_history,
            "final_train": result.final_train, "summary": json.loads((rd / "summary.json").read_text()),
            "placement": json.loads((rd / "placement.json").read_text()), "run_dir": str(rd)}


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else float("nan")


def derive(row: dict, res: dict) -> dict:
    """The measured numbers of one row from its worker result (unit 1 is warm-up, excluded)."""
    hist = res["history"]
    timed = hist[1:]
    if row["algo"] == "dpo":
        steps = [h["step_time_s"] for h in timed]
        return {"units": len(hist), "timed_units": len(timed), "pairs_per_s": row["batch"] * len(steps) / sum(steps),
                "median_step_s": statistics.median(steps), "step_s_all": [h["step_time_s"] for h in hist],
                "reference_pass_s": res["summary"].get("reference_time_s"),
                "learner_peak_mb_self": res["summary"].get("peak_memory_mb"),
                "loss_first": hist[0].get("loss"), "loss_last": hist[-1].get("loss")}
    walls = [b - a for a, b in zip(res["stamps_s"], res["stamps_s"][1:])]     # iterations 2..N
    wall = statistics.mean(walls)
    split = {k: _mean(h.get(f"time/{k}") for h in timed) for k in SPLIT if any(f"time/{k}" in h for h in timed)}
    return {"units": len(hist), "timed_units": len(walls), "samples_per_iteration": row["samples"],
            "iteration_s": wall, "iteration_s_all": walls, "samples_per_s": row["samples"] / wall,
            "split_s": split, "other_s": wall - sum(split.values()),
            "sync_s_all": [h.get("time/sync") for h in hist],
            "engine_generate_s": _mean(h.get("engine_generate_s") for h in timed),
            "gen_tokens_per_s": _mean(h.get("tokens_per_s") for h in timed),
            # iteration 1 samples the initial weights (lora_sync adapter: no adapter yet, the base model)
            "gen_tokens_per_s_first": hist[0].get("tokens_per_s"),
            "response_length": _mean(h.get("response_length") for h in timed),
            # engine vs learner log-probs of the sampled tokens after each sync (~0: the engine samples the
            # current policy), against the policy's distance from the reference (kl): is the check telling?
            "logp_abs_diff_max": max((h.get("rollout/logp_abs_diff", float("nan")) for h in timed), default=float("nan")),
            "kl_last": hist[-1].get("kl"), "reward_first": hist[0].get("reward/mean"),
            "reward_last": hist[-1].get("reward/mean"),
            "startup_s": res["stamps_s"][0] - sum(v for k, v in hist[0].items() if k.startswith("time/"))}
