"""One run lifecycle for every algorithm.

:func:`run` owns what every run shares, in this order::

    pre-flight (every check, before Ray)  →  run folder, config.yaml, metrics logger
    → Ray (embedded or joined) → resource check → the algorithm's roles → placement.json
    → algorithm.start (e.g. the reference pass) → restore a checkpoint (resume) → algorithm.resumed
    → units (optimizer steps or iterations): stop request / unit / log / guard / checkpoint
    → algorithm.finish (e.g. the final evaluation) → the final model → summary.json
    → (always) curves.png, actors released, Ray stopped if this run started it

An algorithm (:mod:`prefopt.algorithms`) owns only what makes it that algorithm: its roles, one
unit of work, its driver state for checkpoints and its summary.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from prefopt.config_schema import Recipe


@dataclass
class RunResult:
    run_dir: Path
    steps: int                                           # optimizer steps
    final_train: dict
    eval_history: list[dict] = field(default_factory=list)
    train_history: list[dict] = field(default_factory=list)
    reference_time_s: float = 0.0

    @property
    def final_eval(self) -> dict:
        return self.eval_history[-1] if self.eval_history else {}


@dataclass
class Run:
    """What an algorithm sees of its run."""
    recipe: Recipe
    pre: object                     # preflight.Prepared: tokenizer, data or prompts
    run_dir: Path
    logger: object                  # io.run_dir.MetricsLogger
    result: RunResult
    spec: object = None             # roles.spec.RoleSpec: the actors the run starts
    quiet: bool = False

    @property
    def tokenizer(self):
        return self.pre.tokenizer


class Algorithm:
    """A training algorithm on the shared lifecycle. Subclasses set ``name`` and ``unit`` and
    implement :meth:`build_roles`, :meth:`setup`, :meth:`total_units`, :meth:`step` and
    :meth:`summary`; the other hooks have defaults."""
    name: ClassVar[str]
    unit: ClassVar[str] = "step"                 # "step" | "iteration": metrics counter, checkpoint names
    reads: ClassVar[str] = "examples"            # "examples" (fixed data) | "prompts" (online: it samples)

    def __init__(self, run: Run):
        self.run, self.recipe = run, run.recipe
        self.roles = None
        self.guard = None            # loops.guards.SkipGuard, set by the lifecycle before the units

    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Checks across the algorithm and the recipe (run by ``config.validate_recipe``); raise ConfigError.
        An algorithm on fixed data refuses the keys of online runs instead of ignoring them."""
        if cls.reads != "examples":
            return
        from prefopt.errors import ConfigError
        t = recipe.train
        for key, set_ in (("dynamic_sampling", t.dynamic_sampling), ("min_reward_gap", t.min_reward_gap != 0),
                          ("sample_log_every", t.sample_log_every != 0)):
            if set_:
                raise ConfigError(f"train.{key} applies to online runs (a recipe with roles.rollout); objective "
                                  f"'{recipe.objective.name}' here trains on fixed data")

    # roles ---------------------------------------------------------------------------------
    @classmethod
    def role_spec(cls, recipe):
        """The actors a run of ``recipe`` starts (``roles.spec.RoleSpec``): the one place that decides
        it, read by the resource checks, the embedded cluster's size and :meth:`build_roles`."""
        raise NotImplementedError

    def build_roles(self):
        """Create the run's actors; the object has ``policy`` (a LearnerGroup), ``critic`` (or None)
        and ``shutdown()``."""
        raise NotImplementedError

    def setup(self) -> list[dict]:
        """Set up the actors (process groups, engines); returns ``placement.json``'s records."""
        raise NotImplementedError

    def driver_state(self) -> dict:
        """Driver objects with ``state_dict`` / ``load_state_dict`` saved in checkpoints."""
        return {}

    # the run -------------------------------------------------------------------------------
    def start(self) -> None:
        """Before a checkpoint is restored (so it sees the initial weights)."""

    def resumed(self, resumed: bool) -> None:
        """After the checkpoint (if any) is restored, before the first unit."""

    def total_units(self) -> int:
        raise NotImplementedError

    def step(self, unit: int, *, next_follows: bool) -> tuple[dict[str, float], int]:
        """One unit of work (1-based); returns its metrics and the optimizer steps it took.
        ``next_follows``: the next unit runs right after this one (nothing else in between)."""
        raise NotImplementedError

    def in_flight(self, unit: int) -> bool:
        """Whether ``unit`` already runs on the actors (queued behind the one before): a stop request
        then waits for it."""
        return False

    def run_units(self, advance) -> None:
        """Drive the units: ``advance(n)`` runs the next ``n`` (NM-PPO interleaves a search)."""
        advance(self.total_units())

    def postfix(self, stats: dict) -> dict[str, str]:
        """What the progress bar shows after a unit."""
        return {"loss": f"{stats.get('loss', float('nan')):.4f}"}

    def finish(self) -> None:
        """After the last unit, before the model is saved (e.g. a final evaluation)."""

    def saved_model(self, model_dir) -> None:
        """After the model and tokenizer were written to ``model_dir`` (e.g. to describe them)."""

    def summary(self) -> dict:
        raise NotImplementedError


def run(recipe: Recipe, *, quiet: bool = False) -> RunResult:
    """Run ``recipe`` with the algorithm its objective names. Every input error surfaces before Ray
    starts and before the run folder exists."""
    from tqdm.auto import tqdm

    from prefopt.algorithms import algorithm_for
    from prefopt.cluster import check_cluster_resources, init_ray_for, release
    from prefopt.io.plots import write_curves
    from prefopt.config import recipe_to_dict
    from prefopt.io.run_dir import MetricsLogger
    from prefopt.loops import checkpointing
    from prefopt.loops.checkpointing import Checkpointer, StopRequest
    from prefopt.loops.guards import SkipGuard
    from prefopt.preflight import open_run_dir, prepare

    pre = prepare(recipe)
    run_dir, resume_from = open_run_dir(pre)
    logger = MetricsLogger(run_dir, recipe.output.loggers, config=recipe_to_dict(recipe), run_name=run_dir.name)
    ctx = Run(recipe=recipe, pre=pre, run_dir=run_dir, logger=logger, quiet=quiet, spec=pre.spec,
              result=RunResult(run_dir=run_dir, steps=0, final_train={}))
    algorithm, started_ray = algorithm_for(recipe)(ctx), False
    stack = contextlib.ExitStack()
    try:
        started_ray = init_ray_for(recipe, pre.spec)
        check_cluster_resources(recipe, pre.spec)
        algorithm.roles = algorithm.build_roles()
        (run_dir / "placement.json").write_text(json.dumps(algorithm.setup(), indent=1))
        algorithm.start()
        result, unit, total = ctx.result, algorithm.unit, algorithm.total_units()
        done = 0                                        # units done (a resumed run: its checkpoint's)
        if resume_from is not None:
            state = checkpointing.restore(resume_from, algorithm.roles, algorithm.driver_state())
            done, result.steps = int(state["counter"]), int(state.get("steps", result.steps))
            result.train_history = checkpointing.history(run_dir, "train", unit)
            result.eval_history = checkpointing.history(run_dir, "eval", unit)
        algorithm.resumed(resume_from is not None)

        t = recipe.train
        stop, guard = stack.enter_context(StopRequest()), SkipGuard(t.max_skipped_steps)
        algorithm.guard = guard
        ckpt = Checkpointer(run_dir, algorithm.roles, recipe.output, driver_state=algorithm.driver_state(),
                            tokenizer=pre.tokenizer, describe=algorithm.saved_model)
        progress = stack.enter_context(tqdm(total=total, initial=done, desc=recipe.name, unit=unit[:4],
                                            disable=quiet or not recipe.output.progress_bar))

        def advance(n: int) -> int:
            """Run the next ``n`` units (at most up to the last); returns the last one done."""
            nonlocal done
            for u in range(done + 1, min(done + n, total) + 1):
                if stop.requested and not algorithm.in_flight(u):
                    ckpt.stop_now(stop, f"{_prefix(unit)}_{u - 1:06d}", u - 1, steps=result.steps)
                save_now = ckpt.due(u, total)
                stats, steps = algorithm.step(u, next_follows=u < total and not (save_now or stop.requested))
                result.steps += steps
                result.train_history.append({unit: u, **stats})
                if u % t.log_every == 0 or u == total:
                    logger.log(u, stats)
                if save_now:
                    ckpt.save(f"{_prefix(unit)}_{u:06d}", u, steps=result.steps)
                progress.update(1)
                progress.set_postfix(algorithm.postfix(stats))
                done = u
            return done

        algorithm.run_units(advance)
        progress.close()
        result.final_train = {**result.train_history[-1], **result.final_train}
        algorithm.finish()
        if recipe.output.save_model:
            policy = algorithm.roles.policy
            policy.call("save_model", [(str(run_dir / "model"),)] * len(policy), what="save model")
            pre.tokenizer.save_pretrained(str(run_dir / "model"))
            algorithm.saved_model(run_dir / "model")
        summary = {"name": recipe.name, "algorithm": algorithm.name, "objective": recipe.objective.name,
                   **algorithm.summary(), "run_dir": str(run_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return result
    finally:
        stack.close()
        logger.close()
        write_curves(run_dir, best_effort=True)
        release(algorithm.roles, started_ray)


def _prefix(unit: str) -> str:
    return {"iteration": "iter"}.get(unit, unit)


def trends(history: list[dict], keys: dict[str, str]) -> dict[str, float]:
    """``{name}_first`` / ``{name}_final``: the first and last finite value of each metric in ``history``."""
    from prefopt.io.plots import summary_trend
    out = {}
    for name, key in keys.items():
        trend = summary_trend([{**h, "split": "train"} for h in history], key)
        if trend is not None:
            out[f"{name}_first"], out[f"{name}_final"] = trend
    return out
