"""Online preference optimization: groups -> pairs / lists, dynamic sampling, and recipe checks (fast);
the e2e runs on real Ray + vLLM + DeepSpeed are in test_e2e_online_preference.py."""
import math

import pytest

from prefopt.config import load_recipe
from prefopt.data.rollouts import RolloutSample
from prefopt.errors import ConfigError
from prefopt.loops.groups import fill_groups, groups_of, informative, preference_examples


def samples_with(rewards: list[float], prompt: int = 0) -> list[RolloutSample]:
    return [RolloutSample(prompt_ids=[prompt, 1], response_ids=[10 + i, 2], reward=r) for i, r in enumerate(rewards)]


def test_informative_marks_groups_whose_rewards_do_not_all_tie():
    groups = [samples_with([1, 1, 1]), samples_with([0, 1, 0]), samples_with([0.5, 0.5, 0.6])]
    assert informative(groups) == [False, True, True]
    assert informative(groups, min_gap=0.2) == [False, True, False]


def test_pairs_are_first_best_vs_first_worst_and_ties_give_nothing():
    groups = [samples_with([0.2, 0.9, 0.1, 0.9], prompt=0), samples_with([1, 1, 1, 1], prompt=1),
              samples_with([0.0, 0.3, 0.0, 0.2], prompt=2)]
    pairs = preference_examples(groups, "pairs")
    assert len(pairs) == 2
    assert pairs[0].prompt_ids == [0, 1] and pairs[0].response_ids == [[11, 2], [12, 2]]
    assert pairs[1].prompt_ids == [2, 1] and pairs[1].response_ids == [[11, 2], [10, 2]]
    assert all(p.scores == [1.0, 0.0] for p in pairs)
    assert len(preference_examples(groups, "pairs", min_gap=0.5)) == 1


def test_lists_keep_every_response_graded_by_the_rank_of_its_reward():
    lists = preference_examples([samples_with([0.2, 0.9, 0.1]), samples_with([0.5, 0.5, 0.5]),
                                 samples_with([130.0, -40.0, 130.0])], "lists")
    assert len(lists) == 2
    assert lists[0].response_ids == [[10, 2], [11, 2], [12, 2]] and lists[0].scores == [1.0, 2.0, 0.0]
    assert lists[1].scores == [1.0, 0.0, 1.0]       # a reward model's scale: only the order is kept
    with pytest.raises(ValueError, match="pairs or lists"):
        preference_examples([samples_with([0, 1])], "sft")


def test_groups_of_refuses_a_partial_group():
    assert len(groups_of(samples_with([0, 1, 0, 1]), 2)) == 2
    with pytest.raises(ValueError):
        groups_of(samples_with([0, 1, 0]), 2)


def test_dynamic_sampling_fills_the_batch_with_informative_groups():
    """4 groups wanted; the first draw has 1 informative group of 4: the next round asks for
    ceil(3 / 0.25) = 12 prompts, capped at 4, and keeps 2 (3 of 8 so far); the third asks for
    ceil(1 / (3/8)) = 3. Each later draw alternates tied / informative groups."""
    asked = []

    def more(count, round_):
        asked.append((count, round_))
        return [s for g in range(count) for s in samples_with([0, 1] if g % 2 else [1, 1], prompt=100 * round_ + g)]

    first = samples_with([1, 1]) + samples_with([0, 1], prompt=1) + samples_with([0, 0], prompt=2) \
        + samples_with([1, 1], prompt=3)
    kept, stats = fill_groups(first, 2, want=4, max_rounds=4, min_gap=0.0, sample_more=more)
    assert asked == [(4, 2), (3, 3)]
    assert [s.prompt_ids[0] for s in kept[::2]] == [1, 201, 203, 301]
    assert stats == {"sampling/rounds": 3, "sampling/dropped_groups": 3 + 2 + 2, "sampling/missing_groups": 0}
    assert all(ok for ok in informative(groups_of(kept, 2)))


def test_dynamic_sampling_stops_after_max_rounds_and_counts_what_is_missing():
    tied = lambda count, round_: [s for g in range(count) for s in samples_with([1, 1], prompt=g)]  # noqa: E731
    kept, stats = fill_groups(samples_with([0, 1]) + samples_with([1, 1]), 2, want=2, max_rounds=2, min_gap=0.0,
                              sample_more=tied)
    assert len(kept) == 2
    assert stats == {"sampling/rounds": 2, "sampling/dropped_groups": 1 + math.ceil(1 / 0.5),
                     "sampling/missing_groups": 1}


ONLINE_DPO = ["roles.rollout.engines=1", "roles.rollout.sampling.n=4", "roles.reference.placement=actor",
              "roles.reward.sources=[{fn: 'prefopt.rewards.builtin:good_word_fraction'}]",
              "train.prompts_per_iteration=8", "train.batch_size=8", "train.micro_batch_size=4"]


def test_a_dpo_recipe_with_a_rollout_role_trains_online():
    from prefopt.algorithms import algorithm_for
    assert algorithm_for(load_recipe("recipes/tiny_dpo.yaml")).name == "preference"
    recipe = load_recipe("recipes/tiny_dpo.yaml", ONLINE_DPO)
    cls = algorithm_for(recipe)
    assert cls.name == "online_preference" and cls.reads == "prompts"
    spec = cls.role_spec(recipe)
    assert spec.reference is recipe.roles.reference and spec.rollout is recipe.roles.rollout
    simpo = load_recipe("recipes/tiny_simpo.yaml", [o for o in ONLINE_DPO if "reference" not in o])
    assert algorithm_for(simpo).role_spec(simpo).reference is None    # reference-free


@pytest.mark.parametrize("override, key", [
    ("roles.reference.placement=learner", "roles.reference.placement"),
    ("roles.rollout.sampling.n=1", "roles.rollout.sampling.n"),
    ("train.prompts_per_iteration=4", "train.prompts_per_iteration"),
    ("roles.reward.sources=[]", "roles.reward"),
    ("roles.reward.process={fn: 'prefopt.rewards.builtin:step_has_good_word'}", "roles.reward.process"),
])
def test_online_preference_recipe_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe("recipes/tiny_dpo.yaml", ONLINE_DPO + [override])


@pytest.mark.parametrize("recipe, override, key", [
    ("tiny_dpo", "train.dynamic_sampling=true", "train.dynamic_sampling"),
    ("tiny_sft", "train.sample_log_every=5", "train.sample_log_every"),
    ("tiny_rm", "train.min_reward_gap=0.1", "train.min_reward_gap"),
    ("tiny_constrained_xi", "train.dynamic_sampling=true", "train.dynamic_sampling"),
])
def test_online_only_keys_are_refused_where_they_would_be_ignored(recipe, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(f"recipes/{recipe}.yaml", [override])


def test_groups_are_judged_on_the_task_reward_not_the_shaped_one():
    """DAPO filters on accuracy: an all-wrong group whose overlong penalties differ is still uninformative."""
    group = samples_with([-0.5, 0.0])
    for s in group:
        s.task_reward = 0.0
    assert informative([group]) == [False]
    group[1].task_reward = 1.0
    assert informative([group]) == [True]


def test_simpo_online_needs_no_reference_placement():
    recipe = load_recipe("recipes/tiny_simpo.yaml", ONLINE_DPO)          # placement: actor, unused
    assert recipe.roles.reference.placement == "actor"
    load_recipe("recipes/tiny_simpo.yaml", ONLINE_DPO + ["roles.reference.placement=learner"])
