"""Synthetic, *learnable* preference data, generated offline.

Responses are short sequences of words. Two disjoint word sets carry the preference: responses
made of "good" words are preferred over responses made of "bad" words, whatever the prompt. A
policy learns this quickly (it only has to shift probability mass between two word sets), and a
held-out split with fresh word combinations measures whether it did. Lengths vary, so padding,
truncation and length normalisation are exercised.

* pairs: ``{"prompt", "chosen", "rejected"}``: chosen is mostly good words, rejected mostly bad.
* lists: ``{"prompt", "responses", "scores"}``: K responses at K distinct quality levels; level
  ``l`` draws each word from the good set with probability ``l / (K - 1)``; the score is ``l``.
* sft: ``{"prompt", "response"}``: responses like the pairs' chosen ones (mostly good words).
* attributes: ``{"prompt", "response", "attributes": {"helpfulness", "verbosity"}}``: ratings in
  [0, 4]; helpfulness is 4 x the fraction of good words, verbosity grows with the word count.
* steps: ``{"prompt", "steps", "labels"}``: 2-5 steps of 2-4 words, each mostly good or mostly bad;
  a step's label is 1 while no step so far (itself included) was a bad one (Math-Shepherd's hard
  label: the answer is still reachable), 0 from the first bad step on.

``corpus()`` lists sentences covering every word, used to train the tiny offline tokenizer.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

GOOD_WORDS = ("kind clear honest helpful bright calm gentle brave precise careful warm fair "
              "patient thoughtful polite useful simple accurate friendly wise").split()
BAD_WORDS = ("rude vague false useless dull harsh sloppy lazy wrong cruel noisy messy "
             "careless hostile boring bitter reckless confusing unfair silly").split()
NOUNS = ("river mountain garden city robot ocean forest teacher library engine planet market "
         "kitchen music castle island bridge window letter journey").split()
TEMPLATES = ("Describe the {a}.", "Tell me about the {a} and the {b}.", "What is a {a} like?",
             "Write a note about the {a}.", "Compare the {a} with the {b}.")


def _prompt(rng: random.Random) -> str:
    a, b = rng.sample(NOUNS, 2)
    return rng.choice(TEMPLATES).format(a=a, b=b)


def _response(rng: random.Random, p_good: float, min_words: int = 3, max_words: int = 10) -> str:
    n = rng.randint(min_words, max_words)
    words = [rng.choice(GOOD_WORDS if rng.random() < p_good else BAD_WORDS) for _ in range(n)]
    return " ".join(words) + "."


def make_pairs(num_rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": _prompt(rng), "chosen": _response(rng, 0.9), "rejected": _response(rng, 0.1)}
            for _ in range(num_rows)]


def make_sft(num_rows: int, seed: int = 0) -> list[dict]:
    """``{"prompt", "response"}`` rows whose responses are mostly good words (what a preference
    stage later prefers): SFT moves the model from uniform babble toward them."""
    rng = random.Random(seed)
    return [{"prompt": _prompt(rng), "response": _response(rng, 0.9)} for _ in range(num_rows)]


def _good_fraction(text: str) -> float:
    words = [w.strip(".") for w in text.split()]
    return sum(w in GOOD_WORDS for w in words) / len(words)


def make_attributes(num_rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        response = _response(rng, rng.random())
        n = len(response.split())
        rows.append({"prompt": _prompt(rng), "response": response,
                     "attributes": {"helpfulness": round(4 * _good_fraction(response), 3),
                                    "verbosity": round(4 * (n - 3) / 7, 3)}})
    return rows


def make_steps(num_rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        steps, labels, ok = [], [], True
        for _ in range(rng.randint(2, 5)):
            good = rng.random() < 0.75
            steps.append(_response(rng, 0.95 if good else 0.05, 2, 4).rstrip("."))
            ok = ok and good
            labels.append(float(ok))
        rows.append({"prompt": _prompt(rng), "steps": steps, "labels": labels})
    return rows


def make_lists(num_rows: int, list_size: int = 4, seed: int = 0) -> list[dict]:
    if list_size < 2:
        raise ValueError("list_size must be >= 2")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        levels = list(range(list_size))
        rng.shuffle(levels)
        responses = [_response(rng, lvl / (list_size - 1)) for lvl in levels]
        rows.append({"prompt": _prompt(rng), "responses": responses, "scores": [float(l) for l in levels]})
    return rows


REVERSE_PROMPT = "Reverse the words: {words}\n"


def make_reverse(num_rows: int, words: int = 4, seed: int = 0) -> list[dict]:
    """A task with a verifiable answer: ``{"prompt": "Reverse the words: a b c d\\n", "response":
    "d c b a", "answer": "d c b a"}`` over distinct nouns of the synthetic vocabulary. ``response``
    serves SFT, ``answer`` an exact-match reward (``rewards.builtin.exact_match``)."""
    if not 2 <= words <= len(NOUNS):
        raise ValueError(f"words must be in [2, {len(NOUNS)}]")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        chosen = rng.sample(NOUNS, words)
        answer = " ".join(reversed(chosen))
        rows.append({"prompt": REVERSE_PROMPT.format(words=" ".join(chosen)), "response": answer, "answer": answer})
    return rows


def corpus() -> list[str]:
    """Sentences that cover every word and template, for training the tiny tokenizer."""
    rng = random.Random(1234)
    lines = [" ".join(GOOD_WORDS) + ".", " ".join(BAD_WORDS) + ".", " ".join(NOUNS) + "."]
    for _ in range(400):
        lines.append(_prompt(rng) + " " + _response(rng, rng.random()))
    return lines


def materialize(kind: str, num_rows: int, seed: int, list_size: int, cache_dir: str | Path, words: int = 4) -> Path:
    """Write the synthetic data set as JSONL under ``cache_dir`` (once) and return its path."""
    makers = {"pairs": lambda: make_pairs(num_rows, seed), "sft": lambda: make_sft(num_rows, seed),
              "lists": lambda: make_lists(num_rows, list_size, seed),
              "attributes": lambda: make_attributes(num_rows, seed), "steps": lambda: make_steps(num_rows, seed),
              "reverse": lambda: make_reverse(num_rows, words, seed)}
    if kind not in makers:
        raise ValueError(f"unknown synthetic data kind '{kind}' (expected one of {', '.join(makers)})")
    name = f"synthetic-{kind}-n{num_rows}-s{seed}" + (f"-k{list_size}" if kind == "lists" else "") \
        + (f"-w{words}" if kind == "reverse" else "")
    path = Path(cache_dir) / "data" / f"{name}.jsonl"
    if path.exists():
        return path
    rows = makers[kind]()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path
