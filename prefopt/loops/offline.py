"""The offline preference-optimization driver (DPO, SimPO, IPO, LiPO, ListMLE).

Reads top to bottom like the algorithm:

1. validate the recipe and the data (tokenize every row) — before Ray starts;
2. start/join Ray, place ``num_actors`` learner actors, join them into one process group;
3. cache reference log-probs once (learner group or reference actors), if the objective needs them;
4. for each global batch: every learner takes its shard, accumulates gradients over its
   micro-batches and DeepSpeed all-reduces and steps; log metrics;
5. evaluate on the held-out split at the start, every ``eval_every`` steps and at the end;
6. save the final model (HF format, safetensors) and a summary.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefopt.cluster import release
from prefopt.config_schema import Recipe
from prefopt.io.plots import write_curves
from prefopt.io.run_dir import MetricsLogger
from prefopt.data import batching
from prefopt.metrics import means, merge_summaries


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_train: dict
    eval_history: list[dict] = field(default_factory=list)
    train_history: list[dict] = field(default_factory=list)
    reference_time_s: float = 0.0

    @property
    def final_eval(self) -> dict:
        return self.eval_history[-1] if self.eval_history else {}


class Roles:
    """The Ray actors of an offline run: the learner group and optional reference actors."""

    def __init__(self, recipe: Recipe, pad_id: int):
        import ray

        from prefopt.roles.group import LearnerGroup

        self.timeout = recipe.ray.call_timeout_s
        self.learners = LearnerGroup(recipe, recipe.roles.learner)
        self.references = []
        ref = recipe.roles.reference
        if ref is not None and ref.placement == "actor":
            from prefopt.roles.reference import ReferenceWorker
            rcls = ray.remote(num_cpus=ref.num_cpus, num_gpus=ref.num_gpus)(ReferenceWorker)
            self.references = [rcls.remote(recipe, pad_id) for _ in range(ref.num_actors)]

    def shutdown(self) -> None:
        import ray
        for actor in self.references:
            ray.kill(actor)
        self.learners.kill()


def cache_reference_logps(roles: Roles, examples: list[dict], micro: int | batching.Budget) -> None:
    """Attach ``ref_logps`` (one per response) to every example, computed once."""
    from prefopt.roles.group import run_sharded
    workers = roles.references or roles.learners.actors
    per_micro = run_sharded(workers, "compute_logps", examples, micro, roles.timeout)
    flat = [logps for micro_out in per_micro for logps in micro_out]
    assert len(flat) == len(examples), (len(flat), len(examples))
    for ex, logps in zip(examples, flat):
        ex["ref_logps"] = logps


def evaluate(roles: Roles, examples: list[dict], micro: int) -> dict[str, float]:
    return means(merge_summaries(roles.learners.infer("evaluate", examples, micro)))


def train(recipe: Recipe, *, quiet: bool = False) -> RunResult:
    """Run an offline recipe end to end. Returns the run's metrics and directory."""
    from prefopt import console
    from prefopt.preflight import open_run_dir, prepare

    pre = prepare(recipe)        # every check, before Ray starts and before the run folder exists
    objective_cls, tokenizer, data, steps = pre.objective_cls, pre.tokenizer, pre.data, pre.steps
    for ex in data.train + data.eval:
        ex["kind"] = data.kind
    t, lr_cfg = recipe.train, recipe.roles.learner
    grad_accum = t.batch_size // (t.micro_batch_size * lr_cfg.num_actors)
    train_micro, infer_micro = batching.train_micro(recipe), batching.inference_micro(recipe)
    run_dir, resume_from = open_run_dir(pre)
    logger = MetricsLogger(run_dir, tensorboard=recipe.output.tensorboard)

    from prefopt.cluster import init_ray_for
    started_ray = init_ray_for(recipe)
    roles = None
    stack = contextlib.ExitStack()
    try:
        from prefopt.cluster import check_cluster_resources
        check_cluster_resources(recipe)
        roles = Roles(recipe, tokenizer.pad_token_id)
        info = roles.learners.setup(total_steps=len(steps), grad_accum=grad_accum, pad_id=tokenizer.pad_token_id)
        (run_dir / "placement.json").write_text(json.dumps(info, indent=1))
        result = RunResult(run_dir=run_dir, steps=len(steps), final_train={})
        if "reference" in objective_cls.needs:
            console.status(f"computing reference log-probs of {len(data.train) + len(data.eval)} examples")
            start = time.perf_counter()
            cache_reference_logps(roles, data.train + data.eval, infer_micro)
            result.reference_time_s = time.perf_counter() - start
            logger.log(0, {"time_s": result.reference_time_s,
                           "examples": len(data.train) + len(data.eval)}, prefix="reference")
        done = 0
        if resume_from is not None:   # after the reference pass: that must see the initial weights
            from prefopt.loops import checkpointing
            done = checkpointing.restore(resume_from, roles, {})["counter"]
            result.train_history = checkpointing.history(run_dir, "train", "step")
            result.eval_history = checkpointing.history(run_dir, "eval", "step")
        else:
            result.eval_history.append({"step": 0, **evaluate(roles, data.eval, infer_micro)})
            logger.log(0, result.eval_history[-1], prefix="eval")

        progress = _progress(len(steps), recipe, quiet)
        progress.update(done)
        from prefopt.loops.guards import SkipGuard
        guard = SkipGuard(t.max_skipped_steps)
        from prefopt.loops.checkpointing import Checkpointer, StopRequest
        stop = stack.enter_context(StopRequest())
        ckpt = Checkpointer(run_dir, roles, recipe.output, tokenizer=tokenizer)
        queued: dict[int, list] = {}      # step -> learner calls submitted while the step before ran
        last_done = None
        for step, indices in enumerate(steps, start=1):
            if step <= done:
                continue
            if stop.requested and step not in queued:
                ckpt.stop_now(stop, f"step_{step - 1:06d}", step - 1)
            start = time.perf_counter()
            was_queued = step in queued
            refs = queued.pop(step) if was_queued else _submit_step(roles, data, steps, step, train_micro, t)
            evaluate_now = bool(t.eval_every) and step % t.eval_every == 0 and step != len(steps)
            save_now = ckpt.due(step, len(steps))
            if step < len(steps) and not (evaluate_now or save_now or stop.requested):
                # nothing runs on the learners between this step and the next: queue it behind this one
                queued[step + 1] = _submit_step(roles, data, steps, step + 1, train_micro, t)
            per_learner = roles.learners.collect(refs, f"train step {step}")
            now = time.perf_counter()
            elapsed = now - (last_done if was_queued else start)   # a queued step started when the last ended
            last_done = now
            stats = means(merge_summaries(per_learner))
            stats.update(grad_norm=per_learner[0]["grad_norm"], lr=per_learner[0]["lr"], skipped=per_learner[0]["skipped"],
                         micro_batches=per_learner[0]["micro_batches"],
                         peak_memory_mb=max(p["peak_memory_mb"] for p in per_learner),
                         epoch=(step - 1) * t.batch_size / len(data.train),
                         tokens_per_s=sum(p["tokens"] for p in per_learner) / elapsed,
                         examples_per_s=t.batch_size / elapsed, step_time_s=elapsed)
            guard.check(stats, step, indices)
            result.train_history.append({"step": step, **stats})
            if step % t.log_every == 0 or step == len(steps):
                logger.log(step, stats)
            if evaluate_now:
                result.eval_history.append({"step": step, **evaluate(roles, data.eval, infer_micro)})
                logger.log(step, result.eval_history[-1], prefix="eval")
            if save_now:
                ckpt.save(f"step_{step:06d}", step)
            progress.update(1)
            progress.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats.get(objective_cls.accuracy_metric, math.nan):.3f}")
        progress.close()
        result.eval_history.append({"step": len(steps), **evaluate(roles, data.eval, infer_micro)})
        logger.log(len(steps), result.eval_history[-1], prefix="eval")
        result.final_train = result.train_history[-1]

        if recipe.output.save_model:
            model_dir = run_dir / "model"
            roles.learners.call("save_model", [(str(model_dir),)] * lr_cfg.num_actors, what="save model")
            tokenizer.save_pretrained(str(model_dir))
        _write_summary(result, recipe, objective_cls.accuracy_metric, len(data.train), len(data.eval),
                       data.num_skipped)
        return result
    finally:
        stack.close()
        logger.close()
        write_curves(run_dir, best_effort=True)
        release(roles, started_ray)


def _submit_step(roles: Roles, data, steps: list[list[int]], step: int, micro, t) -> list:
    """Start optimizer step ``step`` (1-based) on the learners; ``roles.learners.collect`` waits for it."""
    examples = [data.train[i] for i in steps[step - 1]]
    return roles.learners.submit_train_step(examples, micro, sort_by_length=True,
                                            inject_nan=step in t.debug_nan_steps)


def _progress(total: int, recipe: Recipe, quiet: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=recipe.name, unit="step", disable=quiet or not recipe.output.progress_bar)


def _write_summary(result: RunResult, recipe: Recipe, accuracy_metric: str, n_train: int, n_eval: int,
                   n_skipped: int) -> None:
    first, last = result.eval_history[0], result.eval_history[-1]
    summary = {
        "name": recipe.name, "objective": recipe.objective.name, "steps": result.steps,
        "train_examples": n_train, "eval_examples": n_eval, "skipped_rows": n_skipped,
        "final_train_loss": result.final_train.get("loss"),
        "accuracy_metric": accuracy_metric,
        "eval_accuracy_start": first.get(accuracy_metric), "eval_accuracy_final": last.get(accuracy_metric),
        "eval_loss_final": last.get("loss"), "run_dir": str(result.run_dir),
        "reference_time_s": result.reference_time_s,
        "train_time_s": sum(h["step_time_s"] for h in result.train_history),
        "peak_memory_mb": max(h["peak_memory_mb"] for h in result.train_history),
    }
    summary["examples_per_s"] = (result.steps * recipe.train.batch_size
                                 / (summary["train_time_s"] + summary["reference_time_s"]))
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
