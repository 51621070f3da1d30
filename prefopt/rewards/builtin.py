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
