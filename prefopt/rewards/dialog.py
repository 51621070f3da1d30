"""Reward functions of the constrained-RLHF paper's dialogue task (Moskovitz et al. 2023, following
RL4LMs' DailyDialog setup): METEOR of the response against the reference next utterance, and the
accuracy of an intent classifier on the response. Rows come from
``docs/examples/prepare_daily_dialog.py``: ``{"prompt", "reference", "intent"}``.

Fidelity notes: :func:`meteor` is METEOR's exact-match stage (Banerjee & Lavie 2005: unigram
precision/recall harmonic mean weighted 9:1 towards recall, times a fragmentation penalty
``0.5 * (chunks / matches)^3``), without the stemming and WordNet-synonym stages of NLTK's
implementation that RL4LMs uses, so its values run somewhat lower. :func:`intent_accuracy` runs the
sequence classifier named by ``PREFOPT_INTENT_MODEL`` (default: RL4LMs'
``rajkumarrrk/roberta-daily-dialog-intent-classifier``) on ``context + " " + response``.
"""
from __future__ import annotations

import os
import re

_TOKEN = re.compile(r"\w+|[^\w\s]")
DEFAULT_INTENT_MODEL = "rajkumarrrk/roberta-daily-dialog-intent-classifier"


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def meteor_exact(hypothesis: str, reference: str, *, alpha: float = 0.9, beta: float = 3.0,
                 gamma: float = 0.5) -> float:
    """METEOR with exact unigram matching: ``Fmean * (1 - gamma * (chunks / m)^beta)`` where
    ``Fmean = P R / (alpha P + (1 - alpha) R)`` (alpha 0.9 = the original 10PR / (R + 9P))."""
    hyp, ref = _tokens(hypothesis), _tokens(reference)
    if not hyp or not ref:
        return 0.0
    # align each hypothesis token to the first unused equal reference token (left to right)
    used, alignment = set(), []
    for i, tok in enumerate(hyp):
        for j, other in enumerate(ref):
            if j not in used and other == tok:
                used.add(j)
                alignment.append((i, j))
                break
    m = len(alignment)
    if m == 0:
        return 0.0
    precision, recall = m / len(hyp), m / len(ref)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(alignment, alignment[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
    return fmean * (1 - gamma * (chunks / m) ** beta)


def meteor(*, prompt: str, response: str, row: dict) -> float:
    """Reward: METEOR (exact-match stage) of the response against ``row["reference"]``."""
    return meteor_exact(response, str(row["reference"]))


_CLASSIFIER: dict = {}


def _classifier():
    if "model" not in _CLASSIFIER:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from prefopt.models.tiny import resolve_model_path
        path = resolve_model_path(os.environ.get("PREFOPT_INTENT_MODEL", DEFAULT_INTENT_MODEL))
        _CLASSIFIER["tokenizer"] = AutoTokenizer.from_pretrained(path)
        _CLASSIFIER["model"] = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
    return _CLASSIFIER["tokenizer"], _CLASSIFIER["model"]


def intent_accuracy(*, prompt: str, response: str, row: dict) -> float:
    """Reward: 1.0 if the intent classifier's top class on ``prompt + " " + response`` is
    ``row["intent"]`` (a class index of that classifier), else 0.0."""
    import torch
    tokenizer, model = _classifier()
    inputs = tokenizer(prompt + " " + response, return_tensors="pt", truncation=True, max_length=512)
    with torch.no_grad():
        predicted = int(model(**inputs).logits[0].argmax())
    return float(predicted == int(row["intent"]))
