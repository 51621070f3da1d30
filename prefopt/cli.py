"""Command line: ``prefopt train|validate|show|reproduce|submit|sweep RECIPE [key=value ...]``,
``prefopt jobs status|logs|stop|list``, ``prefopt score DATA --reward MODEL [MODEL ...] --out FILE``,
``prefopt eval MODEL|RUN_DIR --prompts PATH --reward SOURCE [...] [--baseline MODEL|RUN_DIR]``."""
from __future__ import annotations

import argparse
import os
import sys


def _setup_env() -> None:
    # Defaults that make the CPU stack fast and offline-safe; a user's own settings win.
    for key, value in {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                       "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        os.environ.setdefault(key, value)


def _summary_table(result) -> str:
    import json
    summary = json.loads((result.run_dir / "summary.json").read_text())
    if summary["algorithm"] == "sft":
        rows = [
            ("algorithm", "sft"),
            ("steps", summary["steps"]),
            ("train / held-out examples", f"{summary['train_examples']} / {summary['eval_examples']}"),
            ("final train loss", f"{summary['final_train_loss']:.4f}"),
            ("held-out loss (start -> end)", f"{summary['eval_loss_start']:.3f} -> {summary['eval_loss_final']:.3f}"),
            ("held-out perplexity (start -> end)",
             f"{summary['eval_perplexity_start']:.1f} -> {summary['eval_perplexity_final']:.2f}"),
        ]
    elif "accuracy_metric" in summary:   # offline preference objectives
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
        how = f"{summary['advantage']} advantages" if "advantage" in summary else "online, on the policy's samples"
        rows = [
            ("objective", f"{summary['objective']} ({how})"),
            ("iterations / optimizer steps", f"{summary['iterations']} / {summary['steps']}"),
            ("mean reward (first -> last iteration)", f"{summary['reward_first']:.3f} -> {summary['reward_final']:.3f}"),
        ]
        if "tied_groups" in summary:
            rows.append(("pairs or lists trained on / prompts whose samples tied",
                         f"{summary['examples']} / {summary['tied_groups']}"))
        for key, label, fmt in (("eval_reward", "held-out reward, greedy", ".3f"),
                                ("kl", "KL to the reference", ".3f"), ("entropy", "entropy", ".3f"),
                                ("response_length", "response length (tokens)", ".1f")):
            if f"{key}_first" in summary:
                rows.append((f"{label} (first -> last)",
                             f"{summary[f'{key}_first']:{fmt}} -> {summary[f'{key}_final']:{fmt}}"))
    rows.append(("run directory", summary["run_dir"]))
    if (result.run_dir / "curves.png").exists():
        rows.append(("curves", str(result.run_dir / "curves.png")))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(str(v)) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line])


def _load(path: str, overrides: list[str]):
    """A recipe file, or ``env:VAR``: the YAML text in environment variable VAR (submitted jobs)."""
    from prefopt.config import load_recipe
    if path.startswith("env:"):
        import tempfile

        from prefopt.errors import ConfigError
        text = os.environ.get(path[4:])
        if not text:
            raise ConfigError(f"environment variable {path[4:]} holds no recipe")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="prefopt-job-", delete=False) as f:
            f.write(text)
        recipe = load_recipe(f.name, overrides)
        from prefopt.jobs import job_secrets
        secrets = job_secrets()                  # redacted in the recipe text; sent as a package
        recipe.ray.env.update(secrets)
        os.environ.update(secrets)               # the job's driver runs the reward functions
        return recipe
    return load_recipe(path, overrides)


def cmd_train(args) -> int:
    from prefopt.train import train
    recipe = _load(args.recipe, args.overrides)
    if args.verbose:
        recipe.output.log_level = "debug"
    result = train(recipe)
    print(_summary_table(result))
    return 0


def cmd_validate(args) -> int:
    """Every check ``train`` makes before Ray starts (recipe, models, data, reward functions, local
    resources, run folder), for each recipe; ``key=value`` items among the arguments are overrides."""
    from prefopt.config import load_recipe
    from prefopt.preflight import prepare
    paths = [a for a in args.recipes if not _is_override(a)]
    overrides = [*args.overrides, *(a for a in args.recipes if _is_override(a))]
    if not paths:
        from prefopt.errors import ConfigError
        raise ConfigError("prefopt validate needs at least one recipe")
    for path in paths:
        recipe = load_recipe(path, overrides)
        if args.recipe_only:
            print(f"ok: {path} ({recipe.name}: objective {recipe.objective.name}; recipe only)")
            continue
        pre = prepare(recipe)
        what = (f"{len(pre.prompts)} prompts" if pre.prompts is not None
                else f"{len(pre.data.train)} / {len(pre.data.eval)} train / held-out {pre.data.kind}")
        print(f"ok: {path} ({recipe.name}: objective {recipe.objective.name}, {what})")
    return 0


def _is_override(arg: str) -> bool:
    key, sep, _ = arg.partition("=")
    return bool(sep) and bool(key) and "/" not in key and not key.endswith((".yaml", ".yml"))


def cmd_show(args) -> int:
    from prefopt.config import load_recipe, recipe_to_dict
    from prefopt.secrets import redact
    from omegaconf import OmegaConf
    print(OmegaConf.to_yaml(OmegaConf.create(redact(recipe_to_dict(load_recipe(args.recipe, args.overrides))))),
          end="")
    return 0


def cmd_reproduce(args) -> int:
    from pathlib import Path

    from prefopt.config import load_recipe
    from prefopt.errors import ConfigError
    from prefopt.reproduce import check_run, format_checks
    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.expect:
        raise ConfigError(f"{args.recipe} has no 'expect:' ranges to check")
    if args.check:
        run_dir = Path(args.check)
    else:
        from prefopt.train import train
        if args.verbose:
            recipe.output.log_level = "debug"
        run_dir = train(recipe).run_dir
    checks = check_run(recipe.expect, run_dir)
    print(format_checks(checks, f"reproduce {recipe.name} ({run_dir})"))
    return 0 if all(c.passed for c in checks) else 1


def cmd_submit(args) -> int:
    from prefopt import jobs
    job_id = jobs.submit(args.recipe, args.overrides, address=args.address, token_file=args.token_file)
    print(f"submitted {job_id} to {jobs.job_address(args.address)}")
    if not args.follow:
        return 0
    state = jobs.follow(job_id, args.address, token_file=args.token_file)
    print(f"{job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from prefopt import jobs
    auth = {"token_file": args.token_file}
    if args.action == "list":
        for job in jobs.list_jobs(args.address, **auth):
            print(f"{job['id']}  {job['status']}  {job['entrypoint']}")
        return 0
    if not args.job_id:
        from prefopt.errors import ConfigError
        raise ConfigError(f"prefopt jobs {args.action} needs a job id")
    if args.action == "status":
        print(jobs.status(args.job_id, args.address, **auth))
    elif args.action == "logs":
        if args.follow:
            print(f"{args.job_id}: {jobs.follow(args.job_id, args.address, **auth)}")
        else:
            print(jobs.logs(args.job_id, args.address, **auth), end="")
    else:
        print(f"{args.job_id}: {jobs.stop(args.job_id, args.address, **auth)}")
    return 0


def cmd_sweep(args) -> int:
    from prefopt.sweep import sweep_command
    return sweep_command(args)


def cmd_score(args) -> int:
    """Score preference pairs with a reward model or an ensemble; flip / drop pairs (:mod:`prefopt.curation`)."""
    from prefopt.curation import parse_attribute_weights, score_file
    stats = score_file(args.data, args.reward, args.out, split=args.split, prompt_field=args.prompt_field,
                       chosen_field=args.chosen_field, rejected_field=args.rejected_field,
                       margin_field=args.margin_field, flip_negative=args.flip_negative,
                       drop_ambiguous=args.drop_ambiguous, overwrite_fields=args.overwrite_fields,
                       attribute_weights=parse_attribute_weights(args.attribute_weights),
                       batch_tokens=args.batch_tokens, trust_remote_code=args.trust_remote_code, force=args.force,
                       runs_root=args.runs_root)
    print(stats.summary(args.reward))
    print(f"written: {args.out}")
    return 0


def cmd_eval(args) -> int:
    """Generate for a prompt set, score with reward sources, compare with a baseline (:mod:`prefopt.evaluation`)."""
    from prefopt.curation import parse_attribute_weights
    from prefopt.evaluation.cli_eval import evaluate
    from prefopt.evaluation.report import format_table
    result = evaluate(args.model, args.prompts, args.reward, baseline=args.baseline, n=args.n,
                      temperature=args.temperature, max_tokens=args.max_tokens, out=args.out, split=args.split,
                      prompt_field=args.prompt_field, max_prompt_length=args.max_prompt_length,
                      max_prompts=args.max_prompts, seed=args.seed,
                      attribute_weights=parse_attribute_weights(args.attribute_weights), num_gpus=args.num_gpus,
                      runs_root=args.runs_root, trust_remote_code=args.trust_remote_code, force=args.force)
    print(format_table(result.metrics, f"prefopt eval {args.model}", args.baseline or ""))
    print(f"written: {result.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description="Preference optimization of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    verbose_help = "show everything: third-party output and the actors' logs (output.log_level=debug)"
    p = sub.add_parser("train", help="run a recipe (locally, or on the cluster in ray.address)")
    p.add_argument("recipe"); p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("validate", help="run every check of `train` that precedes Ray, without running")
    p.add_argument("recipes", nargs="+", metavar="RECIPE [key=value ...]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="an override (as the key=value arguments)")
    p.add_argument("--recipe-only", action="store_true",
                   help="check the recipe itself only (keys, types, values), not its models, data or resources")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("show", help="print the fully resolved recipe")
    p.add_argument("recipe"); p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("reproduce", help="run a recipe and check its 'expect:' ranges (pass/fail table)")
    p.add_argument("recipe"); p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--check", metavar="RUN_DIR", help="check an existing run instead of training")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    p.set_defaults(fn=cmd_reproduce)
    token_help = ("the cluster's Ray authentication token (default: $RAY_AUTH_TOKEN, the file in "
                  "$RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token with RAY_AUTH_MODE=token)")
    address_help = "Ray job server, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)"
    p = sub.add_parser("submit", help="submit a recipe as a Ray job to a cluster")
    p.add_argument("recipe"); p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--token-file", help=token_help)
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("jobs", help="status, logs, stop or list submitted Ray jobs")
    p.add_argument("action", choices=("status", "logs", "stop", "list"))
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", action="store_true", help="(logs) stream until the job ends")
    p.add_argument("--token-file", help=token_help)
    p.set_defaults(fn=cmd_jobs)
    p = sub.add_parser("sweep", help="run an ablation grid x seeds; results table (CSV, Markdown) and plot")
    try:
        from prefopt.sweep import add_sweep_arguments
        add_sweep_arguments(p)
    except ImportError:  # pragma: no cover
        pass
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("score", help="score preference pairs with reward models (preference strength; flip / drop)",
                       usage="prefopt score DATA --reward MODEL [MODEL ...] --out FILE [options]")
    p.add_argument("data", metavar="DATA",
                   help="pairs: a .jsonl/.json/.parquet file, a folder of them or a datasets name")
    p.add_argument("--reward", nargs="+", required=True, metavar="MODEL", help="reward model(s) (a path, hub name or "
                   "run:NAME): two or more are an ensemble (mean and std over members of r_chosen - r_rejected)")
    p.add_argument("--out", required=True, metavar="FILE", help="the scored rows (.jsonl, or .json for an array)")
    p.add_argument("--split", default="train")
    for name in ("prompt", "chosen", "rejected"):
        p.add_argument(f"--{name}-field", default=name, metavar="NAME")
    p.add_argument("--margin-field", default="margin", metavar="NAME",
                   help="where the preference strength is written for reward_model training (default: margin)")
    p.add_argument("--flip-negative", action="store_true", help="swap chosen and rejected where the strength is < 0")
    p.add_argument("--drop-ambiguous", type=float, metavar="T", help="leave out pairs with |strength| < T")
    p.add_argument("--attribute-weights", metavar="NAME=W,...", help="weights of a multi-head model's heads")
    p.add_argument("--batch-tokens", type=int, default=8192, metavar="N",
                   help="padded tokens per forward (default 8192)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the models' own Python code")
    p.add_argument("--runs-root", default="runs", metavar="DIR",
                   help="where --reward run:NAME looks for the newest finished run of recipe NAME (default: runs)")
    p.add_argument("--overwrite-fields", action="store_true", help="replace fields that rows already have")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(fn=cmd_score)
    p = sub.add_parser("eval", help="generate for prompts (vLLM), score with reward sources, win rate vs a baseline",
                       usage="prefopt eval MODEL|RUN_DIR --prompts PATH --reward SOURCE [--reward SOURCE ...] "
                             "[--baseline MODEL|RUN_DIR] [options]")
    p.add_argument("model", metavar="MODEL|RUN_DIR", help="a checkpoint folder, hub name, builtin:NAME, run:NAME, "
                   "or a run folder (its model/)")
    p.add_argument("--prompts", required=True, metavar="PATH", help="prompt rows as online recipes read them "
                   "(data.path: a .jsonl/.json/.parquet file, a folder, a datasets name or synthetic:pairs)")
    p.add_argument("--reward", action="append", required=True, metavar="SOURCE[@WEIGHT]",
                   help="a reward source, repeatable: a 'package.module:function' or a reward model (path, hub name, "
                   "builtin:NAME, run:NAME); @WEIGHT weighs it in the total (default 1)")
    p.add_argument("--baseline", metavar="MODEL|RUN_DIR", help="compare with this model's responses to the same "
                   "prompts (win rate, length-controlled win rate)")
    p.add_argument("--n", type=int, default=1, help="responses per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="response tokens at most (default 256)")
    p.add_argument("--out", metavar="DIR", help="where summary.json and samples.jsonl go (default for a run folder: "
                   "RUN_DIR/eval; needed for any other model)")
    p.add_argument("--split", default="train")
    p.add_argument("--prompt-field", default="prompt", metavar="NAME")
    p.add_argument("--max-prompt-length", type=int, default=256, metavar="N",
                   help="prompt tokens kept (the last N; default 256)")
    p.add_argument("--max-prompts", type=int, metavar="N", help="the first N prompts only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--attribute-weights", metavar="NAME=W,...", help="weights of a multi-head reward model's heads")
    p.add_argument("--num-gpus", type=float, default=0.0, metavar="G",
                   help="GPUs per vLLM engine (default 0: CPU); with GPUs the two models generate one after the other")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the models' own Python code")
    p.add_argument("--runs-root", default="runs", metavar="DIR",
                   help="where run:NAME looks for the newest finished run of recipe NAME (default: runs)")
    p.add_argument("--force", action="store_true", help="replace summary.json / samples.jsonl in --out")
    p.set_defaults(fn=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from prefopt.errors import PrefoptError, RunInterrupted
    _setup_env()
    from prefopt import console
    console.configure("info")     # a run sets its own output.log_level
    # modules beside the user (a reward function in ./my_rewards.py) import, as with `python -m`
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:   # `key=value` overrides may also follow options (`reproduce R --check D key=value`)
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except RunInterrupted as e:
        print(f"prefopt: {e}", file=sys.stderr)
        return 130
    except PrefoptError as e:
        print(f"prefopt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
