"""Ablation sweeps: ``prefopt sweep RECIPE --grid objective.beta=0.01,0.1 --seeds 3``.

The cartesian product of the ``--grid key=v1,v2`` axes x seeds ``0..N-1`` (``train.seed``), all
validated up front; each point is one ``prefopt train`` run in ``<out>/points/<id>/run`` (``log.txt``,
``point.json`` beside it). Failed points are recorded, the rest go on; re-running into the same
``--out`` skips done points and retries failed ones. Results: ``results.md`` (mean ± std over seeds
per group), ``results.csv`` (per point), ``results.png``. Points run as local subprocesses, or with
``--address`` as Ray jobs (:func:`ray_job_runner`): then each run directory is written by the node
running the job, so ``--out`` must be storage shared at the same path by this machine and every node
(NFS, a mounted bucket); otherwise the metrics cannot be read and the points are reported failed.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from prefopt.errors import ConfigError

DEFAULT_METRICS = ("eval/rewards/accuracy", "eval/loss", "train/loss", "train/reward/mean")
Runner = Callable[[dict, Path], int]


@dataclasses.dataclass
class SweepResult:
    """Outcome of :func:`run_sweep`: one dict per point, one table row per group, the files written."""
    out_dir: Path
    points: list[dict]       # id, group, seed, overrides, status, cached, returncode, seconds, metrics, log_tail
    rows: list[dict]         # group, done, cached, failed, and per metric {"mean", "std", "n"}
    metrics: list[str]       # the tabulated metrics
    csv_path: Path; md_path: Path; png_path: Path | None   # noqa: E702

    @property
    def failed(self) -> list[dict]:
        return [p for p in self.points if p["status"] != "done"]


def _split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ``["a", "b", "[1,2]"]``: commas inside brackets or braces don't split."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            values.append(cur.strip()); cur = ""
        else:
            cur += ch
    return values + [cur.strip()]


def _dir_name(raw: str) -> str:
    """A directory name for ``raw``: unsafe characters become ``_``; a hash keeps altered names unique."""
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", raw)
    if safe != raw or len(safe) > 150:
        safe = f"{safe[:150]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return safe


def expand_grid(grids: list[str], seeds: int) -> list[dict]:
    """The points of ``grids`` (``"key=v1,v2"`` axes) x seeds ``0..seeds-1``, in a stable order.

    Each point is ``{"id", "group", "seed", "params", "overrides"}``: ``overrides`` are the
    ``key=value`` strings (values kept as given) plus ``train.seed=<s>``; ``group`` is the point
    without its seed; ``id`` (a directory name) is e.g. ``objective.beta=0.01,seed=0``.
    """
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"sweep: --seeds must be a positive integer, got {seeds!r}")
    axes: list[tuple[str, list[str]]] = []
    for grid in grids:
        key, sep, text = grid.partition("=")
        key = key.strip()
        values = _split_values(text) if sep else []
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key) or not all(values):
            raise ConfigError(f"sweep: bad --grid '{grid}': expected key=value1,value2,... "
                              f"(e.g. objective.beta=0.01,0.1)")
        problem = ("is given twice; list all its values in one --grid" if key in dict(axes) else
                   "is set by --seeds N" if key == "train.seed" else
                   "repeats a value" if len(set(values)) != len(values) else None)
        if problem:
            raise ConfigError(f"sweep: --grid key '{key}' {problem}")
        axes.append((key, values))
    if not axes:
        raise ConfigError("sweep: give at least one --grid key=value1,value2,...")
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        params = dict(zip((k for k, _ in axes), combo))
        group = ",".join(f"{k}={v}" for k, v in params.items())
        for seed in range(seeds):
            points.append({"id": _dir_name(f"{group},seed={seed}"), "group": group, "seed": seed,
                           "params": params,
                           "overrides": [f"{k}={v}" for k, v in params.items()] + [f"train.seed={seed}"]})
    return points


def validate_points(recipe_path: str | Path, points: list[dict], overrides=(), *, remote: bool = False) -> None:
    """Check every point before anything runs: each point's recipe loads (a mistyped key or bad value
    fails), and :func:`prefopt.preflight.prepare` (models, data, reward functions, resources) passes
    once for each distinct model / data / roles / objective combination. ``remote``: the points run as
    Ray jobs on a cluster (``prepare(remote=True)``)."""
    import json

    from prefopt.config import load_recipe, recipe_to_dict
    from prefopt.errors import PrefoptError
    from prefopt.preflight import prepare
    seen = set()
    for p in points:
        try:
            recipe = load_recipe(recipe_path, [*overrides, *p["overrides"]])
            d = recipe_to_dict(recipe)
            key = json.dumps([d["model"], d["data"], d["roles"], d["ray"], d["objective"]["name"]],
                             sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                recipe.output.run_dir = None          # each point gets its own folder
                prepare(recipe, remote=remote)
        except PrefoptError as e:
            raise ConfigError(f"sweep point {p['id']}: {e}") from None


def local_runner(point: dict, point_dir: Path) -> int:
    """Run one point as ``python -m prefopt.cli train`` in a subprocess; output to ``log.txt``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "prefopt.cli", "train", point["recipe"], *point["command_overrides"]]
    with open(point_dir / "log.txt", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n"); log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def ray_job_runner(address: str, *, working_dir: str = ".", poll_s: float = 5.0) -> Runner:
    """A runner that submits each point as a Ray job to the cluster at ``address`` (its dashboard,
    e.g. ``http://HEAD:8265``) and waits for it; the job's logs go to ``log.txt``. ``working_dir``
    is uploaded with every job (the recipe path and relative paths must be valid inside it). The job
    driver joins the cluster it runs on (Ray sets ``RAY_ADDRESS``). ``--out`` must be shared storage
    (see the module docstring)."""
    import shlex

    from ray.job_submission import JobStatus

    from prefopt.jobs import client as job_client
    client = job_client(address)
    runtime_env = {"working_dir": working_dir, "env_vars": {"OMP_NUM_THREADS": "1"},
                   "excludes": [".git", ".venv", ".cache", "runs"]}

    def run(point: dict, point_dir: Path) -> int:
        entrypoint = shlex.join(["python", "-m", "prefopt.cli", "train", point["recipe"],
                                 *point["command_overrides"]])
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   metadata={"prefopt_sweep_point": point["id"][:200]})
        while not (status := client.get_job_status(job_id)).is_terminal():
            time.sleep(poll_s)
        (point_dir / "log.txt").write_text(f"$ {entrypoint}\n# ray job {job_id}: {status}\n"
                                           + client.get_job_logs(job_id))
        return 0 if status == JobStatus.SUCCEEDED else 1
    return run


def read_point_metrics(run_dir: Path) -> dict[str, float]:
    """A point's final numbers (``prefopt.io.run_dir.final_metrics``)."""
    from prefopt.io.run_dir import final_metrics
    return final_metrics(run_dir)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _run_point(point: dict, point_dir: Path, runner: Runner) -> dict:
    """Run one point (archiving an earlier failed attempt) and write its ``point.json``."""
    point_dir.mkdir(parents=True, exist_ok=True)
    old = [point_dir / name for name in ("run", "log.txt", "point.json") if (point_dir / name).exists()]
    if old:   # an earlier failed or interrupted attempt: keep it aside (a run dir is never reused)
        attempt = point_dir / f"attempt-{1 + len(list(point_dir.glob('attempt-*')))}"
        attempt.mkdir()
        for path in old:
            shutil.move(str(path), str(attempt / path.name))
    start = time.time()
    try:
        returncode = runner(point, point_dir)
    except Exception as e:   # a runner that crashes fails its point, not the sweep
        with open(point_dir / "log.txt", "a") as log:
            log.write(f"\nsweep runner error: {type(e).__name__}: {e}\n")
        returncode = -1
    metrics, status, log = {}, "done" if returncode == 0 else "failed", point_dir / "log.txt"
    try:
        metrics = read_point_metrics(point_dir / "run") if status == "done" else {}
    except OSError:
        status = "failed"
        with open(log, "a") as f:
            f.write(f"\nsweep: the run finished but {point_dir / 'run' / 'metrics.jsonl'} cannot be read "
                    f"(cluster mode: is --out on storage shared with the cluster?)\n")
    result = {"id": point["id"], "group": point["group"], "seed": point["seed"], "status": status,
              "overrides": point["overrides"], "metrics": metrics, "returncode": returncode,
              "seconds": round(time.time() - start, 2),
              "log_tail": log.read_text(errors="replace").splitlines()[-20:] if log.is_file() else []}
    _write_json(point_dir / "point.json", result)
    return {**result, "cached": False}


def choose_metrics(points: list[dict], metrics=None) -> list[str]:
    """``metrics`` if given, else the defaults that some finished point has."""
    have = {k for p in points if p["status"] == "done" for k in p["metrics"]}
    return list(metrics) if metrics else [m for m in DEFAULT_METRICS if m in have]


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else None
    return {"mean": mean, "std": std, "n": n}


def summarize(points: list[dict], metrics: list[str]) -> list[dict]:
    """One row per group (in first-seen order): status counts and mean/std (n-1) over finished seeds."""
    rows, groups = [], {}
    for p in points:
        groups.setdefault(p["group"], []).append(p)
    for group, members in groups.items():
        done = [p for p in members if p["status"] == "done"]
        row = {"group": group, "params": members[0].get("params") or {}, "done": len(done), "cached": sum(bool(p.get("cached")) for p in done),
               "failed": len(members) - len(done)}
        for m in metrics:
            row[m] = _stats([p["metrics"][m] for p in done if p["metrics"].get(m) is not None])
        rows.append(row)
    return rows


def format_cell(stats: dict) -> str:
    """``mean ± std``; ``–`` for a std of fewer than 2 values and for a mean of none."""
    fmt = lambda x: "–" if x is None else f"{x:.4g}"   # noqa: E731
    return "–" if not stats["n"] else f"{fmt(stats['mean'])} ± {fmt(stats['std'])}"


def format_markdown(rows: list[dict], metrics: list[str], points: list[dict]) -> str:
    head = ["group", "done", "failed", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        done = f"{r['done']} ({r['cached']} cached)" if r["cached"] else str(r["done"])
        lines.append("| " + " | ".join([r["group"].replace("|", "\\|"), done, str(r["failed"]),
                                        *(format_cell(r[m]) for m in metrics)]) + " |")
    failed = [p for p in points if p["status"] != "done"]
    if failed:
        lines += ["", "## Failed points", ""]
        for p in failed:
            last = next((line for line in reversed(p.get("log_tail") or []) if line.strip()), "")
            last = last.strip()[:300].replace("`", "'")
            lines.append(f"- `{p['id']}`: return code {p['returncode']}: {last}")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, points: list[dict], metrics: list[str], title: str = "") -> SweepResult:
    """Write ``results.csv``, ``results.md`` and ``results.png`` (bars: group means, std error bars)."""
    rows = summarize(points, metrics)
    csv_path, md_path, png_path = out_dir / "results.csv", out_dir / "results.md", out_dir / "results.png"
    extra = sorted({k for p in points for k in p["metrics"]} - set(metrics))
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "group", "seed", "status", "cached", "returncode", "seconds", *metrics, *extra])
        for p in points:
            w.writerow([p["id"], p["group"], p["seed"], p["status"], bool(p.get("cached")), p["returncode"],
                        p["seconds"], *(p["metrics"].get(m, "") for m in (*metrics, *extra))])
    md_path.write_text((f"# {title}\n\n" if title else "") + format_markdown(rows, metrics, points))
    if metrics:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 0.9 * len(rows) + 2) * len(metrics), 4.5),
                                 squeeze=False)
        labels = ["\n".join(v[:28] for v in r["params"].values()) or r["group"] for r in rows]
        for ax, m in zip(axes[0], metrics):
            means = [r[m]["mean"] if r[m]["mean"] is not None else math.nan for r in rows]
            errs = [r[m]["std"] or 0.0 for r in rows]
            ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
            ax.set_xticks(range(len(rows)), labels, fontsize=8)
            ax.set_title(m); ax.set_xlabel(" / ".join(rows[0]["params"]), fontsize=8)   # noqa: E702
        fig.tight_layout()
        fig.savefig(png_path, dpi=110)
        plt.close(fig)
    else:
        png_path = None
    return SweepResult(out_dir, points, rows, metrics, csv_path, md_path, png_path)


def run_sweep(recipe_path, grids, seeds, *, overrides=(), out_dir, concurrency=1, metrics=None,
              runner: Runner | None = None, echo: Callable[[str], None] | None = None,
              remote: bool = False) -> SweepResult:
    """Validate, run (skipping points already done in ``out_dir``) and tabulate a sweep.

    ``runner(point, point_dir) -> returncode`` runs one point (default :func:`local_runner`); it gets
    the point plus ``recipe`` and ``command_overrides`` (the ``prefopt train`` arguments, with
    ``output.run_dir=<point_dir>/run``) and must write ``<point_dir>/log.txt``.
    """
    from prefopt.config import resolve_recipe_path
    if concurrency < 1:
        raise ConfigError(f"sweep: --concurrency must be >= 1, got {concurrency}")
    out_dir = Path(out_dir).resolve()
    points = expand_grid(list(grids), seeds)
    validate_points(recipe_path, points, overrides, remote=remote)
    spec = {"recipe": str(resolve_recipe_path(recipe_path)), "overrides": list(overrides)}
    old = json.loads((out_dir / "sweep.json").read_text()) if (out_dir / "sweep.json").is_file() else spec
    if (old["recipe"], old["overrides"]) != (spec["recipe"], spec["overrides"]):
        raise ConfigError(f"sweep: {out_dir} holds a sweep of {old['recipe']} with overrides {old['overrides']}; "
                          f"re-use it only with the same recipe and overrides")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "sweep.json", {**spec, "grids": list(grids), "seeds": seeds})
    runner, echo = runner or local_runner, echo or (lambda _msg: None)
    results, todo = {}, []
    for p in points:
        pdir = out_dir / "points" / p["id"]
        old = json.loads((pdir / "point.json").read_text()) if (pdir / "point.json").is_file() else {}
        if old.get("status") == "done":
            results[p["id"]] = {**p, **old, "cached": True}
            echo(f"skip  {p['id']} (done in an earlier run)")
        else:
            todo.append(({**p, "recipe": str(recipe_path), "command_overrides": [
                *overrides, *p["overrides"], f"output.run_dir={pdir / 'run'}", "output.progress_bar=false"]}, pdir))
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(_run_point, point, pdir, runner): point for point, pdir in todo}
        for n, future in enumerate(as_completed(futures), 1):   # a failed point doesn't stop the others
            point = {k: v for k, v in futures[future].items() if k not in ("recipe", "command_overrides")}
            res = results[point["id"]] = {**point, **future.result()}
            echo(f"{res['status']:<6} {res['id']} ({res['seconds']:.0f} s; {n}/{len(todo)})")
    ordered = [results[p["id"]] for p in points]
    title = f"Sweep of {recipe_path}: {' x '.join(grids)} x {seeds} seed(s)"
    return write_results(out_dir, ordered, choose_metrics(ordered, metrics), title)


class _IntermixedParsing:
    """Parse optionals and positionals intermixed (``RECIPE --grid a=1,2 key=value``); plain argparse
    consumes the ``nargs="*"`` positional right after RECIPE and rejects later ``key=value``."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixed_pass", False):    # the inner passes of parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        self._intermixed_pass = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed_pass = False


def add_sweep_arguments(parser) -> None:
    """Arguments of ``prefopt sweep`` (wire with ``parser.set_defaults(fn=sweep_command)``); the
    parser (e.g. a subparser) is switched to intermixed parsing so overrides may follow options."""
    if not isinstance(parser, _IntermixedParsing):
        parser.__class__ = type(f"Sweep{type(parser).__name__}", (_IntermixedParsing, type(parser)), {})
    parser.add_argument("recipe", help="recipe file (or a name in recipes/)")
    parser.add_argument("--grid", action="append", required=True, metavar="key=v1,v2",
                        help="one sweep axis; repeat for a cartesian product")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per grid point (train.seed)")
    parser.add_argument("--concurrency", type=int, default=1, help="points running at once")
    parser.add_argument("--metrics", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                        default=None, help="comma list, e.g. eval/rewards/accuracy,train/loss")
    parser.add_argument("--out", help="sweep directory (default runs/sweeps/<name>-<time>); "
                                      "re-use it to skip done points")
    parser.add_argument("--address", help="Ray dashboard (http://HEAD:8265): run points as Ray jobs "
                                          "(--out must be shared storage)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every point")


def sweep_command(args) -> int:
    """Run ``prefopt sweep``; print the table and the files; 1 if any point failed."""
    out = args.out
    if out is None:
        from prefopt.config import load_recipe
        name = load_recipe(args.recipe, args.overrides).name
        out = Path("runs") / "sweeps" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runner = ray_job_runner(args.address) if args.address else None
    result = run_sweep(args.recipe, args.grid, args.seeds, overrides=args.overrides, out_dir=out,
                       concurrency=args.concurrency, metrics=args.metrics, runner=runner,
                       echo=lambda msg: print(msg, flush=True), remote=bool(args.address))
    files = [result.md_path, result.csv_path] + ([result.png_path] if result.png_path else [])
    print("\n" + result.md_path.read_text() + "\nresults: " + "\n         ".join(map(str, files)))
    return 1 if result.failed else 0
