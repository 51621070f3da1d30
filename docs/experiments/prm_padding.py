"""Reproduce Gao et al. 2024's process-reward hacking and its fixes at toy scale; plot the curves.

    python docs/experiments/prm_padding.py --iterations 100 --out docs/prm_padding.png

Runs recipes/tiny_prm.yaml (plain process rewards), tiny_prm_clip.yaml and tiny_prm_delta.yaml
with the same seed on the embedded local Ray cluster, then plots steps per response and success
rate per iteration (matplotlib, PNG) and prints the last-10-iteration means.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = {"plain": "recipes/tiny_prm.yaml", "clip": "recipes/tiny_prm_clip.yaml",
           "delta": "recipes/tiny_prm_delta.yaml"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/prm_padding.png")
    args = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefopt.config import load_recipe
    from prefopt.train import train

    curves = {}
    root = tempfile.mkdtemp(prefix="prm-padding-")
    for name, path in RECIPES.items():
        recipe = load_recipe(path, [f"train.iterations={args.iterations}", f"train.seed={args.seed}",
                                    f"output.root={root}", "output.save_model=false", "output.progress_bar=false"])
        result = train(recipe, quiet=True)
        curves[name] = {"steps": [h["reward/steps_per_response"] for h in result.train_history],
                        "success": [h["reward/success"] for h in result.train_history]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        axes[0].plot(c["steps"], label=name)
        axes[1].plot(c["success"], label=name)
    axes[0].set(title="steps per response", xlabel="iteration")
    axes[1].set(title="success rate", xlabel="iteration", ylim=(-0.05, 1.05))
    for ax in axes:
        ax.legend()
    fig.suptitle("PPO + GAE with process rewards (tiny model): plain vs Clip vs Delta")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    summary = {name: {k: sum(v[-10:]) / len(v[-10:]) for k, v in c.items()} for name, c in curves.items()}
    print(json.dumps(summary, indent=1))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"iterations": args.iterations, "seed": args.seed, "last10_means": summary, "curves": curves}, f)


if __name__ == "__main__":
    main()
