"""Reward-model over-optimization and its ensemble fix at toy scale (Gao et al. 2022; Coste et al. 2023).

    python docs/experiments/overoptimization.py --iterations 60 --seeds 0,1,2 --out docs/overoptimization.png

1. Gold reward: a rule (``prefopt.rewards.builtin:distinct_good_fraction``: distinct good words per word,
   so repeating a good word does not pay).
2. Proxy reward models: ``--proxies`` Bradley–Terry models (recipe tiny_rm.yaml) trained with different
   seeds on ``--pairs`` pairs of synthetic responses (3-10 random words, random good-word share, so
   repeats are rare) labelled by the gold rule.
3. GRPO (recipe tiny_grpo.yaml, a small KL coefficient) against one proxy, and
   against the ``mean`` / ``min`` (worst case) / ``uwo`` (mean - coef * variance) ensembles of all
   proxies, ``--seeds`` policy seeds each; the gold reward is logged beside (weight 0).
4. Plots gold and proxy reward against the KL to the reference, per objective (mean over seeds), and
   writes the numbers (JSON beside the PNG).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOLD = "prefopt.rewards.builtin:distinct_good_fraction"
COMMON = ["output.progress_bar=false", "output.loggers=[]"]


def gold_pairs(n: int, seed: int) -> list[dict]:
    """Pairs of random responses, the one the gold rule scores higher first (ties redrawn)."""
    from prefopt.data.synthetic import _prompt, _response
    from prefopt.rewards.builtin import distinct_good_fraction as gold
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        prompt = _prompt(rng)
        a, b = (_response(rng, rng.random()) for _ in range(2))
        ga, gb = (gold(prompt=prompt, response=r, row={}) for r in (a, b))
        if ga != gb:
            rows.append({"prompt": prompt, "chosen": a if ga > gb else b, "rejected": b if ga > gb else a})
    return rows


def train_proxies(root: Path, pairs: Path, count: int, steps_per_epoch_seed: int) -> list[str]:
    from prefopt.config import load_recipe
    from prefopt.train import train
    paths = []
    for i in range(count):
        recipe = load_recipe("tiny_rm", [f"data.path={pairs}", f"train.seed={i}", "train.epochs=3",
                                         "data.eval_fraction=0.2", f"output.run_dir={root / f'proxy{i}'}", *COMMON])
        result = train(recipe, quiet=True)
        print(f"proxy {i}: held-out gold-pair accuracy {result.eval_history[-1]['accuracy']:.3f}", flush=True)
        paths.append(str(result.run_dir / "model"))
    return paths


def objectives(proxies: list[str], uwo_coef: float) -> dict[str, dict]:
    ens = {"models": proxies}
    return {"single proxy": {"model": proxies[0]}, "mean": {**ens, "aggregate": "mean"},
            "min (WCO)": {**ens, "aggregate": "min"}, "uwo": {**ens, "aggregate": "uwo", "uwo_coef": uwo_coef}}


def run_policy(root: Path, name: str, source: dict, seed: int, iterations: int, kl_coef: float) -> list[dict]:
    from prefopt.config import load_recipe
    from prefopt.train import train
    sources = [{**source, "name": "proxy", "weight": 1.0}, {"fn": GOLD, "name": "gold", "weight": 0.0}]
    recipe = load_recipe("tiny_grpo", [
        f"roles.reward.sources={json.dumps(sources)}", f"train.iterations={iterations}", f"train.seed={seed}",
        f"objective.kl_coef={kl_coef}",
        f"output.run_dir={root / f'{name.split()[0]}-{seed}'}", "output.save_model=false", *COMMON])
    history = train(recipe, quiet=True).train_history
    return [{"kl": h["kl"], "seq_kl": h["kl"] * h["response_length"], "proxy": h["reward/proxy"],
             "gold": h["reward/gold"], "length": h["response_length"]} for h in history]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--proxies", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--kl-coef", type=float, default=0.001)
    ap.add_argument("--uwo-coef", type=float, default=1.0)
    ap.add_argument("--out", default="docs/overoptimization.png")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    root = Path(tempfile.mkdtemp(prefix="overopt-"))
    pairs = root / "gold_pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in gold_pairs(args.pairs, seed=1234)))
    proxies = train_proxies(root, pairs, args.proxies, 0)
    curves = {name: [run_policy(root, name, src, s, args.iterations, args.kl_coef) for s in seeds]
              for name, src in objectives(proxies, args.uwo_coef).items()}
    result = {"args": vars(args), "curves": curves, "summary": summarize(curves)}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    plot(curves, args.out)


def summarize(curves: dict) -> dict:
    """Per objective, means over seeds: gold at its peak and at the end, proxy at the end, final KL."""
    out = {}
    for name, runs in curves.items():
        def mean(values):
            return sum(values) / len(values)
        last = [r[-5:] for r in runs]
        out[name] = {"gold_peak": mean([max(h["gold"] for h in r) for r in runs]),
                     "gold_final": mean([mean([h["gold"] for h in l]) for l in last]),
                     "proxy_final": mean([mean([h["proxy"] for h in l]) for l in last]),
                     "seq_kl_final": mean([mean([h["seq_kl"] for h in l]) for l in last]),
                     "length_final": mean([mean([h["length"] for h in l]) for l in last])}
        out[name]["gold_drop"] = out[name]["gold_peak"] - out[name]["gold_final"]
    return out


def plot(curves: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.8), sharey=True)
    proxy_axes = []
    for ax, (name, runs) in zip(axes, curves.items()):
        n = min(len(r) for r in runs)
        kl = [sum(r[i]["seq_kl"] for r in runs) / len(runs) for i in range(n)]
        gold = [sum(r[i]["gold"] for r in runs) / len(runs) for i in range(n)]
        proxy = [sum(r[i]["proxy"] for r in runs) / len(runs) for i in range(n)]
        ax.plot(kl, gold, "-", color="tab:blue", label="gold (left axis)")
        twin = ax.twinx()
        twin.plot(kl, proxy, "--", color="tab:orange", label="proxy (right axis)")
        proxy_axes.append(twin)
        ax.set(title=name, xlabel="KL to reference (per response, nats)")
        ax.legend(handles=ax.get_lines() + twin.get_lines(), loc="lower right", fontsize=8)
    for twin in proxy_axes[1:]:
        twin.sharey(proxy_axes[0])
    axes[0].set_ylabel("gold reward (mean over seeds)")
    proxy_axes[-1].set_ylabel("proxy reward")
    fig.suptitle("GRPO against learned proxy reward models: gold vs proxy reward as KL grows")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
