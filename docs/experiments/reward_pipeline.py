"""Reward models feeding the online loop, by recipe name: plots for docs/reward_models.md.

    python docs/experiments/reward_pipeline.py --iterations 40 --out docs/reward_pipeline.png

1. ``tiny_rm_lists`` (Bradley–Terry on lists graded by a hidden rule), then ``tiny_rm_grpo`` (GRPO against
   it, ``run:tiny-rm-lists``): the reward model's score and the hidden rule per iteration.
2. ``tiny_prm_train`` (a step-label PRM), then ``tiny_prm_model`` (PPO + GAE, its step probabilities
   Clip-refined) beside ``tiny_prm`` (the rule PRM that pays for every step): steps per response and
   success rate.
3. ``tiny_dpo`` (DPO), then ``tiny_prm_implicit`` (the DPO policy against its reference as an implicit
   PRM, Delta-refined): the same.

Everything runs under one temporary ``output.root``, so each ``run:NAME`` finds the stage before it.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--out", default="docs/reward_pipeline.png")
    args = ap.parse_args()

    from prefopt.config import load_recipe
    from prefopt.train import train
    root = tempfile.mkdtemp(prefix="reward-pipeline-")

    def run(name: str, *overrides: str):
        recipe = load_recipe(name, [f"output.root={root}", "output.progress_bar=false", *overrides])
        return train(recipe, quiet=True)

    stages = {"rm": run("tiny_rm_lists").final_eval, "prm": run("tiny_prm_train").final_eval,
              "dpo": run("tiny_dpo").final_eval}
    online = {name: run(name, f"train.iterations={args.iterations}", "output.save_model=false").train_history
              for name in ("tiny_rm_grpo", "tiny_prm", "tiny_prm_model", "tiny_prm_implicit")}
    curves = {"rm_grpo": {"reward model": [h["reward/rm"] for h in online["tiny_rm_grpo"]],
                          "hidden rule": [h["reward/hidden_rule"] for h in online["tiny_rm_grpo"]]}}
    for name in ("tiny_prm", "tiny_prm_model", "tiny_prm_implicit"):
        curves[name] = {"steps": [h["reward/steps_per_response"] for h in online[name]],
                        "success": [h["reward/success"] for h in online[name]]}
    summary = {"stages": stages, "last10": {name: {k: sum(v[-10:]) / len(v[-10:]) for k, v in c.items()}
                                            for name, c in curves.items()},
               "first5": {name: {k: sum(v[:5]) / 5 for k, v in c.items()} for name, c in curves.items()}}
    print(json.dumps(summary, indent=1))
    Path(args.out).with_suffix(".json").write_text(json.dumps({"iterations": args.iterations, **summary,
                                                               "curves": curves}, indent=1))
    plot(curves, args.out)


def plot(curves: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    rm = curves["rm_grpo"]
    axes[0].plot(rm["hidden rule"], label="hidden rule (share of good words)")
    twin = axes[0].twinx()
    twin.plot(rm["reward model"], "--", color="tab:orange", label="reward model score (right axis)")
    axes[0].set(title="GRPO against the trained reward model", xlabel="iteration", ylim=(0, 1))
    axes[0].legend(handles=axes[0].get_lines() + twin.get_lines(), loc="lower right", fontsize=8)
    labels = {"tiny_prm": "rule PRM, no refinement", "tiny_prm_model": "trained PRM, Clip",
              "tiny_prm_implicit": "implicit PRM (DPO policy), Delta"}
    for name, label in labels.items():
        axes[1].plot(curves[name]["steps"], label=label)
        axes[2].plot(curves[name]["success"], label=label)
    axes[1].set(title="steps per response", xlabel="iteration")
    axes[2].set(title="success rate (at least half good words)", xlabel="iteration", ylim=(-0.05, 1.05))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
