"""Reward-model training: the row kinds, the score forward, the objectives, and real Ray + DeepSpeed runs
(Bradley–Terry, attribute regression, step-label PRM) whose saved checkpoints load with
``AutoModelForSequenceClassification``."""
import json
import math

import pytest
import torch

from prefopt.config import load_recipe
from prefopt.config_schema import DataConfig
from prefopt.data import build_examples
from prefopt.data.collate import collate_examples
from prefopt.data.synthetic import make_pairs, make_steps
from prefopt.errors import DataError
from prefopt.objectives import get_objective


@pytest.fixture(scope="module")
def reward_model(tok):
    from prefopt.models.reward import load_reward_model
    torch.manual_seed(0)
    return load_reward_model("builtin:tiny-llama", num_labels=2, labels=["a", "b"],
                             pad_token_id=tok.pad_token_id).eval()


def examples(tok, rows, **cfg):
    return build_examples(rows, tok, DataConfig(path="rows.jsonl", **cfg), source="rows.jsonl")


def test_step_rows_mark_the_last_token_of_every_step(tok):
    kind, exs, _, _ = examples(tok, make_steps(6, seed=1), step_delimiter=".")
    assert kind == "steps"
    for ex in exs:
        ids = ex.response_ids[0]
        assert len(ex.step_ends) == len(ex.step_labels) >= 2
        assert all(tok.decode([ids[e]]) == "." for e in ex.step_ends)       # each step ends on its delimiter
        assert ids[-1] == tok.eos_token_id and ex.step_ends[-1] == len(ids) - 2


def test_truncation_drops_the_steps_it_cuts(tok):
    row = {"prompt": "Describe the river.", "steps": ["kind clear honest calm"] * 6, "labels": [1.0] * 6}
    _, (ex,), _, _ = examples(tok, [row], step_delimiter=".", max_length=24, max_prompt_length=8)
    assert 0 < len(ex.step_ends) < 6 and ex.step_ends[-1] < len(ex.response_ids[0])
    assert len(ex.step_labels) == len(ex.step_ends)


def test_attribute_rows_keep_one_order_and_mask_what_a_row_does_not_rate(tok):
    rows = [{"prompt": "p", "response": "kind clear.", "attributes": {"b": 1.0, "a": 2.0}},
            {"prompt": "p", "response": "rude vague.", "attributes": {"a": 3.5}}]
    kind, exs, _, _ = examples(tok, rows)
    assert kind == "attributes" and exs[0].targets == [1.0, 2.0]
    assert exs[1].targets[1] == 3.5 and math.isnan(exs[1].targets[0])
    batch = collate_examples(exs, pad_id=tok.pad_token_id, kind="sft")
    assert batch["target_mask"].tolist() == [[True, True], [False, True]]


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "p", "steps": ["a b", "c"], "labels": [1.0]}, "labels", "one label per step"),
    ({"prompt": "p", "steps": ["a b", "c"], "labels": [1.0, 1.5]}, "labels", r"in \[0, 1\]"),
    ({"prompt": "p", "steps": ["a b", ""], "labels": [1.0, 0.0]}, "steps", "step 1"),
    ({"prompt": "p", "response": "r", "attributes": {"a": "good"}}, "attributes.a", "finite number"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "finite number"),
])
def test_bad_reward_rows_name_the_row_and_field(tok, row, field, message):
    good = {"steps": {"prompt": "p", "steps": ["a"], "labels": [1.0]},
            "response": {"prompt": "p", "response": "r", "attributes": {"a": 1.0}},
            "chosen": {"prompt": "p", "chosen": "a", "rejected": "b"}}[next(k for k in ("steps", "response", "chosen")
                                                                        if k in row)]
    with pytest.raises(DataError, match=message) as e:
        examples(tok, [good, row])
    assert e.value.row == 1 and e.value.field == field


def test_score_forward_equals_hf_padded_packed_and_per_prefix(tok, reward_model):
    """The head at each row's last token is what HF's sequence-classification forward returns; packed
    and padded forwards agree; a PRM's step scores from one forward equal scoring each prefix alone."""
    from prefopt.models.reward import forward_scores
    _, exs, _, _ = examples(tok, make_pairs(4))
    batch = collate_examples(exs, pad_id=tok.pad_token_id, kind="lists")
    with torch.no_grad():
        out = forward_scores(reward_model, batch)
        packed = forward_scores(reward_model, batch, packing="rows")
        hf = reward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.scores.shape == (8, 1, 2)
    torch.testing.assert_close(out.scores[:, 0], hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.scores, out.scores, atol=1e-5, rtol=0)

    _, exs, _, _ = examples(tok, make_steps(4, seed=2), step_delimiter=".")
    batch = collate_examples(exs, pad_id=tok.pad_token_id, kind="sft")
    with torch.no_grad():
        out = forward_scores(reward_model, batch)
        packed = forward_scores(reward_model, batch, packing="rows")
        for i, ex in enumerate(exs):
            ids = ex.prompt_ids + ex.response_ids[0]
            prefixes = torch.stack([reward_model(input_ids=torch.tensor([ids[:len(ex.prompt_ids) + e + 1]])).logits[0]
                                    for e in ex.step_ends])
            torch.testing.assert_close(out.scores[i, :len(ex.step_ends)], prefixes, atol=1e-5, rtol=0)
    assert out.mask.sum().item() == sum(len(ex.step_ends) for ex in exs)
    torch.testing.assert_close(packed.scores[out.mask], out.scores[out.mask], atol=1e-5, rtol=0)


def test_reward_model_objective_trains_on_every_ordered_pair_of_a_list():
    from prefopt.objectives.base import ScoreOutput
    from prefopt.objectives.reward_model import bradley_terry_loss
    cls = get_objective("reward_model")
    rewards = torch.tensor([0.3, -0.2, 1.0, 0.5, 0.5], dtype=torch.float64)      # list of 3, then a pair
    batch = {"slot_mask": torch.tensor([[True, True, True], [True, True, False]]),
             "scores": torch.tensor([[2.0, 0.0, 1.0], [1.0, 0.0, 0.0]])}
    scores = ScoreOutput(rewards.reshape(5, 1, 1), torch.ones(5, 1).bool())
    out = cls(cls.Params(label_smoothing=0.1)).loss(scores, batch)
    r = rewards.tolist()
    pairs0 = [(r[0], r[1]), (r[0], r[2]), (r[2], r[1])]                          # scores 2 > 1 > 0
    l0 = sum(bradley_terry_loss(torch.tensor(c, dtype=torch.float64), torch.tensor(j, dtype=torch.float64),
                                label_smoothing=0.1) for c, j in pairs0) / 3
    l1 = bradley_terry_loss(torch.tensor(r[3], dtype=torch.float64), torch.tensor(r[4], dtype=torch.float64),
                            label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(float(l0 + l1) / 2, abs=1e-9)
    assert out.metrics["accuracy"].tolist() == pytest.approx([2 / 3, 0.5])   # 1.0 > 0.3 is wrong; a tie: half
    assert out.metrics["rewards/chosen"].tolist() == pytest.approx([0.3, 0.5])


def test_reward_objectives_refuse_data_of_another_kind(tmp_path):
    from prefopt.errors import ConfigError
    from prefopt.preflight import prepare
    recipe = load_recipe("tiny_rm_regression", [f"output.root={tmp_path}", "data.path=synthetic:pairs"])
    with pytest.raises(ConfigError, match="trains on attributes rows, but .* holds pairs rows"):
        prepare(recipe)


# ------------------------------------------------------------------------------------------ e2e

def run(name, root, *overrides):
    from prefopt.train import train
    return train(load_recipe(name, [f"output.root={root}", "output.progress_bar=false", *overrides]), quiet=True)


def held_out(recipe_name, tok):
    """The held-out examples of a recipe's run (same data, seed and split)."""
    from prefopt.data import load_preference_data
    recipe = load_recipe(recipe_name)
    return load_preference_data(recipe.data, tok, seed=recipe.train.seed).eval


@pytest.mark.slow
def test_bradley_terry_reward_model_learns_and_its_checkpoint_gives_the_same_scores(ray_cluster, tmp_path, tok):
    from transformers import AutoModelForSequenceClassification
    result = run("tiny_rm", tmp_path)
    first, last = result.eval_history[0], result.eval_history[-1]
    assert 0.3 <= first["accuracy"] <= 0.7 and last["accuracy"] >= 0.9, (first["accuracy"], last["accuracy"])
    assert last["rewards/std"] > 0 and last["margin"] > 0

    model_dir = result.run_dir / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["prefopt_reward"] == {"kind": "outcome", "heads": ["reward"]}
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    exs = held_out("tiny_rm", tok)
    batch = collate_examples(exs, pad_id=tok.pad_token_id, kind="pairs")
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].double()
    chosen, rejected = scores[:len(exs)], scores[len(exs):]
    assert chosen.mean().item() == pytest.approx(last["rewards/chosen"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(last["rewards/rejected"], abs=1e-4)
    assert (chosen > rejected).double().mean().item() == pytest.approx(last["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_reward_model_resume_is_exact(ray_cluster, tmp_path):
    overrides = ["train.max_steps=6", "output.checkpoint_every=3", "train.eval_every=0", "output.save_model=false",
                 "output.keep_checkpoints=0"]
    full = run("tiny_rm", tmp_path, *overrides)
    from prefopt.io.checkpoint import list_checkpoints
    first = list_checkpoints(full.run_dir)[0]
    resumed = run("tiny_rm", tmp_path, *overrides, f"resume={first}")
    assert [h["step"] for h in resumed.train_history] == [h["step"] for h in full.train_history]
    for key in ("loss", "grad_norm", "accuracy"):
        assert [h[key] for h in resumed.train_history] == pytest.approx([h[key] for h in full.train_history],
                                                                        abs=1e-6), key
    assert resumed.eval_history[-1]["loss"] == pytest.approx(full.eval_history[-1]["loss"], abs=1e-6)


@pytest.mark.slow
def test_attribute_regression_reward_model_learns_its_named_heads(ray_cluster, tmp_path, tok):
    result = run("tiny_rm_regression", tmp_path)
    first, last = result.eval_history[0], result.eval_history[-1]
    assert last["mse"] < 0.1 * first["mse"], (first["mse"], last["mse"])      # ~4.9 -> ~0.1
    assert last["mse/helpfulness"] < 0.3 and last["mse/verbosity"] < 0.3      # the ratings' variance is ~1.3
    config = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "helpfulness", "1": "verbosity"}
    assert config["prefopt_reward"]["heads"] == ["helpfulness", "verbosity"]
    assert "helpfulness" in (result.run_dir / "config.yaml").read_text()     # the resolved heads are recorded
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model", use_safetensors=True).eval()
    exs = held_out("tiny_rm_regression", tok)
    batch = collate_examples(exs, pad_id=tok.pad_token_id, kind="sft")
    with torch.no_grad():
        predicted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    mse = ((predicted - batch["targets"].double()) ** 2).mean(-1).mean().item()
    assert mse == pytest.approx(last["mse"], abs=1e-4)          # the checkpoint predicts what training measured


@pytest.mark.slow
def test_step_label_prm_learns_and_serves_the_same_step_scores(ray_cluster, tmp_path, tok):
    result = run("tiny_prm_train", tmp_path)
    first, last = result.eval_history[0], result.eval_history[-1]
    assert last["step_accuracy"] >= 0.9, (first["step_accuracy"], last["step_accuracy"])
    config = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert config["prefopt_reward"] == {"kind": "process", "heads": ["step_correct"], "step_delimiter": "."}
    # served (one forward per response, its own tokenizer), the saved PRM scores the held-out steps as in training
    from prefopt.data.synthetic import make_steps
    from prefopt.rewards.scorer import RewardScorer
    recipe = load_recipe("tiny_prm_train")
    rows = make_steps(recipe.data.synthetic.num_rows, recipe.data.synthetic.seed)
    held = [rows[ex.row] for ex in held_out("tiny_prm_train", tok)]
    (probs,) = RewardScorer([str(result.run_dir / "model")]).score_steps([r["prompt"] for r in held],
                                                                          [r["steps"] for r in held])
    right = [sum((p > 0.5) == (label >= 0.5) for p, label in zip(ps, r["labels"])) / len(ps)
             for ps, r in zip(probs, held)]
    assert sum(right) / len(right) == pytest.approx(last["step_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_reward_model_then_grpo_raises_the_hidden_rule(ray_cluster, tmp_path):
    """The pipeline by name: tiny_rm_lists trains a reward model on lists graded by a hidden rule (every
    ordered pair); tiny_rm_grpo (reward source `run:tiny-rm-lists`, the newest finished run of that recipe)
    optimises it and the rule's score rises."""
    rm = run("tiny_rm_lists", tmp_path, "train.eval_every=0")
    assert rm.eval_history[-1]["accuracy"] >= 0.9
    policy = run("tiny_rm_grpo", tmp_path, "train.iterations=16", "output.save_model=false")
    config = (policy.run_dir / "config.yaml").read_text()
    assert str(rm.run_dir / "model") in config                      # run:tiny-rm resolved and recorded
    rule = [h["reward/hidden_rule"] for h in policy.train_history]
    model = [h["reward/rm"] for h in policy.train_history]
    assert sum(rule[-4:]) / 4 > sum(rule[:4]) / 4 + 0.15, rule
    assert sum(model[-4:]) / 4 > sum(model[:4]) / 4, model


def test_run_reference_names_the_missing_run(tmp_path):
    from prefopt.errors import ConfigError
    from prefopt.preflight import prepare
    recipe = load_recipe("tiny_rm_grpo", [f"output.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"roles.reward.sources\[0\].model: 'run:tiny-rm-lists' names the model "
                                          r"of a finished run of recipe 'tiny-rm-lists'"):
        prepare(recipe)


def test_run_reference_takes_the_newest_finished_run_of_that_recipe_only(tmp_path):
    import json as _json
    import os
    import time

    from prefopt.io.run_dir import MARKER, run_model

    def fake_run(name, stamp, finished=True):
        d = tmp_path / f"{name}-{stamp}"
        (d / "model").mkdir(parents=True)
        (d / MARKER).write_text("{}")
        (d / "model" / "config.json").write_text("{}")
        if finished:
            (d / "summary.json").write_text(_json.dumps({"name": name}))
        return d
    old = fake_run("tiny-rm", "20261201-100000")
    os.utime(old / "summary.json", (time.time() - 100, time.time() - 100))
    new = fake_run("tiny-rm", "20261201-110000")
    fake_run("tiny-rm", "20261201-120000", finished=False)            # a failed or running one
    fake_run("tiny-rm-lists", "20261201-130000")                      # another recipe, newer
    assert run_model("run:tiny-rm", tmp_path, "x") == str((new / "model").resolve())
    assert run_model("/some/path", tmp_path, "x") == "/some/path"


def test_sft_rows_that_carry_attributes_are_sft_rows_for_sft(tok):
    rows = [{"prompt": "p", "response": "kind clear.", "attributes": {"a": 1.0}}]
    assert examples(tok, rows)[0] == "attributes"
    kind, _, _, _ = build_examples(rows, tok, DataConfig(path="x"), source="x", kinds=("sft",))
    assert kind == "sft"
