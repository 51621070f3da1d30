"""The driver side of constrained PPO (objective ``constrained_ppo``; Moskovitz et al. 2023).

Reward channels: channel 0 is the task (unconstrained sources' weighted sum, process rewards and
the KL penalty, as in plain PPO); channel i >= 1 is constrained component i, its raw score at the
response's last token. Each channel gets its own advantage (its own critic head with GAE, or its
own group baseline with grpo / rloo), whitened separately as in the public code; the policy
learns from the combined advantage ``A = (N - sum lambda_i) A_task + sum lambda_i A_i``
(:func:`prefopt.rl.lagrange.combined_advantage`). After the advantages are set, each
multiplier takes one SGD step on ``sum_i lambda_i (J_i - theta_i)`` with J_i the batch mean of
component i's score (the episodic return: the score is the component's only reward).
"""
from __future__ import annotations

import torch

from prefopt.config_schema import Recipe
from prefopt.objectives.constrained_ppo import constrained_sources


class Constraints:
    """Names, kinds, thresholds and Lagrange multipliers of a run's constrained components."""

    def __init__(self, recipe: Recipe):
        from prefopt.rl.lagrange import LagrangeMultipliers

        p = recipe.objective
        sources = constrained_sources(recipe)
        self.names = [name for name, _ in sources]
        self.kinds = [src.constraint for _, src in sources]
        self.thresholds = [float(src.threshold) for _, src in sources]
        init = [src.multiplier_init if src.multiplier_init is not None else (0.5 if src.constraint == "ge" else 0.0)
                for _, src in sources]
        self.multipliers = LagrangeMultipliers(self.kinds, init=init, lr=p.multiplier_lr,
                                               momentum=p.multiplier_momentum,
                                               max_grad_norm=p.multiplier_max_grad_norm,
                                               kp=p.multiplier_kp, kd=p.multiplier_kd)

    def compute_advantages(self, samples: list[dict], params, group_size: int) -> dict[str, float]:
        """Per-channel advantages -> the combined advantage (and per-head returns), into the samples."""
        from prefopt.rl.lagrange import combined_advantage
        from prefopt.rl.ppo import explained_variance
        from prefopt.rl.signals import (at_last_token, estimate_advantages, per_token, task_token_rewards,
                                        write_signals)

        task_rewards, mask, stats = task_token_rewards(samples, params)
        channels = [task_rewards] + [at_last_token([s.reward_components[name] for s in samples], mask)
                                     for name in self.names]
        values = per_token(samples, "values")[0] if samples[0].values is not None else None   # a critic ran
        advantages, returns = [], []
        for head, rewards in enumerate(channels):
            adv, ret = estimate_advantages(rewards, None if values is None else values[..., head], mask,
                                           params, group_size)
            advantages.append(adv)
            returns.append(ret)
        lambdas = torch.tensor(self.multipliers.values(), dtype=torch.float64)
        combined = combined_advantage(advantages[0], torch.stack(advantages[1:]), lambdas)
        write_signals(samples, combined, None if values is None else torch.stack(returns, dim=-1))
        if values is not None:
            stats["critic/explained_variance"] = float(explained_variance(values[..., 0], returns[0], mask))
            for head, name in enumerate(self.names, start=1):
                stats[f"critic/explained_variance/{name}"] = float(
                    explained_variance(values[..., head], returns[head], mask))
        stats["constraint/task_weight"] = float(len(self.names) - lambdas.sum())
        return stats

    def update(self, samples: list[dict]) -> dict[str, float]:
        """One multiplier step from this batch's mean component returns; metrics of the iteration
        (the multipliers that weighed its advantages, and the updated ones)."""
        used = self.multipliers.values()
        returns = [sum(s.reward_components[name] for s in samples) / len(samples) for name in self.names]
        updated = self.multipliers.update(returns, self.thresholds)
        stats = {}
        for name, j, theta, lam, new in zip(self.names, returns, self.thresholds, used, updated):
            stats.update({f"constraint/{name}/return": j, f"constraint/{name}/threshold": theta,
                          f"constraint/{name}/multiplier": lam, f"constraint/{name}/multiplier_next": new})
        return stats

    def state_dict(self) -> dict:
        return {"names": list(self.names), "thresholds": list(self.thresholds),
                "multipliers": self.multipliers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"checkpoint constraints {state['names']} differ from the recipe's {self.names}")
        self.thresholds = [float(v) for v in state["thresholds"]]
        self.multipliers.load_state_dict(state["multipliers"])


def plot_constraints(history: list[dict], names: list[str], path) -> None:
    """PNG: per component, its batch-mean return and threshold (left axis) and multiplier (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(its, [h[f"constraint/{name}/return"] for h in history], label="return J", color="C0")
        ax.plot(its, [h[f"constraint/{name}/threshold"] for h in history], "--", label="threshold", color="C2")
        ax.set_xlabel("iteration")
        ax.set_ylabel(name)
        twin = ax.twinx()
        twin.plot(its, [h[f"constraint/{name}/multiplier"] for h in history], ":", color="C3", label="multiplier")
        twin.set_ylabel("multiplier", color="C3")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")
        ax.set_title(f"constraint on {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _BudgetSpent(Exception):
    pass


def search_thresholds(constraints: Constraints, nm, total_iterations: int, advance, evaluate) -> dict:
    """NM-PPO: Nelder-Mead (scipy) over the threshold vector within one run.

    Each evaluation of a threshold vector sets it, continues training for ``nm.iterations_per_eval``
    iterations (``advance(n)``) and scores ``evaluate()`` (higher is better); the search stops when
    ``total_iterations`` are spent. Returns the evaluations and the best thresholds found.
    """
    import numpy as np
    from scipy.optimize import minimize

    budget = max(1, total_iterations // nm.iterations_per_eval)
    x0 = np.asarray(constraints.thresholds, dtype=float)
    steps = np.where(x0 != 0, np.abs(x0) * nm.initial_step, nm.initial_step)
    simplex = np.vstack([x0] + [x0 + np.eye(len(x0))[i] * steps[i] for i in range(len(x0))])
    evaluations: list[dict] = []

    def negative_score(x):
        if len(evaluations) >= budget:
            raise _BudgetSpent
        constraints.thresholds = [float(v) for v in x]
        iteration = advance(nm.iterations_per_eval)
        score = float(evaluate())
        evaluations.append({"iteration": iteration, "thresholds": list(constraints.thresholds), "score": score})
        return -score

    try:
        minimize(negative_score, x0, method="Nelder-Mead",
                 options={"initial_simplex": simplex, "maxfev": budget, "xatol": 1e-9, "fatol": 1e-12})
    except _BudgetSpent:
        pass
    best = max(evaluations, key=lambda e: e["score"])
    return {"evaluations": evaluations, "best_thresholds": best["thresholds"], "best_score": best["score"]}
