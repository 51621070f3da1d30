"""Ablation sweeps (``prefopt.sweep``): the grid, up-front validation, the results table and files,
and (slow) a real sweep of tiny DPO runs with a failing point, re-run to check that done points
are skipped."""
import csv
import json
import math
import time

import pytest

from prefopt.errors import ConfigError
from prefopt.io.run_dir import MetricsLogger
from prefopt.sweep import add_sweep_arguments, expand_grid, format_cell, run_sweep, summarize, validate_points

RECIPE = "recipes/tiny_dpo.yaml"


def test_expand_grid_is_the_product_times_seeds():
    points = expand_grid(["objective.beta=0.01,0.1", "objective.name=dpo,simpo"], seeds=3)
    assert len(points) == 12
    assert [p["id"] for p in points[:4]] == [
        "objective.beta=0.01,objective.name=dpo,seed=0", "objective.beta=0.01,objective.name=dpo,seed=1",
        "objective.beta=0.01,objective.name=dpo,seed=2", "objective.beta=0.01,objective.name=simpo,seed=0"]
    assert points[0]["overrides"] == ["objective.beta=0.01", "objective.name=dpo", "train.seed=0"]
    assert points[5]["overrides"][-1] == "train.seed=2" and points[5]["seed"] == 2
    assert points[5]["group"] == "objective.beta=0.01,objective.name=simpo"
    assert len({p["id"] for p in points}) == 12 and len({p["group"] for p in points}) == 4
    assert expand_grid(["objective.beta=0.01,0.1", "objective.name=dpo,simpo"], seeds=3) == points  # stable


def test_grid_values_are_kept_as_strings_and_ids_are_directory_names():
    points = expand_grid(["train.adam_betas=[0.9,0.99],[0.8,0.9]", "model.path=/ckpts/a b"], seeds=1)
    assert [p["params"]["train.adam_betas"] for p in points] == ["[0.9,0.99]", "[0.8,0.9]"]
    for p in points:
        assert "/" not in p["id"] and " " not in p["id"] and "[" not in p["id"]
    assert len({p["id"] for p in points}) == 2


@pytest.mark.parametrize("grid", ["objective.beta", "=0.1,0.2", "objective.beta=", "objective.beta=0.1,,0.2",
                                  "objective beta=0.1", "objective.beta=0.1,0.1", "train.seed=1,2"])
def test_bad_grid_syntax_is_a_config_error(grid):
    with pytest.raises(ConfigError, match="sweep"):
        expand_grid([grid], seeds=1)


def test_bad_seeds_and_repeated_axes_are_errors():
    with pytest.raises(ConfigError, match="--seeds"):
        expand_grid(["objective.beta=0.1"], seeds=0)
    with pytest.raises(ConfigError, match="twice"):
        expand_grid(["objective.beta=0.1", "objective.beta=0.2"], seeds=1)


def test_a_mistyped_key_fails_up_front_naming_the_point(tmp_path):
    calls = []
    with pytest.raises(ConfigError) as err:
        run_sweep(RECIPE, ["objective.beta=0.1,0.2", "train.lrr=1e-3"], 2, out_dir=tmp_path / "sweep",
                  runner=lambda point, d: calls.append(point) or 0)
    assert "sweep point objective.beta=0.1,train.lrr=1e-3,seed=0" in str(err.value)
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in str(err.value)
    assert not calls and not (tmp_path / "sweep").exists()


def test_a_bad_value_for_one_point_only_fails_up_front():
    points = expand_grid(["objective.beta=0.1,-1"], seeds=1)
    with pytest.raises(ConfigError, match=r"sweep point objective.beta=-1,seed=0: .*beta must be > 0"):
        validate_points(RECIPE, points)


def _point(group, seed, status="done", **metrics):
    return {"id": f"{group},seed={seed}", "group": group, "seed": seed, "status": status, "metrics": metrics,
            "returncode": 0 if status == "done" else 1, "seconds": 1.0, "log_tail": ["boom"]}


def test_table_math_mean_and_sample_std_over_finished_seeds():
    points = [_point("b=0.1", 0, acc=0.8, loss=1.0), _point("b=0.1", 1, acc=0.9, loss=2.0),
              _point("b=0.1", 2, acc=1.0, loss=6.0), _point("b=0.5", 0, acc=0.6),
              _point("b=0.5", 1, "failed"), _point("b=0.9", 0, "failed")]
    rows = summarize(points, ["acc", "loss"])
    assert [r["group"] for r in rows] == ["b=0.1", "b=0.5", "b=0.9"]
    a = rows[0]
    assert (a["done"], a["failed"]) == (3, 0)
    assert a["acc"]["mean"] == pytest.approx(0.9) and a["acc"]["std"] == pytest.approx(0.1)
    assert a["loss"]["mean"] == pytest.approx(3.0) and a["loss"]["std"] == pytest.approx(math.sqrt(7.0))
    assert (rows[1]["done"], rows[1]["failed"]) == (1, 1)
    assert rows[1]["acc"] == {"mean": 0.6, "std": None, "n": 1} and rows[1]["loss"]["n"] == 0
    assert format_cell(a["acc"]) == "0.9 ± 0.1"
    assert format_cell(rows[1]["acc"]) == "0.6 ± –"
    assert format_cell(rows[2]["acc"]) == "–"


def _fake_runner(point, point_dir):
    """Writes a run directory like a finished offline run; beta=0.3 'crashes'."""
    (point_dir / "log.txt").write_text("starting\n")
    beta = float(point["params"]["objective.beta"])
    if beta == 0.3:
        (point_dir / "log.txt").write_text("starting\nRuntimeError: fake crash\n")
        return 3
    assert point["command_overrides"][-2:] == [f"output.run_dir={point_dir / 'run'}", "output.progress_bar=false"]
    assert point["command_overrides"][0] == "train.max_steps=3"
    run = point_dir / "run"
    run.mkdir()
    logger = MetricsLogger(run, loggers=[])
    logger.log(1, {"loss": 0.7, "rewards/accuracy": 0.5}, "train")
    logger.log(2, {"loss": beta + point["seed"] / 10, "rewards/accuracy": 0.9}, "train")
    logger.log(0, {"loss": 0.69, "rewards/accuracy": 0.5}, "eval")
    logger.log(2, {"loss": 0.5, "rewards/accuracy": 0.75 + point["seed"] / 20}, "eval")
    logger.close()
    (run / "summary.json").write_text(json.dumps({"steps": 2, "objective": "dpo"}))
    return 0


def test_results_files_and_rerun_skips_done_points(tmp_path):
    out = tmp_path / "sweep"
    grids = ["objective.beta=0.1,0.2,0.3"]
    res = run_sweep(RECIPE, grids, 2, overrides=["train.max_steps=3"], out_dir=out, concurrency=2,
                    runner=_fake_runner)
    assert res.metrics == ["eval/rewards/accuracy", "eval/loss", "train/loss"]
    assert [p["status"] for p in res.points] == ["done"] * 4 + ["failed"] * 2
    p0 = res.points[0]
    assert p0["metrics"]["train/loss"] == pytest.approx(0.1) and p0["metrics"]["summary/steps"] == 2
    assert "summary/objective" not in p0["metrics"]
    assert res.points[1]["metrics"]["eval/rewards/accuracy"] == pytest.approx(0.8)

    md = res.md_path.read_text()
    assert "| objective.beta=0.1 | 2 | 0 | 0.775 ± 0.03536 | 0.5 ± 0 | 0.15 ± 0.07071 |" in md
    assert "| objective.beta=0.3 | 0 | 2 | – | – | – |" in md
    assert "## Failed points" in md and "`objective.beta=0.3,seed=0`: return code 3: RuntimeError: fake crash" in md
    rows = list(csv.DictReader(res.csv_path.open()))
    assert len(rows) == 6 and rows[0]["id"] == "objective.beta=0.1,seed=0" and rows[0]["status"] == "done"
    assert float(rows[1]["train/loss"]) == pytest.approx(0.2) and rows[5]["status"] == "failed"
    assert res.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for p in res.points:
        saved = json.loads((out / "points" / p["id"] / "point.json").read_text())
        assert saved["status"] == p["status"] and saved["overrides"] == p["overrides"]
        assert set(saved) >= {"status", "overrides", "metrics", "returncode", "seconds"}

    # again: the done points are skipped, the failed ones re-run (their first attempt kept aside)
    ran = []
    res2 = run_sweep(RECIPE, grids, 2, overrides=["train.max_steps=3"], out_dir=out,
                     runner=lambda p, d: ran.append(p["id"]) or _fake_runner(p, d))
    assert ran == ["objective.beta=0.3,seed=0", "objective.beta=0.3,seed=1"]
    assert [p.get("cached") for p in res2.points] == [True] * 4 + [False] * 2
    assert (out / "points" / "objective.beta=0.3,seed=0" / "attempt-1" / "log.txt").is_file()
    assert "| objective.beta=0.1 | 2 (2 cached) | 0 |" in res2.md_path.read_text()
    with pytest.raises(ConfigError, match="same recipe and overrides"):
        run_sweep(RECIPE, grids, 2, overrides=["train.max_steps=4"], out_dir=out, runner=_fake_runner)


def test_chosen_metrics_and_a_crashing_runner(tmp_path):
    def crash(point, point_dir):
        raise RuntimeError("cannot reach the cluster")
    res = run_sweep(RECIPE, ["objective.beta=0.1"], 1, out_dir=tmp_path, runner=crash, metrics=["eval/loss"])
    assert res.points[0]["status"] == "failed" and res.points[0]["returncode"] == -1
    assert "cannot reach the cluster" in res.md_path.read_text()
    assert res.metrics == ["eval/loss"]


def test_cli_arguments():
    import argparse
    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    args = parser.parse_args([RECIPE, "--grid", "objective.beta=0.01,0.1", "--grid", "objective.name=dpo,simpo",
                              "--seeds", "3", "--metrics", "eval/loss, train/loss", "train.lr=1e-3"])
    assert args.grid == ["objective.beta=0.01,0.1", "objective.name=dpo,simpo"] and args.seeds == 3
    assert args.metrics == ["eval/loss", "train/loss"] and args.overrides == ["train.lr=1e-3"]
    assert (args.concurrency, args.out, args.address) == (1, None, None)
    with pytest.raises(SystemExit):
        parser.parse_args([RECIPE])   # --grid is required


FAST = ["train.max_steps=3", "train.max_skipped_steps=0", "roles.learner.num_actors=1", "roles.learner.zero_stage=0",
        "output.save_model=false", "output.loggers=[]", "data.synthetic.num_rows=64", "train.eval_every=0"]


@pytest.mark.slow
def test_real_sweep_of_tiny_dpo_with_a_failing_point_then_rerun(tmp_path):
    out = tmp_path / "sweep"
    # every point passes the pre-flight; the points with a NaN loss at step 1 (and no skipped step allowed)
    # fail at run time
    grids = ["train.debug_nan_steps=[],[1]"]
    t0 = time.time()
    res = run_sweep(RECIPE, grids, 2, overrides=FAST, out_dir=out, concurrency=2)
    first = time.time() - t0
    status = {p["id"]: p["status"] for p in res.points}
    assert len(status) == 4
    for p in res.points:
        failing = "[1]" in str(p["params"]["train.debug_nan_steps"])
        assert p["status"] == ("failed" if failing else "done"), (p["id"], p["status"], res.md_path.read_text())
    assert all(p["returncode"] != 0 for p in res.failed)
    assert res.metrics == ["eval/rewards/accuracy", "eval/loss", "train/loss"]
    for p in res.points:
        if p["status"] == "done":
            assert p["metrics"]["summary/steps"] == 3 and 0 <= p["metrics"]["eval/rewards/accuracy"] <= 1
    assert res.csv_path.is_file() and res.png_path.is_file() and res.md_path.is_file()
    md = res.md_path.read_text()
    row = next(line for line in md.splitlines() if line.startswith("| train.debug_nan_steps=[] |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["2", "0"]
    for cell in cells[3:]:
        mean, std = cell.split(" ± ")
        float(mean), float(std)
    assert "## Failed points" in md and "debug_nan_steps=[1]" in md

    done_json = {p["id"]: (out / "points" / p["id"] / "point.json") for p in res.points if p["status"] == "done"}
    mtimes = {pid: path.stat().st_mtime_ns for pid, path in done_json.items()}
    t0 = time.time()
    res2 = run_sweep(RECIPE, grids, 2, overrides=FAST, out_dir=out, concurrency=1)
    second = time.time() - t0
    assert {p["id"] for p in res2.points if p.get("cached")} == set(done_json)
    assert {pid: path.stat().st_mtime_ns for pid, path in done_json.items()} == mtimes
    assert [p["status"] for p in res2.points] == [p["status"] for p in res.points]
    assert second < first
    print(f"sweep: first run {first:.1f} s, re-run {second:.1f} s")


def test_sweep_command_prints_the_table_and_fails_if_a_point_failed(tmp_path, monkeypatch, capsys):
    import argparse

    import prefopt.sweep
    monkeypatch.setattr(prefopt.sweep, "local_runner", _fake_runner)
    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    args = parser.parse_args([RECIPE, "--grid", "objective.beta=0.1,0.3", "--out", str(tmp_path / "s"),
                              "train.max_steps=3"])
    assert prefopt.sweep.sweep_command(args) == 1
    printed = capsys.readouterr().out
    assert "| objective.beta=0.1 | 1 | 0 |" in printed and str(tmp_path / "s" / "results.md") in printed
    args = parser.parse_args([RECIPE, "--grid", "objective.beta=0.1", "--out", str(tmp_path / "s"),
                              "train.max_steps=3"])
    assert prefopt.sweep.sweep_command(args) == 0   # only the (cached) done point


def test_ray_job_runner_submits_polls_and_writes_logs(tmp_path, monkeypatch):
    import ray.job_submission as js

    from prefopt.sweep import ray_job_runner
    submitted = []

    class FakeClient:
        def __init__(self, address, headers=None):
            assert address == "http://head:8265"
            assert headers == {"Authorization": "Bearer tok-123"}      # the cluster's token is sent
            self.polls = 0

        def submit_job(self, *, entrypoint, runtime_env, metadata):
            submitted.append((entrypoint, runtime_env))
            return f"job-{len(submitted)}"

        def get_job_status(self, job_id):
            self.polls += 1
            if self.polls < 3:
                return js.JobStatus.RUNNING
            return js.JobStatus.SUCCEEDED if job_id == "job-1" else js.JobStatus.FAILED

        def get_job_logs(self, job_id):
            return f"logs of {job_id}\n"

    monkeypatch.setattr(js, "JobSubmissionClient", FakeClient)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123")
    runner = ray_job_runner("http://head:8265", poll_s=0)
    point = {"id": "objective.beta=0.1,seed=0", "recipe": RECIPE,
             "command_overrides": ["objective.beta=0.1", "output.run_dir=/shared/s/run"]}
    assert runner(point, tmp_path) == 0
    entrypoint, env = submitted[0]
    assert entrypoint == f"python -m prefopt.cli train {RECIPE} objective.beta=0.1 output.run_dir=/shared/s/run"
    assert env["working_dir"] == "." and env["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert "logs of job-1" in (tmp_path / "log.txt").read_text()
    assert runner(point, tmp_path) == 1
