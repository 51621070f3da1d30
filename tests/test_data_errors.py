"""Malformed data gives DataError/ConfigError naming the file, the row and the field."""
import copy
import itertools
import json
import math

import pytest

from data_helpers import write_jsonl  # noqa: E402
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from prefopt.config_schema import DataConfig
from prefopt.data import load_preference_data
from prefopt.errors import ConfigError, DataError
from prefopt.models.tiny import resolve_model_path

GOOD_PAIR = {"prompt": "Describe the river.", "chosen": "kind clear.", "rejected": "rude vague."}
GOOD_LIST = {"prompt": "Describe the river.", "responses": ["kind.", "rude.", "calm."], "scores": [2, 0, 1.5]}
USER = [{"role": "user", "content": "Describe the river."}]



def load(path, tok, cache, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return load_preference_data(DataConfig(path=str(path), **kw), tok, seed=0, cache_dir=cache)


def pair(**fields):
    return {**GOOD_PAIR, **fields}


def listwise(**fields):
    return {**GOOD_LIST, **fields}


def without(row, key):
    return {k: v for k, v in row.items() if k != key}


# (case id, bad row, field named in the error, a fragment of the message)
BAD_ROWS = [
    ("missing-chosen", without(GOOD_PAIR, "chosen"), "chosen", "missing field"),
    ("missing-prompt", without(GOOD_PAIR, "prompt"), "prompt", "missing field"),
    ("chosen-is-int", pair(chosen=5), "chosen", "got int 5"),
    ("prompt-is-object", pair(prompt={"text": "hi"}), "prompt", "expected a string or a list"),
    ("empty-prompt", pair(prompt=""), "prompt", "empty text"),
    ("blank-rejected", pair(rejected="   "), "rejected", "empty text"),
    ("chosen-equals-rejected", pair(chosen="same.", rejected="same."), "rejected", "identical"),
    ("message-without-role", pair(prompt=[{"content": "hi"}]), "prompt", "'role'"),
    ("message-without-content", pair(chosen=[{"role": "assistant"}]), "chosen", "'content'"),
    ("message-not-object", pair(prompt=USER + ["hi"]), "prompt", "chat message 1"),
    ("empty-message-list", pair(prompt=[]), "prompt", "empty list"),
    ("response-repeats-prompt", pair(prompt=USER, chosen=USER), "chosen", "only repeats the prompt"),
    ("missing-scores", without(GOOD_LIST, "scores"), "scores", "missing field"),
    ("length-mismatch", listwise(scores=[1, 0]), "scores", "2 scores for 3 responses"),
    ("one-response", listwise(responses=["kind."], scores=[1]), "responses", "at least 2"),
    ("responses-not-list", listwise(responses="kind."), "responses", "expected a list"),
    ("response-is-int", listwise(responses=["kind.", 7, "calm."]), "responses[1]", "got int 7"),
    ("score-not-number", listwise(scores=[1, "high", 0]), "scores", "score 1 must be a finite number"),
    ("score-numeric-string", listwise(scores=["0.5", 1, 0]), "scores", "score 0 must be a finite number, got str '0.5'"),
    ("scores-all-strings", listwise(scores=["0.5", "1", "2"]), "scores", "score 0 must be a finite number, got str"),
    ("score-nan", listwise(scores=[1, float("nan"), 0]), "scores", "finite number"),
    ("score-bool", listwise(scores=[True, False, 0]), "scores", "finite number"),
    ("scores-all-equal", listwise(scores=[1, 1, 1.0]), "scores", "all scores are equal"),
    ("unknown-kind", {"question": "q", "answer": "a"}, None, "found ['question', 'answer']"),
]


@pytest.mark.parametrize("bad_row,field,fragment", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
@pytest.mark.parametrize("bad_index", [0, 2])
def test_malformed_row_error_names_file_row_and_field(tmp_path, tok, cache, bad_row, field, fragment,
                                                      bad_index):
    good = GOOD_LIST if ("responses" in bad_row or "scores" in bad_row) else GOOD_PAIR
    rows = [good, good, good]
    rows[bad_index] = bad_row
    if field is None and bad_index:          # the first row fixes the kind; later rows need its fields
        field, fragment = "prompt", "missing field"
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as err:
        load(path, tok, cache)
    message = str(err.value)
    assert str(path) in message and f"row {bad_index}" in message and fragment in message
    assert err.value.row == bad_index and err.value.source == str(path)
    if field is not None:
        assert f"field '{field}'" in message and err.value.field == field


def test_chat_template_failure_is_wrapped(tmp_path, tok, cache):
    broken = copy.deepcopy(tok)
    broken.chat_template = "{{ raise_exception('no system messages') }}"
    path = write_jsonl(tmp_path / "chat.jsonl", [pair(prompt=USER)])
    with pytest.raises(DataError, match=r"row 0, field 'prompt': the chat template failed.*no system"):
        load(path, broken, cache)


def test_chat_template_without_prefix_property(tmp_path, tok, cache):
    reversed_order = copy.deepcopy(tok)
    reversed_order.chat_template = ("{% for m in messages | reverse %}{{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}>{% endif %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [pair(prompt=USER)])
    with pytest.raises(DataError, match=r"row 0, field 'chosen': .*does not start with"):
        load(path, reversed_order, cache)


def test_missing_file_names_the_path(tmp_path, tok, cache):
    for missing in [str(tmp_path / "nope.jsonl"), "./data/nope.jsonl", "data/sub/train"]:
        with pytest.raises(DataError, match="no such file") as err:
            load(missing, tok, cache)
        assert missing in str(err.value)


def test_jsonl_syntax_error_names_file_and_line(tmp_path, tok, cache):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD_PAIR) + "\n\n" + json.dumps(GOOD_PAIR) + "\n"
                    + '{"prompt": "x", "chosen": "y",}\n')
    with pytest.raises(DataError) as err:
        load(path, tok, cache)
    message = str(err.value)
    assert str(path) in message and "line 4" in message and "row 2" in message and "invalid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path, tok, cache):
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps(GOOD_PAIR) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"row 1: line 2: expected a JSON object, got an array"):
        load(path, tok, cache)


def test_json_array_syntax_error_names_line(tmp_path, tok, cache):
    path = tmp_path / "broken.json"
    path.write_text("[\n" + json.dumps(GOOD_PAIR) + ",\n" + '{"prompt": "x" "chosen": "y"}\n]\n')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON on line 3"):
        load(path, tok, cache)


@pytest.mark.parametrize("name,content,fragment", [
    ("empty.jsonl", "", "no rows"),
    ("empty.json", "[]", "no rows"),
    ("data.csv", "prompt,chosen\n", "unsupported file type '.csv'"),
])
def test_unusable_files(tmp_path, tok, cache, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=fragment) as err:
        load(path, tok, cache)
    assert str(path) in str(err.value)


def test_local_file_has_only_a_train_split(tmp_path, tok, cache):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_PAIR] * 3)
    with pytest.raises(DataError, match="single split 'train'"):
        load(path, tok, cache, split="test")


def test_eval_data_of_another_kind(tmp_path, tok, cache):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD_PAIR] * 3)
    held = write_jsonl(tmp_path / "test.jsonl", [GOOD_LIST])
    with pytest.raises(DataError, match="test.jsonl: the held-out data are lists"):
        load(train, tok, cache, eval_path=str(held))


def test_too_few_rows_for_a_held_out_split(tmp_path, tok, cache):
    path = write_jsonl(tmp_path / "one.jsonl", [GOOD_PAIR])
    with pytest.raises(DataError, match="too few to hold out"):
        load(path, tok, cache, eval_fraction=0.5)


@pytest.mark.parametrize("overrides,key", [
    (dict(max_prompt_length=512, max_length=512), "data.max_prompt_length"),
    (dict(max_length=0), "data.max_length"),
    (dict(eval_fraction=1.0), "data.eval_fraction"),
    (dict(eval_fraction=-0.1), "data.eval_fraction"),
    (dict(on_error="ignore"), "data.on_error"),
    (dict(max_eval_examples=-1), "data.max_eval_examples"),
    (dict(chosen_field=""), "data.chosen_field"),
])
def test_invalid_data_config(tmp_path, tok, cache, overrides, key):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_PAIR] * 3)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(path, tok, cache, **overrides)


def test_unknown_synthetic_kind(tok, cache):
    with pytest.raises(ConfigError, match="did you mean 'pairs'"):
        load("synthetic:pair", tok, cache)


# ----------------------------------------------------------------------------- fuzz

TEXTS = st.one_of(st.sampled_from(["", " ", "kind clear.", "rude.", "Describe the river."]), st.text(max_size=12))
GOOD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": TEXTS})
ANY_MESSAGE = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", ""]), st.integers()),
                                                  "content": st.one_of(TEXTS, st.none(), st.integers())})
MESSAGES = st.lists(st.one_of(GOOD_MESSAGE, GOOD_MESSAGE, ANY_MESSAGE), max_size=3)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.integers(),
                    st.floats(allow_nan=True, allow_infinity=True), TEXTS)
ANY_VALUE = st.one_of(SCALARS, MESSAGES, st.lists(SCALARS, max_size=3),
                      st.dictionaries(st.text(max_size=4), SCALARS, max_size=3))
PLAIN = st.sampled_from(["kind clear.", "rude.", "calm warm.", "Describe the river."])


def weighted(*choices):
    """One of ``choices`` (listed with repeats for weight); nested one_of would be flattened."""
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


TEXTISH = weighted(PLAIN, PLAIN, PLAIN, TEXTS, MESSAGES, ANY_VALUE)       # mostly plausible
SCORE = st.one_of(st.integers(-3, 3), st.floats(), st.integers(-3, 3), st.sampled_from(["0.5", "1", "-2"]))
SCORES = weighted(*[st.lists(SCORE, min_size=2, max_size=4)] * 4, ANY_VALUE)
PAIR_ROW = st.fixed_dictionaries({"prompt": TEXTISH, "chosen": TEXTISH, "rejected": TEXTISH},
                                 optional={"extra": ANY_VALUE})
LIST_ROW = st.fixed_dictionaries({"prompt": TEXTISH, "scores": SCORES,
                                  "responses": weighted(*[st.lists(TEXTISH, min_size=2, max_size=4)] * 4, ANY_VALUE)})
KEYS = st.sampled_from(["prompt", "chosen", "rejected", "responses", "scores", "extra"])
OTHER_ROW = weighted(st.dictionaries(KEYS, ANY_VALUE, max_size=6), ANY_VALUE)


@st.composite
def data_files(draw):
    """Rows mostly of one kind (so some files load), with arbitrary rows mixed in."""
    row = draw(st.sampled_from([PAIR_ROW, LIST_ROW]))
    return draw(st.lists(weighted(*[row] * 8, OTHER_ROW), max_size=5))


_file_ids = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=data_files(), on_error=st.sampled_from(["raise", "skip"]),
       max_length=st.integers(2, 24), suffix=st.sampled_from([".jsonl", ".json"]))
def test_fuzz_rows_load_or_raise_data_error(tmp_path_factory, tok, cache, rows, on_error, max_length, suffix):
    path = tmp_path_factory.getbasetemp() / f"fuzz-{next(_file_ids)}{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    try:
        data = load(path, tok, cache, on_error=on_error, max_length=max_length,
                    max_prompt_length=max_length // 2)
    except (DataError, ConfigError):
        return
    assert data.kind in ("pairs", "lists") and data.train
    assert data.num_skipped == 0 or on_error == "skip"
    for ex in data.train:
        assert 1 <= len(ex.prompt_ids) <= max_length // 2
        assert len(ex.response_ids) == len(ex.scores) >= 2
        assert all(1 <= len(r) and len(ex.prompt_ids) + len(r) <= max_length for r in ex.response_ids)
        assert all(type(s) is float and math.isfinite(s) for s in ex.scores) and len(set(ex.scores)) > 1
