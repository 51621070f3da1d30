"""Offline preference optimization (DPO, cDPO, IPO, SimPO, LiPO-λ, ListMLE) on fixed data.

The algorithm box:

1. (once) reference log-probs of every example, from the learner group before training or from
   reference actors — cached in the examples, never recomputed in a step;
2. for each global batch: every learner takes its shard, accumulates gradients over its
   micro-batches, DeepSpeed all-reduces and steps;
3. evaluate on the held-out split at the start, every ``train.eval_every`` steps and at the end.

A step is one optimizer step. When nothing runs between two steps, the next one is queued on the
learners behind the running one (no driver round trip between them).
"""
from __future__ import annotations

import math
import time

from prefopt.algorithms import register_algorithm
from prefopt.data import batching
from prefopt.metrics import means, merge_summaries
from prefopt.roles.spec import RoleSpec
from prefopt.run import Algorithm


class OfflineRoles:
    """The actors of an offline run: the policy learner group and optional reference actors."""
    critic = None

    def __init__(self, recipe, pad_id: int, spec):
        import ray

        from prefopt.roles.group import LearnerGroup

        self.timeout = recipe.ray.call_timeout_s
        self.policy = LearnerGroup(recipe, spec.policy)
        self.references = []
        ref = spec.reference
        if ref is not None:
            from prefopt.roles.reference import ReferenceWorker
            rcls = ray.remote(num_cpus=ref.num_cpus, num_gpus=ref.num_gpus)(ReferenceWorker)
            self.references = [rcls.remote(recipe, pad_id) for _ in range(ref.num_actors)]

    def shutdown(self) -> None:
        import ray
        for actor in self.references:
            ray.kill(actor)
        self.policy.kill()


def cache_reference_logps(roles: OfflineRoles, examples: list[dict], micro: int | batching.Budget) -> None:
    """Attach ``ref_logps`` (one per response) to every example, computed once."""
    from prefopt.roles.group import run_sharded
    if roles.references:
        per_micro = run_sharded(roles.references, "compute_logps", examples, micro, roles.timeout)
    else:   # the learners before their first update (with LoRA: adapters disabled, the base model)
        per_micro = run_sharded(roles.policy.actors, "compute_reference_logps", examples, micro, roles.timeout)
    flat = [logps for micro_out in per_micro for logps in micro_out]
    assert len(flat) == len(examples), (len(flat), len(examples))
    for ex, logps in zip(examples, flat):
        ex.ref_logps = logps


def evaluate(roles: OfflineRoles, examples: list[dict], micro) -> dict[str, float]:
    return means(merge_summaries(roles.policy.infer("evaluate", examples, micro)))


@register_algorithm
class PreferenceOptimization(Algorithm):
    name = "preference"
    unit = "step"

    def __init__(self, run):
        super().__init__(run)
        pre, t = run.pre, self.recipe.train
        self.objective_cls, self.data, self.batches = pre.objective_cls, pre.data, pre.steps
        self.train_micro, self.infer_micro = batching.train_micro(self.recipe), batching.inference_micro(self.recipe)
        self.grad_accum = t.batch_size // (t.micro_batch_size * self.recipe.roles.learner.num_actors)
        self.queued: dict[int, list] = {}   # step -> learner calls submitted while the step before ran
        self.last_done = None

    @classmethod
    def role_spec(cls, recipe) -> RoleSpec:
        """The policy learners; reference actors when the objective needs a reference and the recipe
        places it on actors (``roles.reference.placement: actor``; else the learners compute it)."""
        from prefopt.objectives import get_objective
        ref = recipe.roles.reference
        needs_ref = "reference" in get_objective(recipe.objective.name).needs
        return RoleSpec(policy=recipe.roles.learner,
                        reference=ref if needs_ref and ref is not None and ref.placement == "actor" else None)

    def build_roles(self):
        return OfflineRoles(self.recipe, self.run.tokenizer.pad_token_id, self.run.spec)

    def setup(self) -> list[dict]:
        from prefopt.cluster import remote_get
        info = self.roles.policy.setup(total_steps=len(self.batches), grad_accum=self.grad_accum,
                                       pad_id=self.run.tokenizer.pad_token_id)
        return info + remote_get([a.node_info.remote() for a in self.roles.references], self.roles.timeout,
                                 "reference.node_info")

    def start(self) -> None:
        """The reference pass sees the initial weights: before a checkpoint is restored."""
        if "reference" not in self.objective_cls.needs:
            return
        from prefopt import console
        examples = self.data.train + self.data.eval
        console.status(f"computing reference log-probs of {len(examples)} examples")
        start = time.perf_counter()
        cache_reference_logps(self.roles, examples, self.infer_micro)
        self.run.result.reference_time_s = time.perf_counter() - start
        self.run.logger.log(0, {"time_s": self.run.result.reference_time_s, "examples": len(examples)},
                            prefix="reference")

    def resumed(self, resumed: bool) -> None:
        if not resumed:
            self._evaluate(0)

    def total_units(self) -> int:
        return len(self.batches)

    def step(self, step: int, *, next_follows: bool) -> tuple[dict[str, float], int]:
        t = self.recipe.train
        start = time.perf_counter()
        was_queued = step in self.queued
        refs = self.queued.pop(step) if was_queued else self._submit(step)
        evaluate_now = bool(t.eval_every) and step % t.eval_every == 0 and step != len(self.batches)
        if next_follows and not evaluate_now:
            self.queued[step + 1] = self._submit(step + 1)
        per_learner = self.roles.policy.collect(refs, f"train step {step}")
        now = time.perf_counter()
        elapsed = now - (self.last_done if was_queued else start)   # a queued step started when the last ended
        self.last_done = now
        first = per_learner[0]
        stats = self.derived(means(merge_summaries(per_learner)))
        stats.update(grad_norm=first["grad_norm"], lr=first["lr"], skipped=first["skipped"],
                     micro_batches=first["micro_batches"],
                     peak_memory_mb=max(p["peak_memory_mb"] for p in per_learner),
                     epoch=(step - 1) * t.batch_size / len(self.data.train),
                     tokens_per_s=sum(p["tokens"] for p in per_learner) / elapsed,
                     examples_per_s=t.batch_size / elapsed, step_time_s=elapsed)
        self.guard.check(stats, step, self.batches[step - 1])
        if evaluate_now:
            self._evaluate(step)
        return stats, 1

    def derived(self, stats: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the learners' means (train steps and evaluations alike)."""
        return stats

    def in_flight(self, step: int) -> bool:
        return step in self.queued

    def postfix(self, stats: dict) -> dict[str, str]:
        acc = stats.get(self.objective_cls.accuracy_metric, math.nan)
        return {"loss": f"{stats['loss']:.4f}", "acc": f"{acc:.3f}"}

    def finish(self) -> None:
        self._evaluate(len(self.batches))

    def summary(self) -> dict:
        result, acc = self.run.result, self.objective_cls.accuracy_metric
        first, last = result.eval_history[0], result.eval_history[-1]
        train_time = sum(h["step_time_s"] for h in result.train_history)
        return {
            "steps": result.steps, "train_examples": len(self.data.train), "eval_examples": len(self.data.eval),
            "skipped_rows": self.data.num_skipped, "final_train_loss": result.final_train.get("loss"),
            "accuracy_metric": acc, "eval_accuracy_start": first.get(acc), "eval_accuracy_final": last.get(acc),
            "eval_loss_final": last.get("loss"), "reference_time_s": result.reference_time_s,
            "train_time_s": train_time, "peak_memory_mb": max(h["peak_memory_mb"] for h in result.train_history),
            "examples_per_s": result.steps * self.recipe.train.batch_size / (train_time + result.reference_time_s),
        }

    # ------------------------------------------------------------------------------------------
    def _submit(self, step: int) -> list:
        """Start optimizer step ``step`` (1-based) on the learners; ``policy.collect`` waits for it."""
        examples = [self.data.train[i] for i in self.batches[step - 1]]
        return self.roles.policy.submit_train_step(examples, self.train_micro, sort_by_length=True,
                                                   inject_nan=step in self.recipe.train.debug_nan_steps)

    def _evaluate(self, step: int) -> None:
        record = {"step": step, **self.derived(evaluate(self.roles, self.data.eval, self.infer_micro))}
        self.run.result.eval_history.append(record)
        self.run.logger.log(step, {k: v for k, v in record.items() if k != "step"}, prefix="eval")
