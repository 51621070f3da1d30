"""Constrained RLHF toy (Moskovitz et al. 2023): fixed-weight PPO vs xi-PPO vs NM-PPO; plot the curves.

    python docs/experiments/constrained.py --iterations 100 --out docs/constrained_rlhf.png
    python docs/experiments/constrained.py --iterations 100 --hold-seeds 0,1,2   # + the xi-PPO hold table

Runs recipes/tiny_constrained_fixed.yaml, tiny_constrained_xi.yaml and tiny_constrained_nm.yaml with
the same seed on the embedded local Ray cluster. Plots, per iteration, the length component's batch
mean (with the xi threshold), the good-word reward, and the toy evaluation score (logged as the
zero-weight reward source `eval`), and prints the last-10-iteration means.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# label -> (recipe, overrides). "integral only" is the paper's plain gradient step on the multiplier
# (the PID gain switched off; multiplier lr 0.05, the best of the integral-only settings tried).
RECIPES = {"fixed weights (PPO)": ("recipes/tiny_constrained_fixed.yaml", []),
           "xi-PPO, integral only": ("recipes/tiny_constrained_xi.yaml", ["objective.multiplier_kp=0",
                                                                     "objective.multiplier_lr=0.05"]),
           "xi-PPO (PID)": ("recipes/tiny_constrained_xi.yaml", []),
           "NM-PPO": ("recipes/tiny_constrained_nm.yaml", [])}
XI = ("xi-PPO, integral only", "xi-PPO (PID)")
SERIES = {"length": "reward/length", "good": "reward/good", "eval": "reward/eval"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/constrained_rlhf.png")
    ap.add_argument("--hold-seeds", default="", help="comma-separated seeds: also run both xi-PPO variants with "
                    "each and print how far the length's last-10/20/30 means are from the threshold")
    args = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefopt.config import load_recipe
    from prefopt.train import train

    curves, thresholds, multipliers = {}, {}, {}
    root = tempfile.mkdtemp(prefix="constrained-")

    def run(label: str, seed: int) -> list[dict]:
        path, overrides = RECIPES[label]
        recipe = load_recipe(path, [f"train.iterations={args.iterations}", f"train.seed={seed}", *overrides,
                                    f"output.root={root}", "output.save_model=false", "output.progress_bar=false"])
        return train(recipe, quiet=True).train_history

    hold = []
    for seed in [int(x) for x in args.hold_seeds.split(",") if x]:
        for label in XI:
            if seed == args.seed:
                continue        # taken from the plotted runs below
            hold.append(hold_row(label, seed, run(label, seed)))
    for label in RECIPES:
        hist = run(label, args.seed)
        if label in XI and args.hold_seeds:
            hold.append(hold_row(label, args.seed, hist))
        curves[label] = {name: [h[key] for h in hist] for name, key in SERIES.items()}
        if "constraint/length/threshold" in hist[-1]:
            thresholds[label] = [h["constraint/length/threshold"] for h in hist]
            multipliers[label] = [h["constraint/length/multiplier"] for h in hist]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for i, (label, c) in enumerate(curves.items()):
        for ax, name in zip(axes, SERIES):
            ax.plot(c[name], label=label, color=f"C{i}")
        if label in thresholds:
            axes[0].plot(thresholds[label], "--", color=f"C{i}", label=f"{label} threshold")
            axes[3].plot(multipliers[label], color=f"C{i}", label=label)
    axes[0].set(title="length component J (words, batch mean)", xlabel="iteration")
    axes[1].set(title="good-word fraction (task)", xlabel="iteration")
    axes[2].set(title="evaluation: good words at moderate length", xlabel="iteration")
    axes[3].set(title="length multiplier (tanh)", xlabel="iteration", ylim=(-1.05, 1.05))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("Constrained RLHF toy (tiny model, GRPO advantages): fixed weights vs xi-PPO vs NM-PPO")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    summary = {label: {k: sum(v[-10:]) / 10 for k, v in c.items()} for label, c in curves.items()}
    for label in thresholds:
        summary[label]["threshold_last"] = thresholds[label][-1]
    print(json.dumps(summary, indent=1))
    if hold:
        print(hold_table(sorted(hold, key=lambda r: (r["variant"], r["seed"]))))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"iterations": args.iterations, "seed": args.seed, "last10_means": summary, "curves": curves,
                   "thresholds": thresholds, "multipliers": multipliers, "hold": hold}, f)


def hold_row(label: str, seed: int, hist: list[dict]) -> dict:
    """Length vs threshold over the last 10/20/30 iterations, and the task (good-word) reward."""
    length, good = [h["reward/length"] for h in hist], [h["reward/good"] for h in hist]
    theta = hist[-1]["constraint/length/threshold"]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"variant": label, "seed": seed, "threshold": theta,
            **{f"length_gap_last{n}": mean(length[-n:]) / theta - 1 for n in (10, 20, 30)},
            "good_first10": mean(good[:10]), "good_last20": mean(good[-20:])}


def hold_table(rows: list[dict]) -> str:
    lines = ["| variant | seed | length vs threshold, last 10 / 20 / 30 iterations | within ±10% | "
             "good-word fraction, first 10 -> last 20 |", "|---|---|---|---|---|"]
    for r in rows:
        gaps = [r[f"length_gap_last{n}"] for n in (10, 20, 30)]
        ok = sum(abs(g) <= 0.10 for g in gaps)
        lines.append(f"| {r['variant']} | {r['seed']} | {' / '.join(f'{g:+.1%}' for g in gaps)} | {ok} of 3 | "
                     f"{r['good_first10']:.3f} -> {r['good_last20']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
