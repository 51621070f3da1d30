"""SFT: the loss against the cross-entropy formula, SFT data rows (plain and chat), and, end to end on
real Ray + DeepSpeed, a run that learns and the data-parallel invariance of its loss."""
import json

import pytest
import torch
import torch.nn.functional as F

from prefopt.config import load_recipe
from prefopt.data import build_examples
from prefopt.errors import DataError
from prefopt.objectives.sft import sft_loss


def test_sft_loss_is_the_mean_token_cross_entropy_of_each_response():
    torch.manual_seed(0)
    vocab, lengths = 11, [3, 5, 1]
    losses, expected = [], []
    for n in lengths:
        logits, labels = torch.randn(n, vocab, dtype=torch.float64), torch.randint(0, vocab, (n,))
        logp = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).sum()
        losses.append(logp)
        expected.append(F.cross_entropy(logits, labels))          # mean over the response's tokens
    got = sft_loss(torch.stack(losses), torch.tensor(lengths, dtype=torch.float64))
    torch.testing.assert_close(got, torch.stack(expected))


def test_sft_rows_plain_and_chat(tok):
    cfg = load_recipe("tiny_sft").data
    rows = [{"prompt": "Describe the river.", "response": "kind clear."},
            {"prompt": [{"role": "user", "content": "Describe the city."}],
             "response": [{"role": "assistant", "content": "calm warm."}]}]
    kind, examples, skipped, _ = build_examples(rows, tok, cfg, source="sft.jsonl")
    assert kind == "sft" and skipped == 0 and [len(e.response_ids) for e in examples] == [1, 1]
    assert tok.decode(examples[0].response_ids[0], skip_special_tokens=True) == "kind clear."
    chat = [{"messages": [{"role": "user", "content": "Describe the city."},
                          {"role": "assistant", "content": "calm warm."}]}]
    _, from_messages, _, _ = build_examples(chat, tok, cfg, source="chat.jsonl")
    assert from_messages[0].prompt_ids == examples[1].prompt_ids
    assert from_messages[0].response_ids == examples[1].response_ids


@pytest.mark.parametrize("row,field,message", [
    ({"prompt": "Describe the river.", "response": ""}, "response", "empty text"),
    ({"prompt": "Describe the river.", "response": 7}, "response", "expected a string or a list of chat messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "at least 2 chat messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}, "messages",
     "must be the assistant's"),
])
def test_bad_sft_rows_name_the_row_and_field(tok, row, field, message):
    cfg = load_recipe("tiny_sft").data
    good = {"prompt": "Describe the river.", "response": "kind clear."}
    with pytest.raises(DataError, match=message) as e:
        build_examples([good, row], tok, cfg, source="sft.jsonl")
    assert e.value.row == 1 and e.value.field.startswith(field) and "sft.jsonl" in str(e.value)


def run(tmp_path, *overrides):
    from prefopt.train import train
    recipe = load_recipe("tiny_sft", [f"output.root={tmp_path}", "output.progress_bar=false", *overrides])
    return train(recipe, quiet=True)


@pytest.mark.slow
def test_sft_learns_and_saves_a_model(ray_cluster, tmp_path):
    result = run(tmp_path / "sft")
    first, last = result.eval_history[0]["loss"], result.eval_history[-1]["loss"]
    assert first > 6.0 and last < 3.6, (first, last)     # ln(512) ~ 6.24 untrained; near the data's entropy
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "sft" and summary["eval_perplexity_final"] < 40
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(result.run_dir / "model").config.model_type == "llama"
    assert (result.run_dir / "curves.png").exists()


@pytest.mark.slow
def test_sft_two_learners_equal_one_learner_and_accumulation(ray_cluster, tmp_path):
    """2 learners x 4 examples == 1 learner x 8 == 1 learner x 2 micro-batches of 4 (first step)."""
    common = ("train.batch_size=8", "train.max_steps=1", "output.save_model=false")
    two = run(tmp_path / "two", *common, "roles.learner.num_actors=2", "train.micro_batch_size=4")
    one = run(tmp_path / "one", *common, "roles.learner.num_actors=1", "train.micro_batch_size=8")
    acc = run(tmp_path / "acc", *common, "roles.learner.num_actors=1", "train.micro_batch_size=4")
    o = one.train_history[0]
    for other in (two.train_history[0], acc.train_history[0]):
        assert other["loss"] == pytest.approx(o["loss"], abs=1e-5)
        assert other["grad_norm"] == pytest.approx(o["grad_norm"], abs=1e-5)
    assert o["grad_norm"] > 1e-3
