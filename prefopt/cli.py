"""Command line: ``prefopt train|validate|show RECIPE [key=value ...]``."""
from __future__ import annotations

import argparse
import os
import sys


def _setup_env() -> None:
    # Defaults that make the CPU stack fast and offline-safe; a user's own settings win.
    for key, value in {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                       "HF_HUB_DISABLE_TELEMETRY": "1", "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(key, value)


def _summary_table(result) -> str:
    import json
    summary = json.loads((result.run_dir / "summary.json").read_text())
    if "accuracy_metric" in summary:   # offline objectives
        acc = summary["accuracy_metric"]
        rows = [
            ("objective", summary["objective"]),
            ("steps", summary["steps"]),
            ("train / held-out examples", f"{summary['train_examples']} / {summary['eval_examples']}"),
            ("final train loss", f"{summary['final_train_loss']:.4f}"),
            (f"held-out {acc} (start -> end)",
             f"{summary['eval_accuracy_start']:.3f} -> {summary['eval_accuracy_final']:.3f}"),
            ("held-out loss", f"{summary['eval_loss_final']:.4f}"),
        ]
    else:                              # online objectives
        rows = [
            ("objective", f"{summary['objective']} ({summary['advantage']} advantages)"),
            ("iterations / optimizer steps", f"{summary['iterations']} / {summary['steps']}"),
            ("mean reward (first -> last iteration)", f"{summary['reward_first']:.3f} -> {summary['reward_final']:.3f}"),
        ]
    rows.append(("run directory", summary["run_dir"]))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(str(v)) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line])


def cmd_train(args) -> int:
    from prefopt.config import load_recipe
    from prefopt.train import train
    recipe = load_recipe(args.recipe, args.overrides)
    result = train(recipe)
    print(_summary_table(result))
    return 0


def cmd_validate(args) -> int:
    from prefopt.config import load_recipe
    for path in args.recipes:
        recipe = load_recipe(path, args.overrides)
        print(f"ok: {path} ({recipe.name}: objective {recipe.objective.name})")
    return 0


def cmd_show(args) -> int:
    from prefopt.config import load_recipe, recipe_to_yaml
    print(recipe_to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description="Preference optimization of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run a recipe (locally, or on the cluster in ray.address)")
    p.add_argument("recipe"); p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("validate", help="check recipes without running them")
    p.add_argument("recipes", nargs="+"); p.add_argument("--set", dest="overrides", action="append", default=[],
                                                         metavar="key=value")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("show", help="print the fully resolved recipe")
    p.add_argument("recipe"); p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    from prefopt.errors import PrefoptError
    _setup_env()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PrefoptError as e:
        print(f"prefopt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
