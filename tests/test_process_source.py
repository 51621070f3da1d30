"""Process rewards in the loop: steps split on a delimiter, rewards placed on step-end tokens."""
import pytest

from prefopt.config_schema import ProcessRewardConfig
from prefopt.rewards.process_source import ProcessRewards
from prefopt.rewards.steps import split_steps


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_split_steps_positions(tok):
    ids = ids_of(tok, "kind clear. rude. calm brave")
    steps, ends = split_steps(ids, tok, ".")
    assert steps == ["kind clear", "rude", "calm brave"]
    pieces = [tok.decode([i]) for i in ids]
    assert [pieces[e] for e in ends] == [".", ".", " brave"]
    # trailing delimiter: no empty last step; eos after the text does not start a step
    steps, ends = split_steps(ids_of(tok, "kind. rude.") + [tok.eos_token_id], tok, ".")
    assert steps == ["kind", "rude"] and len(ends) == 2
    assert split_steps([], tok, ".") == ([], [])
    with pytest.raises(ValueError):
        split_steps(ids, tok, "")


def rewards_for(tok, text, **cfg):
    pr = ProcessRewards(ProcessRewardConfig(fn="prefopt.rewards.builtin:step_has_good_word", delimiter=".", **cfg), tok)
    ids = ids_of(tok, text)
    per_token, stats = pr(["p"], [ids], [{}])
    _, ends = split_steps(ids, tok, ".")
    return per_token[0], ends, stats


def test_plain_clip_delta_placement(tok):
    text = "kind clear. rude. calm brave. warm"      # PRM step rewards: 1, 0, 1, 1
    plain, ends, stats = rewards_for(tok, text, alpha=0.5)
    assert [plain[e] for e in ends] == [0.5, 0.0, 0.5, 0.5]
    assert sum(plain) == pytest.approx(1.5) and stats["reward/steps_per_response"] == 4
    clip, _, _ = rewards_for(tok, text, clip_eta=1.0)
    assert [clip[e] for e in ends] == [0.0, -1.0, 0.0, 0.0]
    delta, _, stats = rewards_for(tok, text, delta=True)
    assert [delta[e] for e in ends] == [1.0, -1.0, 0.0, 1.0]
    assert sum(delta) == pytest.approx(1.0)              # telescopes to the first step's reward
    assert stats["reward/process_refined_sum"] == pytest.approx(1.0)
    # every other token gets nothing
    assert all(v == 0.0 for i, v in enumerate(plain) if i not in ends)


def test_more_steps_pay_more_only_without_refinement(tok):
    one = "kind clear calm brave warm"
    many = "kind. clear. calm. brave. warm"
    assert sum(rewards_for(tok, many)[0]) > sum(rewards_for(tok, one)[0])
    for cfg in ({"clip_eta": 1.0}, {"delta": True}):
        assert sum(rewards_for(tok, many, **cfg)[0]) <= sum(rewards_for(tok, one, **cfg)[0])


def test_step_reward_fn_must_return_one_value_per_step(tok, tmp_path, monkeypatch):
    (tmp_path / "bad_prm.py").write_text("def prm(*, prompt, steps, row):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pr = ProcessRewards(ProcessRewardConfig(fn="bad_prm:prm", delimiter="."), tok)
    with pytest.raises(ValueError, match=r"returned 1 rewards for 2 steps"):
        pr(["p"], [ids_of(tok, "kind. rude.")], [{}])
