"""Helpers shared by the data tests."""
import json


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# A reward function that misbehaves on purpose (the online loop's reward guard): NaN for the calls
# numbered in FLAKY_NAN_CALLS (one call per sample), else the good-word fraction.
FLAKY_CALLS = {"count": 0}
FLAKY_NAN_CALLS = range(64, 128)   # tiny_grpo: 64 samples per iteration -> all of iteration 2


def flaky_good_word_fraction(*, prompt, response, row):
    from prefopt.rewards.builtin import good_word_fraction
    n = FLAKY_CALLS["count"]
    FLAKY_CALLS["count"] += 1
    return float("nan") if n in FLAKY_NAN_CALLS else good_word_fraction(prompt=prompt, response=response, row=row)
