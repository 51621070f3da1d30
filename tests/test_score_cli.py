"""`prefopt score`: preference strength of pairs from a reward model or an ensemble (mean and std over
members of r_chosen - r_rejected), flipping and dropping pairs, margins that reward-model training reads;
real tiny reward models, no mocks."""
import json
import statistics

import pytest
import torch

from prefopt.cli import main
from prefopt.config_schema import DataConfig
from prefopt.curation import curate
from prefopt.data.synthetic import make_pairs
from prefopt.errors import ConfigError, DataError
from prefopt.rewards.scorer import RewardScorer

CHAT_PROMPT = [{"role": "user", "content": "Describe the river."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The builtin tiny reward model and a copy whose score head is re-drawn (seeded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefopt.models.tiny import resolve_model_path
    base = resolve_model_path("builtin:tiny-reward")
    root = tmp_path_factory.mktemp("rms")
    other = root / "other"
    torch.manual_seed(7)
    model = AutoModelForSequenceClassification.from_pretrained(base)
    with torch.no_grad():
        model.score.weight.normal_(std=model.config.initializer_range)
    model.save_pretrained(other, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(other)
    heads = root / "heads"     # two heads (attributes)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, id2label={0: "helpfulness", 1: "verbosity"}, label2id={"helpfulness": 0, "verbosity": 1},
        ignore_mismatched_sizes=True)
    model.save_pretrained(heads, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(heads)
    return {"base": base, "other": str(other), "heads": str(heads)}


def pairs_file(path, rows=None):
    rows = rows if rows is not None else [{"id": i, **r} for i, r in enumerate(make_pairs(10, seed=3))] + [
        {"id": 10, "prompt": CHAT_PROMPT, "chosen": CHAT_PROMPT + [{"role": "assistant", "content": "kind clear."}],
         "rejected": [{"role": "assistant", "content": "rude vague wrong."}], "extra": {"note": "kept"}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- curate


def test_curate_strength_flip_drop_and_margin_field():
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "id": i} for i in range(3)]
    chosen, rejected = [[1.0, 0.0, 2.0], [3.0, 1.0, 2.1]], [[0.0, 2.0, 2.0], [1.0, 0.0, 2.0]]
    out, stats = curate(rows, chosen, rejected)
    diffs = [[c - r for c, r in zip(chosen[m], rejected[m])] for m in range(2)]
    for i, row in enumerate(out):
        d = [diffs[0][i], diffs[1][i]]
        assert list(row)[:4] == ["prompt", "chosen", "rejected", "id"]          # original fields first, in order
        assert row["preference_strength"] == pytest.approx(statistics.mean(d), abs=1e-12)
        assert row["preference_strength_std"] == pytest.approx(statistics.pstdev(d), abs=1e-12)   # ddof 0
        assert row["margin"] == row["preference_strength"]
        assert row["rewards_chosen"] == [chosen[0][i], chosen[1][i]]
        assert row["reward_rejected"] == pytest.approx((rejected[0][i] + rejected[1][i]) / 2)
        assert "flipped" not in row
    assert [r["preference_strength"] for r in out] == pytest.approx([1.5, -0.5, 0.05])
    assert "margin" not in rows[0]                                                # the input rows are left alone
    assert stats.member_accuracy == pytest.approx([1 / 3, 1.0])
    assert stats.ensemble_accuracy == pytest.approx(2 / 3) and stats.agreement == pytest.approx(1 / 3)
    assert stats.mean_strength == pytest.approx((1.5 - 0.5 + 0.05) / 3)

    out, stats = curate(rows, chosen, rejected, flip_negative=True, drop_ambiguous=0.1, margin_field="m")
    assert (stats.flipped, stats.dropped, stats.written) == (1, 1, 2)
    assert [r["id"] for r in out] == [0, 1]                                       # row 2: |0.05| < 0.1
    flipped = out[1]
    assert (flipped["chosen"], flipped["rejected"], flipped["flipped"], out[0]["flipped"]) == ("r1", "c1", True, False)
    assert flipped["preference_strength"] == pytest.approx(0.5) and flipped["m"] == pytest.approx(0.5)
    assert flipped["rewards_chosen"] == [2.0, 0.0] and flipped["rewards_rejected"] == [0.0, 1.0]
    assert flipped["reward_chosen"] == pytest.approx(1.0) and "margin" not in flipped

    (one,), _ = curate(rows[:1], [[0.5]], [[1.5]], flip_negative=True)             # one member
    assert "rewards_chosen" not in one and one["preference_strength_std"] == 0.0
    assert (one["chosen"], one["margin"], one["reward_chosen"]) == ("r0", 1.0, 1.5)

    with pytest.raises(DataError, match="row 0, field 'margin'"):                 # never silently replaced
        curate([{**rows[0], "margin": 3.0}], [[1.0]], [[0.0]])
    (redone,), _ = curate([{**rows[0], "margin": 3.0}], [[1.0]], [[0.0]], overwrite_fields=True)
    assert redone["margin"] == 1.0
    with pytest.raises(ConfigError, match="--margin-field"):
        curate(rows, chosen, rejected, margin_field="chosen")
    with pytest.raises(ConfigError, match="--drop-ambiguous"):
        curate(rows, chosen, rejected, drop_ambiguous=-1.0)


# ------------------------------------------------------------------------------------------- CLI


def test_score_cli_writes_the_ensembles_rewards(tmp_path, models, capsys):
    data, out = tmp_path / "pairs.jsonl", tmp_path / "new" / "dir" / "scored.jsonl"
    rows = pairs_file(data)
    members = [models["base"], models["other"]]
    assert main(["score", str(data), "--reward", *members, "--out", str(out), "--batch-tokens", "256"]) == 0
    printed = capsys.readouterr().out
    assert "scored 11 pairs with 2 reward model(s); wrote 11 rows" in printed and "flipped 0, dropped 0" in printed
    assert "ensemble agreement" in printed and str(out) in printed

    prompts = [r["prompt"] for r in rows]
    chosen = [r["chosen"] for r in rows[:-1]] + ["kind clear."]
    rejected = [r["rejected"] for r in rows[:-1]] + ["rude vague wrong."]
    scores = RewardScorer(members, batch_tokens=256).score(prompts + prompts, chosen + rejected)
    r_c = [[s[0] for s in m[:11]] for m in scores]
    r_r = [[s[0] for s in m[11:]] for m in scores]
    written = read_jsonl(out)
    assert len(written) == 11
    for i, (row, new) in enumerate(zip(rows, written)):
        assert {k: new[k] for k in row} == row and list(new)[:len(row)] == list(row)   # fields kept, in order
        d = [r_c[m][i] - r_r[m][i] for m in range(2)]
        assert new["rewards_chosen"] == pytest.approx([r_c[0][i], r_c[1][i]], abs=1e-6)
        assert new["rewards_rejected"] == pytest.approx([r_r[0][i], r_r[1][i]], abs=1e-6)
        assert new["reward_chosen"] == pytest.approx((r_c[0][i] + r_c[1][i]) / 2, abs=1e-6)
        assert new["preference_strength"] == pytest.approx(statistics.mean(d), abs=1e-6)
        assert new["preference_strength_std"] == pytest.approx(statistics.pstdev(d), abs=1e-6)
        assert new["margin"] == new["preference_strength"]
    correct = [sum(r_c[m][i] > r_r[m][i] for i in range(11)) / 11 for m in range(2)]
    assert f"{members[0]} {correct[0]:.3f}, {members[1]} {correct[1]:.3f}" in printed

    # flip the negative pairs, drop the weak ones; a .json array
    strengths = [w["preference_strength"] for w in written]
    threshold = sorted(abs(s) for s in strengths)[3]
    out2 = tmp_path / "curated.json"
    assert main(["score", str(data), "--reward", *members, "--out", str(out2), "--flip-negative",
                 "--drop-ambiguous", str(threshold)]) == 0
    printed = capsys.readouterr().out
    kept = [(row, s) for row, s in zip(rows, strengths) if abs(s) >= threshold]
    flips = sum(s < 0 for _, s in kept)
    assert flips > 0
    assert f"flipped {flips}, dropped 3" in printed
    curated = json.loads(out2.read_text())
    assert [c["id"] for c in curated] == [row["id"] for row, _ in kept]
    for c, (row, s) in zip(curated, kept):
        assert c["flipped"] == (s < 0) and c["preference_strength"] == pytest.approx(abs(s), abs=1e-6)
        assert c["chosen"] == (row["rejected"] if s < 0 else row["chosen"])


def test_score_cli_refusals_change_nothing(tmp_path, models, capsys):
    data = tmp_path / "pairs.jsonl"
    pairs_file(data)
    before = data.read_bytes()
    out = tmp_path / "mine.jsonl"
    out.write_bytes(b"a user's file\n")
    assert main(["score", str(data), "--reward", models["base"], "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"a user's file\n"
    assert main(["score", str(data), "--reward", models["base"], "--out", str(data), "--force"]) == 2
    assert "is the input file" in capsys.readouterr().err and data.read_bytes() == before

    bad = tmp_path / "bad.jsonl"
    rows = make_pairs(4, seed=1)
    rows[2]["chosen"] = 42
    pairs_file(bad, rows)
    assert main(["score", str(bad), "--reward", models["base"], "--out", str(tmp_path / "o.jsonl")]) != 0
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 2" in err and "'chosen'" in err and "Traceback" not in err
    rows[2]["chosen"] = [{"role": "user", "content": "no answer"}]
    pairs_file(bad, rows)
    assert main(["score", str(bad), "--reward", models["base"], "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "row 2, field 'chosen': the last message is the response" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()

    # a multi-head model needs its heads weighed
    small = tmp_path / "small.jsonl"
    pairs_file(small, make_pairs(3, seed=2))
    assert main(["score", str(small), "--reward", models["heads"], "--out", str(tmp_path / "h.jsonl")]) == 2
    assert "--attribute-weights" in capsys.readouterr().err
    assert main(["score", str(small), "--reward", models["heads"], "--out", str(tmp_path / "h.jsonl"),
                 "--attribute-weights", "helpfulness=1,verbosity=-0.5"]) == 0
    rows = make_pairs(3, seed=2)
    (scores,) = RewardScorer([models["heads"]]).score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    assert [w["reward_chosen"] for w in read_jsonl(tmp_path / "h.jsonl")] == pytest.approx(
        [h - 0.5 * v for h, v in scores], abs=1e-6)


def test_scored_margins_load_as_reward_model_training_data(tmp_path, models, capsys):
    from transformers import AutoTokenizer

    from prefopt.data import build_examples
    data, out = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    pairs_file(data)
    assert main(["score", str(data), "--reward", models["base"], models["other"], "--out", str(out),
                 "--margin-field", "strength"]) == 0
    rows = read_jsonl(out)
    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    kind, examples, skipped, _ = build_examples(rows, tokenizer, DataConfig(path=str(out), margin_field="strength"),
                                                source=str(out))
    assert (kind, skipped, len(examples)) == ("pairs", 0, len(rows))
    assert [ex.margin for ex in examples] == pytest.approx([r["preference_strength"] for r in rows], abs=1e-12)
    assert all("margin" not in r for r in rows)
