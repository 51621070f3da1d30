"""Which actors a run starts is decided in one place, the algorithm's role spec; the resource checks
and the embedded cluster's size read it."""
import pytest

from prefopt.algorithms import algorithm_for, role_spec
from prefopt.config import load_recipe


def keys(recipe_name, *overrides):
    recipe = load_recipe(recipe_name, list(overrides))
    return {key: count for key, count, _ in role_spec(recipe).demand()}


@pytest.mark.parametrize("recipe,algorithm", [("tiny_dpo", "preference"), ("tiny_lipo", "preference"),
                                              ("tiny_sft", "sft"), ("tiny_grpo", "ppo"),
                                              ("tiny_constrained_xi", "constrained_ppo")])
def test_each_objective_names_its_algorithm(recipe, algorithm):
    assert algorithm_for(load_recipe(recipe)).name == algorithm


def test_offline_reference_actors_only_when_needed_and_placed_on_actors():
    assert keys("tiny_dpo") == {"roles.learner": 2}                           # the learners compute it
    assert keys("tiny_dpo", "roles.reference.placement=actor", "roles.reference.num_actors=2") == \
        {"roles.learner": 2, "roles.reference": 2}
    assert keys("tiny_simpo", "roles.reference={placement: actor}") == {"roles.learner": 2}   # reference-free
    assert keys("tiny_sft") == {"roles.learner": 2}


def test_online_roles_follow_the_objective():
    assert keys("tiny_grpo") == {"roles.learner": 1, "roles.reference": 1, "roles.rollout": 1}
    assert keys("tiny_grpo", "objective.kl_coef=0") == {"roles.learner": 1, "roles.rollout": 1}
    assert keys("tiny_ppo_gae")["roles.critic"] == 1
    with_models = keys("tiny_prm", "roles.reward.process={model: 'builtin:tiny-reward'}",
                       "roles.reward.sources=[{model: 'builtin:tiny-reward'}]")
    assert with_models["roles.reward.sources[0]"] == 1 and with_models["roles.reward.process"] == 1


def test_the_spec_sizes_the_cluster():
    spec = role_spec(load_recipe("tiny_grpo", ["roles.learner.num_cpus=2", "roles.rollout.num_gpus=1"]))
    assert spec.cpus() == 2 + 1 + 1 and spec.uses_gpus()
