"""The constrained-RLHF paper's dialogue rewards (METEOR exact stage, intent accuracy) and the
DailyDialog prompt converter."""
import importlib.util
from pathlib import Path

import pytest

from prefopt.rewards import dialog


def test_meteor_exact_matches_the_formula():
    # every word matches; the left-to-right first-unused alignment (hypothesis -> reference index) is
    # the->1, cat->5, sat->3, on->0, the->4, mat->2: no two consecutive pairs are adjacent, 6 chunks
    hyp, ref = "the cat sat on the mat", "on the mat sat the cat"
    pairs = [(0, 1), (1, 5), (2, 3), (3, 0), (4, 4), (5, 2)]
    chunks = 1 + sum(1 for a, b in zip(pairs, pairs[1:]) if not (b[0] == a[0] + 1 and b[1] == a[1] + 1))
    m, p, r = 6, 1.0, 1.0
    fmean = p * r / (0.9 * p + 0.1 * r)
    assert dialog.meteor_exact(hyp, ref) == pytest.approx(fmean * (1 - 0.5 * (chunks / m) ** 3))
    assert dialog.meteor_exact("the cat", "the cat") == pytest.approx(1 - 0.5 * (1 / 2) ** 3)
    assert dialog.meteor_exact("dog", "the cat") == 0.0 and dialog.meteor_exact("", "x") == 0.0
    # partial match: 1 of 2 hypothesis words, 1 of 4 reference words
    p, r = 1 / 2, 1 / 4
    assert dialog.meteor_exact("cat runs", "the cat sat down") == pytest.approx(
        p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * 1.0 ** 3))
    assert dialog.meteor(prompt="x", response="the cat", row={"reference": "the cat"}) > 0.9


def test_intent_accuracy_uses_the_classifiers_top_class(tmp_path, monkeypatch):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from prefopt.models.tiny import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=4, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    monkeypatch.setenv("PREFOPT_INTENT_MODEL", str(tmp_path))
    monkeypatch.setattr(dialog, "_CLASSIFIER", {})
    with torch.no_grad():
        ids = tok("hello there <EOU> kind clear", return_tensors="pt")
        top = int(model(**ids).logits[0].argmax())
    row = {"intent": top}
    assert dialog.intent_accuracy(prompt="hello there <EOU>", response="kind clear", row=row) == 1.0
    assert dialog.intent_accuracy(prompt="hello there <EOU>", response="kind clear", row={"intent": (top + 1) % 4}) == 0.0


def test_daily_dialog_rows():
    spec = importlib.util.spec_from_file_location(
        "prepare_daily_dialog", Path(__file__).parent.parent / "docs" / "examples" / "prepare_daily_dialog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.dialog_rows(["Hi .", "Hello , how are you ?", "Fine ."], [2, 2, 1], context=1)
    assert rows == [{"prompt": "Hi . <EOU>", "reference": "Hello , how are you ?", "intent": 1},
                    {"prompt": "Hello , how are you ? <EOU>", "reference": "Fine .", "intent": 0}]
