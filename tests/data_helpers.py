"""Helpers shared by the data tests."""
import json


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# A reward function that misbehaves on purpose (the online loop's reward guard): NaN for the calls
# numbered in FLAKY_NAN_CALLS (one call per sample), else the good-word fraction.
FLAKY_CALLS = {"count": 0}
# call 0 is the pre-flight probe (prefopt.rewards.sources.probe_rewards); then tiny_grpo's 64 samples per
# iteration: calls 65..128 are all of iteration 2
FLAKY_NAN_CALLS = range(1 + 64, 1 + 128)


def flaky_good_word_fraction(*, prompt, response, row):
    from prefopt.rewards.builtin import good_word_fraction
    n = FLAKY_CALLS["count"]
    FLAKY_CALLS["count"] += 1
    return float("nan") if n in FLAKY_NAN_CALLS else good_word_fraction(prompt=prompt, response=response, row=row)
