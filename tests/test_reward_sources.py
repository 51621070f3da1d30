"""Reward sources: functions by dotted path, reward models in actors, weighted combination."""
import pytest

from prefopt.config_schema import RewardRoleConfig, RewardSourceConfig
from prefopt.errors import ConfigError
from prefopt.rewards.sources import SequenceRewards, check_sources, import_reward_fn


@pytest.mark.parametrize("spec, message", [
    ("prefopt.rewards.builtin.good_word_fraction", r"must look like 'package.module:function'"),
    ("prefopt.rewards.nope:f", r"cannot import module 'prefopt.rewards.nope'"),
    ("prefopt.rewards.builtin:nope", r"has no function 'nope'"),
])
def test_bad_reward_fn_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        import_reward_fn(spec)


def test_each_source_names_exactly_one_of_fn_or_model():
    with pytest.raises(ConfigError, match=r"sources\[0\] needs exactly one of 'fn'"):
        check_sources(RewardRoleConfig(sources=[RewardSourceConfig()]))
    with pytest.raises(ConfigError, match=r"is empty"):
        check_sources(RewardRoleConfig())


def test_weighted_sum_of_function_sources_keeps_components():
    cfg = RewardRoleConfig(sources=[
        RewardSourceConfig(fn="prefopt.rewards.builtin:good_word_fraction", weight=2.0),
        RewardSourceConfig(fn="prefopt.rewards.builtin:response_length", weight=-0.5, name="length")])
    totals, parts = SequenceRewards(cfg)(["p", "p"], ["kind rude kind.", "wrong"], [{}, {}])
    assert parts["good_word_fraction"] == pytest.approx([2 / 3, 0.0])
    assert parts["length"] == [3.0, 1.0]
    assert totals == pytest.approx([2 * 2 / 3 - 1.5, -0.5])


def test_non_finite_reward_names_the_source_and_sample():
    from prefopt.config_schema import RewardRoleConfig, RewardSourceConfig
    from prefopt.rewards.sources import NonFiniteReward, SequenceRewards
    import data_helpers
    data_helpers.FLAKY_CALLS["count"] = 64          # the 2nd call of this batch is the first NaN one (65)
    cfg = RewardRoleConfig(sources=[RewardSourceConfig(fn="data_helpers:flaky_good_word_fraction", name="flaky")])
    with pytest.raises(NonFiniteReward, match=r"reward 'flaky' returned nan for 2 sample\(s\), first: sample 1") as err:
        SequenceRewards(cfg)(["p"] * 3, ["kind", "kind", "kind"], [{}] * 3)
    assert err.value.samples == [1, 2]
