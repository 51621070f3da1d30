"""Constrained PPO (mu-PPO / xi-PPO; Moskovitz et al. 2023) and NM-PPO.

PPO with two hooks overridden: the advantages are per reward channel, combined with the Lagrange
multipliers (:class:`prefopt.loops.constrained.Constraints`), and after each update every
multiplier takes a step toward its threshold. NM-PPO wraps the iterations: a Nelder-Mead search
over the thresholds, each evaluated after ``iterations_per_eval`` iterations on held-out prompts.
"""
from __future__ import annotations

import json

from prefopt.algorithms import register_algorithm
from prefopt.algorithms.ppo import PPO


@register_algorithm
class ConstrainedPPO(PPO):
    name = "constrained_ppo"

    def __init__(self, run):
        from prefopt.loops.constrained import Constraints
        self.nm = run.recipe.objective.nelder_mead
        super().__init__(run)
        self.constraints = Constraints(self.recipe)

    def held_out_prompts(self, prompts: list[dict]) -> list[dict]:
        return prompts[-self.nm.eval_prompts:] if self.nm is not None else []

    def driver_state(self) -> dict:
        return {**super().driver_state(), "constraints": self.constraints}

    def advantages(self, samples: list[dict]) -> dict[str, float]:
        return self.constraints.compute_advantages(samples, self.recipe.objective,
                                                   self.recipe.roles.rollout.sampling.n)

    def after_update(self, samples: list[dict]) -> dict[str, float]:
        return self.constraints.update(samples)

    def run_units(self, advance) -> None:
        if self.nm is None:
            return super().run_units(advance)
        from prefopt.loops.constrained import search_thresholds
        from prefopt.loops.online import evaluate_prompts
        from prefopt.rewards.sources import import_reward_fn
        t, c, logger = self.recipe.train, self.constraints, self.run.logger
        eval_fn = import_reward_fn(self.nm.eval_fn)

        def evaluate() -> float:
            score = evaluate_prompts(self.roles, self.held_out, self.recipe.roles.rollout.sampling, eval_fn,
                                     self.run.tokenizer, seed=t.seed)
            logger.log(len(self.run.result.train_history), {
                "score": score, **{f"threshold/{n}": v for n, v in zip(c.names, c.thresholds)}},
                prefix="nelder_mead")
            return score

        search = search_thresholds(c, self.nm, t.iterations - len(self.run.result.train_history), advance, evaluate)
        c.thresholds = search["best_thresholds"]
        advance(t.iterations)                       # what the search left of the budget
        (self.run.run_dir / "nelder_mead.json").write_text(json.dumps(search, indent=1))
        self.run.result.final_train.update(nelder_mead_best_score=search["best_score"])

    def finish(self) -> None:
        from prefopt.loops.constrained import plot_constraints
        super().finish()
        run_dir = self.run.run_dir
        plot_constraints(self.run.result.train_history, self.constraints.names, run_dir / "constraints.png")
        (run_dir / "constraints.json").write_text(json.dumps(self.constraints.state_dict(), indent=1))
