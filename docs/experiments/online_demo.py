"""The verifiable-task pipeline and the online comparison of docs/online_demo.md.

    python docs/experiments/online_demo.py --out docs/online_demo.png             # ~12 minutes on 2 cores
    python docs/experiments/online_demo.py --seeds 0,1 --out docs/online_demo.png

1. ``tiny_reverse_sft``: SFT of the tiny model on reversing 4 words, stopped early (the starting point).
2. From that model, on one sample budget (32 prompts x 8 samples per iteration, 60 iterations, the same
   prompts in the same order): ``tiny_reverse_grpo`` (GRPO, exact-match reward),
   ``tiny_reverse_online_dpo`` (best vs worst of each prompt's 8 samples) and ``tiny_reverse_online_lipo``
   (each prompt's 8 samples as one graded list). Each evaluates its 128 held-out prompts greedily every 5
   iterations (``train.eval_every``).
3. ``prefopt eval`` of each final model against the SFT model on those held-out prompts: exact match,
   win rate and length-controlled win rate.

Everything runs under one temporary ``output.root``, so ``run:tiny-reverse-sft`` finds stage 1.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = {"tiny_reverse_grpo": "GRPO", "tiny_reverse_online_dpo": "online DPO",
           "tiny_reverse_online_lipo": "online LiPO-λ"}
EXACT_MATCH = "prefopt.rewards.builtin:exact_match"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values of the online runs")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--out", default="docs/online_demo.png")
    args = ap.parse_args()

    from prefopt.config import load_recipe
    from prefopt.evaluation.cli_eval import evaluate
    from prefopt.train import train
    root = tempfile.mkdtemp(prefix="online-demo-")

    def run(name: str, *overrides: str):
        recipe = load_recipe(name, [f"output.root={root}", "output.progress_bar=false", *overrides])
        return train(recipe, quiet=True)

    sft = run("tiny_reverse_sft")
    results = {"sft": {"eval_loss": sft.final_eval["loss"]}, "runs": {}}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in METHODS:
            r = run(name, f"train.iterations={args.iterations}", f"train.seed={seed}", "train.sample_log_every=20")
            prompts = r.run_dir / "held_out_prompts.jsonl"
            ev = evaluate(str(r.run_dir), str(prompts), [EXACT_MATCH], baseline=str(sft.run_dir / "model"),
                          max_tokens=12, runs_root=root)
            history = r.train_history
            results["runs"][f"{name}/seed{seed}"] = {
                "method": METHODS[name], "seed": seed,
                "eval_iterations": [h["iteration"] for h in r.eval_history],
                "eval_exact_match": [h["reward/mean"] for h in r.eval_history],
                "eval_length": [h["length/mean"] for h in r.eval_history],
                "train_reward": [h["reward/mean"] for h in history],
                "kl": [h.get("kl") for h in history], "entropy": [h.get("policy/entropy") for h in history],
                "prefopt_eval": {k: ev.metrics[k] for k in ("reward/mean", "baseline/reward/mean", "win_rate",
                                                            "lc_win_rate", "length/mean", "baseline/length/mean")},
            }
            print(name, seed, json.dumps(results["runs"][f"{name}/seed{seed}"]["prefopt_eval"]), flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"iterations": args.iterations, **results}, indent=1))
    plot(results, args.out)


def plot(results: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"GRPO": "tab:blue", "online DPO": "tab:orange", "online LiPO-λ": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, run in results["runs"].items():
        c, label = colors[run["method"]], f"{run['method']} (seed {run['seed']})"
        samples = [i * 32 * 8 for i in run["eval_iterations"]]
        axes[0].plot(samples, run["eval_exact_match"], color=c, marker="o", ms=3, label=label)
        axes[1].plot(samples, run["eval_length"], color=c, marker="o", ms=3, label=label)
        if run["kl"][0] is not None:
            axes[2].plot(run["kl"], color=c, label=f"KL, {label}")
            axes[2].plot(run["entropy"], color=c, ls="--", label=f"entropy, {label}")
    axes[0].set(title="held-out exact match (greedy, 128 prompts)", xlabel="samples drawn", ylim=(0, 1))
    axes[1].set(title="held-out response length (tokens)", xlabel="samples drawn", ylim=(0, 14))
    axes[2].set(title="GRPO: KL to the SFT model, policy entropy", xlabel="iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
