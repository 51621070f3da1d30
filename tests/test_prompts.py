"""Prompt sets of the online loop: plain and chat prompts, row fields kept, clear errors."""
import pytest

from data_helpers import write_jsonl
from prefopt.config_schema import DataConfig
from prefopt.data.prompts import load_prompts
from prefopt.errors import DataError


def test_plain_and_chat_prompts_keep_their_rows(tmp_path, tok, cache):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Describe the river.", "answer": "kind"},
        {"prompt": [{"role": "user", "content": "Describe the city."}], "answer": "calm"}])
    prompts = load_prompts(DataConfig(path=str(path)), tok, cache_dir=cache).prompts
    assert prompts[0]["prompt_ids"] == tok("Describe the river.")["input_ids"]
    assert prompts[1]["prompt_text"].endswith("<|assistant|>\n")          # generation prompt added
    assert prompts[1]["prompt_ids"] == tok(prompts[1]["prompt_text"], add_special_tokens=False)["input_ids"]
    assert [p["row"]["answer"] for p in prompts] == ["kind", "calm"]


def test_long_prompts_keep_their_end(tmp_path, tok, cache):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "kind " * 50 + "Describe the river."}])
    ids = load_prompts(DataConfig(path=str(path), max_prompt_length=8), tok, cache_dir=cache).prompts[0]["prompt_ids"]
    assert len(ids) == 8 and tok.decode(ids).endswith("river.")


@pytest.mark.parametrize("row, message", [
    ({"question": "x"}, r"row 1, field 'prompt': missing prompt field"),
    ({"prompt": 7}, r"row 1, field 'prompt': expected a string or a list of chat messages, got int"),
    ({"prompt": "  "}, r"row 1, field 'prompt': empty prompt"),
    ({"prompt": [{"content": "no role"}]}, r"row 1, field 'prompt': expected a string or a list of chat messages"),
])
def test_bad_prompt_rows_name_file_row_field(tmp_path, tok, cache, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, row])
    with pytest.raises(DataError, match=message) as e:
        load_prompts(DataConfig(path=str(path)), tok, cache_dir=cache)
    assert "bad.jsonl" in str(e.value)
