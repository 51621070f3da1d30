"""Ablation script with prefopt's Python API: DPO beta x seeds, locally or on a Ray cluster.

    python docs/examples/beta_ablation.py                              # local, tiny recipe (~2 min on CPU)
    python docs/examples/beta_ablation.py --address http://HEAD:8265   # as Ray jobs on a cluster

The same grid from the command line: prefopt sweep recipes/tiny_dpo.yaml --grid objective.beta=0.05,0.2 --seeds 2
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import prefopt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/tiny_dpo.yaml")
    ap.add_argument("--address", help="Ray job server; runs locally when absent")
    ap.add_argument("--betas", default="0.05,0.2")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()

    base = prefopt.load_recipe(args.recipe, ["train.epochs=1", "output.progress_bar=false"])
    results: dict[float, list[float]] = {}
    for beta in (float(b) for b in args.betas.split(",")):
        for seed in range(args.seeds):
            # derive a variant in code: recipes are plain dataclasses
            recipe = dataclasses.replace(
                base, name=f"{base.name}-beta{beta}-s{seed}",
                objective=dataclasses.replace(base.objective, beta=beta),
                train=dataclasses.replace(base.train, seed=seed))
            if args.address:
                job = prefopt.submit(recipe, address=args.address)
                print(f"beta={beta} seed={seed}: submitted {job} (`prefopt jobs status {job}`)")
                continue
            run = prefopt.read_run(prefopt.train(recipe, quiet=True).run_dir)
            results.setdefault(beta, []).append(run.final["eval/rewards/accuracy"])
    for beta, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"beta={beta}: held-out accuracy {statistics.mean(accs):.3f} ± {spread:.3f} over {len(accs)} seeds")


if __name__ == "__main__":
    main()
