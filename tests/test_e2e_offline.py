"""End to end on real Ray + DeepSpeed (CPU, gloo), the tiny model and synthetic learnable data.

No fakes: learner actors are Ray actors running DeepSpeed engines in one torch.distributed group.
"""
import json

import pytest

from prefopt.config import load_recipe
from prefopt.train import train

pytestmark = pytest.mark.slow


def run(recipe_name, tmp_path, *overrides):
    recipe = load_recipe(f"recipes/{recipe_name}.yaml",
                         [f"output.root={tmp_path}", "output.progress_bar=false", *overrides])
    return train(recipe, quiet=True)


def assert_reproduces(recipe_name, result):
    """The recipe's `expect:` ranges (what `prefopt reproduce` checks) hold for this run."""
    from prefopt.reproduce import check_run, format_checks
    checks = check_run(load_recipe(f"recipes/{recipe_name}.yaml").expect, result.run_dir)
    assert checks and all(c.passed for c in checks), format_checks(checks, recipe_name)


def held_out(result, metric):
    return result.eval_history[0][metric], result.eval_history[-1][metric]


def test_dpo_two_learners_zero2_learns_and_writes_outputs(ray_cluster, tmp_path):
    result = run("tiny_dpo", tmp_path)
    start, end = held_out(result, "rewards/accuracy")
    assert start == pytest.approx(0.5, abs=0.1)   # policy == reference: chance
    assert end >= 0.9
    losses = [h["loss"] for h in result.train_history]
    assert losses[0] == pytest.approx(0.693147, abs=1e-3) and losses[-1] < 0.3

    d = result.run_dir
    placement = json.loads((d / "placement.json").read_text())
    assert [p["rank"] for p in placement] == [0, 1] and {p["backend"] for p in placement} == {"gloo"}
    assert (d / "config.yaml").read_text().count("zero_stage: 2") == 1
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert len(train_records) == result.steps
    for key in ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s"):
        assert all(r[key] is not None for r in train_records), key
    assert any(p.name.startswith("events.out.tfevents") for p in (d / "tensorboard").iterdir())
    summary = json.loads((d / "summary.json").read_text())
    assert summary["eval_accuracy_final"] == pytest.approx(end)

    # the final model is a plain HF checkpoint in safetensors
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert (d / "model" / "model.safetensors").exists()
    assert not list((d / "model").glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(d / "model")
    tokenizer = AutoTokenizer.from_pretrained(d / "model")
    assert model.config.vocab_size == len(tokenizer)


def test_simpo_two_learners_zero2_learns(ray_cluster, tmp_path):
    result = run("tiny_simpo", tmp_path)
    start, end = held_out(result, "rewards/accuracy")
    assert start < 0.75 and end >= 0.9
    assert_reproduces("tiny_simpo", result)


@pytest.mark.parametrize("recipe", ["tiny_lipo", "tiny_listmle"])
def test_listwise_two_learners_zero2_learns_ranking(ray_cluster, tmp_path, recipe):
    result = run(recipe, tmp_path)
    start, end = held_out(result, "ranking/accuracy")
    assert start == pytest.approx(0.5, abs=0.05)
    assert end >= 0.9
    assert_reproduces(recipe, result)


def test_zero3_learns_and_saves_a_loadable_model(ray_cluster, tmp_path):
    result = run("tiny_dpo_zero3", tmp_path, "train.epochs=1")
    assert held_out(result, "rewards/accuracy")[1] >= 0.9
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(result.run_dir / "model")
    assert sum(p.numel() for p in model.parameters()) > 100_000


def test_one_learner_zero0(ray_cluster, tmp_path):
    result = run("tiny_dpo", tmp_path, "roles.learner.num_actors=1", "roles.learner.zero_stage=0",
                 "train.max_steps=24", "output.save_model=false")
    assert result.steps == 24
    assert all(h["grad_norm"] > 0 for h in result.train_history)
    assert result.train_history[-1]["loss"] < result.train_history[0]["loss"]


def test_same_seed_same_metrics(ray_cluster, tmp_path):
    args = ("train.max_steps=8", "output.save_model=false", "train.eval_every=4")
    a = run("tiny_dpo", tmp_path / "a", *args)
    b = run("tiny_dpo", tmp_path / "b", *args)
    strip = lambda hist: [{k: v for k, v in h.items() if "per_s" not in k and "time" not in k
                           and "memory" not in k} for h in hist]
    assert strip(a.train_history) == strip(b.train_history)
    assert a.eval_history == b.eval_history


def test_two_learners_batch4_equal_one_learner_batch8(ray_cluster, tmp_path):
    """Data parallelism is exact: 2 learners x 4 pairs == 1 learner x 8 pairs (first step)."""
    common = ("train.batch_size=8", "train.max_steps=1", "output.save_model=false")
    two = run("tiny_dpo", tmp_path / "two", *common, "roles.learner.num_actors=2", "train.micro_batch_size=4")
    one = run("tiny_dpo", tmp_path / "one", *common, "roles.learner.num_actors=1", "train.micro_batch_size=8")
    t, o = two.train_history[0], one.train_history[0]
    assert t["loss"] == pytest.approx(o["loss"], abs=1e-5)
    assert t["grad_norm"] == pytest.approx(o["grad_norm"], abs=1e-5)
    assert t["grad_norm"] > 1e-3
    # and gradient accumulation: 1 learner x 2 micro-batches of 4 == 1 learner x 1 micro-batch of 8
    acc = run("tiny_dpo", tmp_path / "acc", *common, "roles.learner.num_actors=1", "train.micro_batch_size=4")
    assert acc.train_history[0]["loss"] == pytest.approx(o["loss"], abs=1e-5)
    assert acc.train_history[0]["grad_norm"] == pytest.approx(o["grad_norm"], abs=1e-5)
    # and token-budget micro-batches (unequal sizes, weighted by their share), 2 learners under ZeRO-2
    tok = run("tiny_dpo", tmp_path / "tok", *common, "roles.learner.num_actors=2", "train.micro_batch_size=4",
              "train.micro_batch_tokens=100")   # micro-batches of 3 and 1 pairs
    assert tok.train_history[0]["micro_batches"] >= 2 and one.train_history[0]["micro_batches"] == 1
    assert tok.train_history[0]["loss"] == pytest.approx(o["loss"], abs=1e-5)
    assert tok.train_history[0]["grad_norm"] == pytest.approx(o["grad_norm"], abs=1e-5)


def test_zero0_one_learner_without_allreduce_equals_two_learners(ray_cluster, tmp_path):
    """ZeRO-0 with a single data-parallel rank skips DeepSpeed's gradient all-reduce (a flatten and
    copy of every gradient); the first two steps still equal 2 learners that do all-reduce (the
    second step's loss and gradient are taken after the first update, so they check it too)."""
    common = ("train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=2",
              "roles.learner.zero_stage=0", "output.save_model=false")
    one = run("tiny_dpo", tmp_path / "one", *common, "roles.learner.num_actors=1")
    two = run("tiny_dpo", tmp_path / "two", *common, "roles.learner.num_actors=2")
    placement = lambda result: json.loads((result.run_dir / "placement.json").read_text())
    assert [p["gradient_allreduce"] for p in placement(one)] == [False]
    assert [p["gradient_allreduce"] for p in placement(two)] == [True, True]
    for o, t in zip(one.train_history, two.train_history, strict=True):
        assert o["loss"] == pytest.approx(t["loss"], abs=1e-5)
        assert o["grad_norm"] == pytest.approx(t["grad_norm"], abs=1e-5)


@pytest.mark.parametrize("lora", [[], ["model.lora={r: 8, alpha: 16}"]], ids=["full", "lora"])
def test_reference_actor_matches_learner_reference(ray_cluster, tmp_path, lora):
    """The reference log-probs from a reference actor (the base model) equal the learners' own before the
    first update; with LoRA, the learners' model with its adapters disabled (no copy of the base)."""
    common = ("train.max_steps=2", "output.save_model=false", *lora)
    on_learner = run("tiny_dpo", tmp_path / "l", *common)
    on_actor = run("tiny_dpo", tmp_path / "a", *common, "roles.reference.placement=actor")
    roles = [p["role"] for p in json.loads((on_actor.run_dir / "placement.json").read_text())]
    assert sorted(roles) == ["policy", "policy", "reference"]
    for x, y in zip(on_learner.train_history, on_actor.train_history):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["rewards/margin"] == pytest.approx(y["rewards/margin"], abs=1e-6)
