"""Rule-based reward functions that ship with prefopt (examples, tests, the demo).

Each has the reward-function signature ``fn(*, prompt, response, row) -> float``.
"""
from __future__ import annotations

from prefopt.data.synthetic import BAD_WORDS, GOOD_WORDS

_GOOD, _BAD = frozenset(GOOD_WORDS), frozenset(BAD_WORDS)


def _words(text: str) -> list[str]:
    return [w.strip(".,!?;:") for w in text.split()]


def good_word_fraction(*, prompt: str, response: str, row: dict) -> float:
    """Fraction of the response's words that are 'good' words of the synthetic vocabulary."""
    words = _words(response)
    return sum(w in _GOOD for w in words) / len(words) if words else 0.0


def bad_word_fraction(*, prompt: str, response: str, row: dict) -> float:
    words = _words(response)
    return sum(w in _BAD for w in words) / len(words) if words else 0.0


def response_length(*, prompt: str, response: str, row: dict) -> float:
    """Number of words (a reward that is easy to over-optimise)."""
    return float(len(_words(response)))


def mostly_good(*, prompt: str, response: str, row: dict) -> float:
    """Success reward of the toy reasoning task: 1 if at least half the words are good words."""
    return float(good_word_fraction(prompt=prompt, response=response, row=row) >= 0.5)


def step_has_good_word(*, prompt: str, steps: list[str], row: dict) -> list[float]:
    """A rule 'process reward model': each step that contains a good word earns 1.

    It pays for every such step, so a policy can farm it by splitting its answer into many short
    steps: the reward hacking that Clip and Delta (Gao et al. 2024) remove.
    """
    return [float(any(w in _GOOD for w in _words(step))) for step in steps]


MODERATE_WORDS = 6   # the length the toy evaluation below prefers


def good_words_at_moderate_length(*, prompt: str, response: str, row: dict) -> float:
    """Toy held-out evaluation of the constrained-RLHF recipes: the good-word fraction, discounted
    linearly as the word count moves away from ``MODERATE_WORDS`` (0 at twice that or at none).
    Maximising ``response_length`` without limit therefore hurts it."""
    n = len(_words(response))
    return good_word_fraction(prompt=prompt, response=response, row=row) * max(0.0, 1 - abs(n - MODERATE_WORDS)
                                                                                / MODERATE_WORDS)


def distinct_good_fraction(*, prompt: str, response: str, row: dict) -> float:
    """Distinct good words per word: like ``good_word_fraction``, but a repeated word counts once, so
    "kind kind kind" scores 1/3 and "kind clear honest" 1. The gold reward of the over-optimization
    experiment (docs/reward_models.md): proxies trained on varied responses do not see repetition."""
    words = _words(response)
    return len({w for w in words if w in _GOOD}) / len(words) if words else 0.0


def exact_match(*, prompt: str, response: str, row: dict) -> float:
    """1 if the response, stripped of surrounding whitespace, is the row's ``answer``, else 0 (a
    verifiable reward: ``synthetic:reverse`` rows carry their answer)."""
    return float(response.strip() == str(row["answer"]).strip())
