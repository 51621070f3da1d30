"""Driver side of constrained PPO (no Ray): per-channel advantages, the multi-head critic layout,
multiplier updates from batch returns, the recipe checks, and the Nelder-Mead threshold search."""
import random

import pytest
import torch

from prefopt.config import load_recipe
from prefopt.data.rollouts import RolloutSample
from prefopt.errors import ConfigError
from prefopt.loops.constrained import Constraints, search_thresholds
from prefopt.objectives.constrained_ppo import value_heads
from prefopt.rl.lagrange import combined_advantage
from prefopt.rl.signals import at_last_token, estimate_advantages, per_token, task_token_rewards

XI = "recipes/tiny_constrained_xi.yaml"


def _samples(n: int, heads: int | None = None, seed: int = 0) -> list[RolloutSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(1, 6)
        s = RolloutSample(prompt_ids=[1, 2], response_ids=[5] * length, reward=rng.gauss(0, 1),
                          old_logps=[rng.gauss(-2, 0.3) for _ in range(length)],
                          ref_logps=[rng.gauss(-2, 0.3) for _ in range(length)],
                          reward_components={"length": float(length), "good": rng.random()})
        if heads:
            s.values = [[rng.gauss(0, 1) for _ in range(heads)] for _ in range(length)]
        out.append(s)
    return out


def test_grpo_channels_combine_with_the_multipliers():
    recipe = load_recipe(XI, ["roles.reward.sources.0.multiplier_init=0.3"])
    c = Constraints(recipe)
    assert c.names == ["length"] and c.kinds == ["eq"] and c.thresholds == [6.0]
    samples = _samples(8)
    stats = c.compute_advantages(samples, recipe.objective, group_size=4)

    p = recipe.objective
    task, mask, _ = task_token_rewards(samples, p)
    length = at_last_token([s.reward_components["length"] for s in samples], mask)
    a_task, _ = estimate_advantages(task, None, mask, p, 4)
    a_len, _ = estimate_advantages(length, None, mask, p, 4)
    expected = combined_advantage(a_task, a_len[None], [0.3])
    got, _ = per_token(samples, "advantages")
    assert torch.allclose(got, expected * mask, atol=1e-9)
    assert stats["constraint/task_weight"] == pytest.approx(1 - 0.3, abs=1e-9)


def test_gae_uses_one_critic_head_per_channel():
    recipe = load_recipe(XI, ["objective.advantage=gae", "roles.critic.num_actors=1"])
    assert value_heads(recipe) == 2
    c = Constraints(recipe)
    samples = _samples(6, heads=2)
    c.compute_advantages(samples, recipe.objective, group_size=2)
    returns, mask = per_token(samples, "returns")
    values, _ = per_token(samples, "values")
    assert returns.shape == values.shape == (6, mask.shape[1], 2)
    # head 1 is the length channel: with gamma = lam = 1 and no KL in it, returns = the score
    p = recipe.objective
    length = at_last_token([s.reward_components["length"] for s in samples], mask)
    _, ret_len = estimate_advantages(length, values[..., 1], mask, p, 2)
    assert torch.allclose(returns[..., 1], ret_len * mask, atol=1e-9)


def test_multiplier_update_follows_the_batch_return():
    recipe = load_recipe(XI, [])
    c = Constraints(recipe)
    long = _samples(8)
    for s in long:
        s.reward_components["length"] = 9.0            # J = 9 > threshold 6
    stats = c.update(long)
    assert stats["constraint/length/return"] == 9.0 and stats["constraint/length/threshold"] == 6.0
    assert stats["constraint/length/multiplier"] == 0.0 and stats["constraint/length/multiplier_next"] < 0
    for s in long:
        s.reward_components["length"] = 1.0            # J < threshold: the multiplier climbs back
    values = [c.update(long)["constraint/length/multiplier_next"] for _ in range(10)]
    assert values[-1] > values[0] and values[-1] > 0


def test_constraints_state_round_trip():
    recipe = load_recipe(XI, [])
    a, b = Constraints(recipe), Constraints(recipe)
    samples = _samples(4)
    for _ in range(3):
        a.update(samples)
    b.load_state_dict(a.state_dict())
    assert a.update(samples) == b.update(samples)


@pytest.mark.parametrize("override,message", [
    (["roles.reward.sources.0.constraint=between"], "must be 'ge'"),
    (["roles.reward.sources.0.threshold=null"], "threshold is required"),
    (["objective.name=ppo"], "needs objective.name: constrained_ppo"),
    (["objective.nelder_mead.eval_fn=prefopt.rewards.builtin:nope"], "has no function 'nope'"),
])
def test_recipe_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(XI, override)


def test_fixed_weight_recipe_has_no_constraint_and_xi_needs_one():
    assert value_heads(load_recipe("recipes/tiny_constrained_fixed.yaml", [])) == 1
    with pytest.raises(ConfigError, match="at least one reward source"):
        load_recipe("recipes/tiny_constrained_fixed.yaml", ["objective.name=constrained_ppo"])


def test_nelder_mead_search_finds_the_best_threshold_within_budget():
    recipe = load_recipe("recipes/tiny_constrained_nm.yaml", [])
    c = Constraints(recipe)
    trained = []

    def advance(n):
        trained.append(n)
        return sum(trained)

    def evaluate():   # a score that peaks at threshold 9
        return -(c.thresholds[0] - 9.0) ** 2

    out = search_thresholds(c, recipe.objective.nelder_mead, 60, advance, evaluate)
    assert len(out["evaluations"]) == 60 // recipe.objective.nelder_mead.iterations_per_eval
    assert sum(trained) == 60
    assert abs(out["best_thresholds"][0] - 9.0) < abs(6.0 - 9.0)
    assert out["best_score"] == max(e["score"] for e in out["evaluations"])
