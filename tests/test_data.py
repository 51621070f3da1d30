"""prefopt.data: file formats, chat rendering, truncation, collation, held-out split, synthetic."""
import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_helpers import write_jsonl  # noqa: E402
import torch
from transformers import AutoTokenizer

from prefopt.config_schema import DataConfig, SyntheticDataConfig
from prefopt.data import (
    collate_examples,
    count_tokens,
    load_preference_data,
    load_rows,
    make_micro_batches,
    truncate,
)
from prefopt.data.examples import Example
from prefopt.errors import DataError
from prefopt.models.tiny import resolve_model_path

PAIRS = [
    {"prompt": "Describe the river.", "chosen": "kind clear honest.", "rejected": "rude vague."},
    {"prompt": "Tell me about the city and the ocean.", "chosen": "calm warm.", "rejected": "dull."},
    {"prompt": "What is a robot like?", "chosen": "precise careful useful.", "rejected": "sloppy lazy."},
]



def load(path, tok, cache, seed=0, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return load_preference_data(DataConfig(path=str(path), **kw), tok, seed=seed, cache_dir=cache)


def plain_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_jsonl_json_parquet_load_identically(tmp_path, tok, cache):
    jsonl = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    (tmp_path / "d.json").write_text(json.dumps(PAIRS, indent=2))
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "d.parquet")
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "part-0.jsonl", PAIRS[:2])
    write_jsonl(tmp_path / "dir" / "part-1.jsonl", PAIRS[2:])

    loaded = {name: load(tmp_path / name, tok, cache) for name in ("d.jsonl", "d.json", "d.parquet", "dir")}
    reference = loaded["d.jsonl"]
    assert reference.kind == "pairs" and reference.eval == [] and reference.num_skipped == 0
    assert reference.source == str(jsonl)
    for name, data in loaded.items():
        assert data.kind == "pairs"
        assert sorted(data.train, key=lambda e: e.row) == reference.train, name

    eos = tok.eos_token_id
    for i, (row, ex) in enumerate(zip(PAIRS, reference.train)):
        assert ex.row == i
        assert ex.prompt_ids == tok(row["prompt"])["input_ids"]
        assert ex.prompt_ids[0] == tok.bos_token_id
        assert ex.response_ids == [plain_ids(tok, row["chosen"]) + [eos],
                                      plain_ids(tok, row["rejected"]) + [eos]]
        assert ex.scores == [1.0, 0.0]


def test_load_rows_returns_plain_rows(tmp_path, cache):
    rows, source = load_rows(str(write_jsonl(tmp_path / "r.jsonl", PAIRS)), "train", cache_dir=cache)
    assert rows == PAIRS and source == str(tmp_path / "r.jsonl")
    sliced, _ = load_rows(str(tmp_path / "r.jsonl"), "train[:2]", cache_dir=cache)
    assert sliced == PAIRS[:2]


@pytest.mark.parametrize("implicit_prompt", [False, True])
def test_chat_rows_render_with_template_and_mask_only_the_assistant_part(tmp_path, tok, cache,
                                                                         implicit_prompt):
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Describe the river."}]
    chosen = [{"role": "assistant", "content": "kind clear honest."}]
    if implicit_prompt:   # the response repeats the conversation (UltraFeedback-binarized style)
        chosen = prompt + chosen
    row = {"prompt": prompt, "chosen": chosen, "rejected": "rude vague."}
    data = load(write_jsonl(tmp_path / "chat.jsonl", [row, row]), tok, cache)
    ex = data.train[0]

    prompt_text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert prompt_text == "<s><|system|>\nbe kind</s>\n<|user|>\nDescribe the river.</s>\n<|assistant|>\n"
    assert ex.prompt_ids == plain_ids(tok, prompt_text)
    assert ex.prompt_ids[0] == tok.bos_token_id and ex.prompt_ids.count(tok.bos_token_id) == 1
    # the response is the conversation's rendering beyond the prompt's: content + eos + "\n"
    assert ex.response_ids[0] == plain_ids(tok, "kind clear honest.</s>\n")
    assert ex.response_ids[1] == plain_ids(tok, "rude vague.</s>\n")

    batch = collate_examples(data.train, pad_id=tok.pad_token_id, kind="pairs")
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "kind clear honest."}],
                                   tokenize=False)
    row0 = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert tok.decode(row0) == full
    mask = batch["loss_mask"][0]
    assert tok.decode(batch["input_ids"][0][mask]) == "kind clear honest.</s>\n"
    assert tok.decode(batch["input_ids"][0][~mask & batch["attention_mask"][0].bool()]) == prompt_text
    assert int(mask.sum()) == len(ex.response_ids[0])


def test_truncation_keeps_prompt_end_with_bos_and_response_start(tmp_path, tok, cache):
    prompt = "Tell me about the city and the ocean. " * 3 + "Describe the river."
    response = "kind clear honest helpful bright calm gentle brave precise careful warm fair."
    full_prompt = tok(prompt)["input_ids"]
    full_response = plain_ids(tok, response) + [tok.eos_token_id]
    assert len(full_prompt) > 8 and len(full_response) > 6
    row = {"prompt": prompt, "chosen": response, "rejected": "rude."}
    ex = load(write_jsonl(tmp_path / "long.jsonl", [row]), tok, cache,
              max_prompt_length=8, max_length=14).train[0]

    assert len(ex.prompt_ids) == 8
    assert ex.prompt_ids == [tok.bos_token_id] + full_prompt[-7:]          # bos re-added, end kept
    assert tok.decode(ex.prompt_ids).endswith("Describe the river.")
    assert ex.response_ids[0] == full_response[:6]                         # 14 - 8 tokens, start kept
    assert ex.response_ids[1] == plain_ids(tok, "rude.") + [tok.eos_token_id]   # short: untouched

    # a short prompt is left alone; the response gets the rest of max_length
    short = {"prompt": "Describe the river.", "chosen": response, "rejected": "rude."}
    ex = load(write_jsonl(tmp_path / "short.jsonl", [short]), tok, cache,
              max_prompt_length=8, max_length=12).train[0]
    assert ex.prompt_ids == tok("Describe the river.")["input_ids"]
    assert len(ex.response_ids[0]) == 12 - len(ex.prompt_ids)


def test_truncate_function():
    assert truncate([9, 1, 2, 3, 4], [[5, 6, 7]], max_prompt_length=3, max_length=5, bos_id=9) == \
        ([9, 3, 4], [[5, 6]])
    assert truncate([1, 2, 3, 4], [[5, 6, 7]], max_prompt_length=3, max_length=5, bos_id=9) == \
        ([2, 3, 4], [[5, 6]])
    assert truncate([1, 2], [[5, 6, 7], [8]], max_prompt_length=3, max_length=4) == ([1, 2], [[5, 6], [8]])


EXAMPLES = [
    Example(prompt_ids=[5, 6], response_ids=[[7], [8, 9]], scores=[1.0, 0.0], row=0, ref_logps=[-1.0, -2.0]),
    Example(prompt_ids=[10], response_ids=[[11, 12, 13], [14]], scores=[1.0, 0.0], row=1, ref_logps=[-3.0, -4.0]),
]


def test_collate_pairs_row_order_padding_and_masks():
    batch = collate_examples(EXAMPLES, pad_id=0, kind="pairs")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [10, 11, 12, 13], [5, 6, 8, 9], [10, 14, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, False, True, False], [False, True, True, True],
                                           [False, False, True, True], [False, True, False, False]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool
    assert batch["scores"].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert batch["slot_mask"].all() and batch["slot_mask"].shape == (2, 2)
    assert batch["ref_logps"].dtype == torch.float64
    assert batch["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]       # chosen_0, chosen_1, rejected_0, ...
    assert count_tokens(EXAMPLES) == int(batch["attention_mask"].sum()) == 13
    no_ref = [dataclasses.replace(ex, ref_logps=None) for ex in EXAMPLES]
    assert "ref_logps" not in collate_examples(no_ref, pad_id=0, kind="pairs")


def test_collate_lists_row_major_with_slot_mask():
    examples = [Example(prompt_ids=[1], response_ids=[[2], [3, 4], [5]], scores=[0.0, 2.0, 1.0], row=0),
                Example(prompt_ids=[6, 7], response_ids=[[8, 9], [10]], scores=[1.0, 3.0], row=1)]
    batch = collate_examples(examples, pad_id=99, kind="lists")
    assert batch["input_ids"].tolist() == [[1, 2, 99, 99], [1, 3, 4, 99], [1, 5, 99, 99],
                                           [6, 7, 8, 9], [6, 7, 10, 99]]
    assert batch["loss_mask"].tolist() == [[False, True, False, False], [False, True, True, False],
                                           [False, True, False, False], [False, False, True, True],
                                           [False, False, True, False]]
    assert batch["slot_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["scores"].tolist() == [[0.0, 2.0, 1.0], [1.0, 3.0, 0.0]]
    assert int(batch["slot_mask"].sum()) == batch["input_ids"].shape[0]
    assert count_tokens(examples) == int(batch["attention_mask"].sum())


def test_make_micro_batches():
    chunks = make_micro_batches(list(range(7)), 3)
    assert chunks == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError):
        make_micro_batches([1], 0)


def test_held_out_split_is_seeded_disjoint_and_capped(tok, cache):
    kw = dict(synthetic=SyntheticDataConfig(num_rows=50, seed=3))
    a = load("synthetic:pairs", tok, cache, seed=7, eval_fraction=0.2, **kw)
    b = load("synthetic:pairs", tok, cache, seed=7, eval_fraction=0.2, **kw)
    c = load("synthetic:pairs", tok, cache, seed=8, eval_fraction=0.2, **kw)
    rows = lambda exs: [e.row for e in exs]   # noqa: E731
    assert len(a.eval) == 10 and len(a.train) == 40
    assert a.train == b.train and a.eval == b.eval
    assert rows(c.eval) != rows(a.eval)
    assert not set(rows(a.train)) & set(rows(a.eval))
    assert sorted(rows(a.train) + rows(a.eval)) == list(range(50))
    assert rows(a.eval) == sorted(rows(a.eval))

    capped = load("synthetic:pairs", tok, cache, seed=7, eval_fraction=0.2, max_eval_examples=3, **kw)
    assert len(capped.eval) == 3 and len(capped.train) == 47
    tiny = load("synthetic:pairs", tok, cache, eval_fraction=0.001, **kw)
    assert len(tiny.eval) == 1                                   # at least one


def test_eval_path_is_used_as_held_out_data(tmp_path, tok, cache):
    train = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    held = write_jsonl(tmp_path / "test.jsonl", PAIRS[:2])
    data = load(train, tok, cache, eval_path=str(held), eval_fraction=0.5)
    assert len(data.train) == 3 and len(data.eval) == 2
    assert data.eval == data.train[:2]
    capped = load(train, tok, cache, eval_path=str(held), max_eval_examples=1)
    assert len(capped.eval) == 1


@pytest.mark.parametrize("kind", ["pairs", "lists"])
def test_synthetic_data_load(tok, cache, kind):
    syn = SyntheticDataConfig(num_rows=40, list_size=3, seed=1)
    data = load(f"synthetic:{kind}", tok, cache, eval_fraction=0.1, synthetic=syn)
    assert data.kind == kind and len(data.train) == 36 and len(data.eval) == 4
    assert data.source.endswith(".jsonl")
    k = 2 if kind == "pairs" else 3
    for ex in data.train + data.eval:
        assert len(ex.response_ids) == len(ex.scores) == k
        assert ex.prompt_ids[0] == tok.bos_token_id
        assert all(r[-1] == tok.eos_token_id for r in ex.response_ids)
    if kind == "lists":
        assert sorted(data.train[0].scores) == [0.0, 1.0, 2.0]
    batch = collate_examples(data.train[:4], pad_id=tok.pad_token_id, kind=kind)
    assert batch["input_ids"].shape[0] == 4 * k and batch["scores"].shape == (4, k)


def test_on_error_skip_counts_dropped_rows(tmp_path, tok, cache):
    rows = [PAIRS[0], {"prompt": "x", "chosen": 3, "rejected": "y"}, PAIRS[1],
            {"prompt": "", "chosen": "a", "rejected": "b"}, PAIRS[2]]
    path = write_jsonl(tmp_path / "some_bad.jsonl", rows)
    with pytest.raises(DataError, match="row 1"):
        load(path, tok, cache)
    data = load(path, tok, cache, on_error="skip")
    assert data.num_skipped == 2
    assert [e.row for e in data.train] == [0, 2, 4]
    assert "row 1" in data.skip_messages[0] and "row 3" in data.skip_messages[1]

    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", [rows[1], rows[3]])
    with pytest.raises(DataError, match="all 2 rows are malformed"):
        load(all_bad, tok, cache, on_error="skip")
