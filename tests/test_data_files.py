"""Local data files and folders: exact JSON types, split slices, and every bad input refused with a
DataError naming the file, the row (and line) and the field -- no other exception type escapes."""
import builtins
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_helpers import write_jsonl
from prefopt.config_schema import DataConfig
from prefopt.data import load_preference_data, load_rows
from prefopt.data.json_rows import MAX_DEPTH
from prefopt.errors import DataError

PAIR = {"prompt": "Describe the river.", "chosen": "kind clear.", "rejected": "rude vague."}
LIST = {"prompt": "Describe the river.", "responses": ["kind.", "rude."], "scores": [1, 0]}
LINE = json.dumps(PAIR) + "\n"


def rows_of(path, split="train", cache=None):
    rows, source = load_rows(str(path), split, cache_dir=cache)
    assert source == str(path)
    return rows


def refused(path, *, cache, split="train", tok=None, **kw) -> DataError:
    """The DataError that loading ``path`` raises (pytest.raises fails on any other exception)."""
    with pytest.raises(DataError) as err:
        if tok is None:
            load_rows(str(path), split, cache_dir=cache)
        else:
            kw.setdefault("eval_fraction", 0.0)
            load_preference_data(DataConfig(path=str(path), split=split, **kw), tok, seed=0, cache_dir=cache)
    return err.value


def assert_names(err: DataError, file, row=None, field=None, line=None, fragment=None):
    message = str(err)
    assert f"file {file}" in message and err.source == str(file), message
    if row is not None:
        assert f"row {row}" in message and err.row == row, message
    if field is not None:
        assert f"field '{field}'" in message and err.field == field, message
    if line is not None:
        assert f"line {line}" in message, message
    if fragment is not None:
        assert fragment in message, message


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ----------------------------------------------------------------------------- 1. exact JSON types

@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_rows_keep_their_exact_json_types(tmp_path, cache, suffix):
    rows = [{"prompt": "42", "n": 1, "x": 1.5, "flag": True, "none": None},
            {"prompt": 42, "n": "1", "scores": ["0.5", 1], "nested": {"a": [1, "b"]}}]
    path = tmp_path / f"types{suffix}"
    path.write_text(json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows))
    loaded = rows_of(path, cache=cache)
    assert loaded == rows
    assert [type(v) for v in loaded[1]["scores"]] == [str, int] and type(loaded[0]["n"]) is int


@pytest.mark.parametrize("scores", [["0.5", 1], ["0.5", "1"], [1, "0"]])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_string_scores_are_refused_naming_row_and_field(tmp_path, tok, cache, scores, suffix):
    rows = [LIST, {**LIST, "scores": scores}]
    path = tmp_path / f"scores{suffix}"
    path.write_text(json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows))
    err = refused(path, cache=cache, tok=tok)
    bad = next(j for j, s in enumerate(scores) if isinstance(s, str))
    assert_names(err, path, row=1, field="scores",
                 fragment=f"score {bad} must be a finite number, got str {scores[bad]!r}")


def test_a_valid_string_is_not_blamed_for_another_rows_number(tmp_path, tok, cache):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{**PAIR, "prompt": "42"}, {**PAIR, "prompt": 42}])
    err = refused(path, cache=cache, tok=tok)
    assert_names(err, path, row=1, field="prompt", fragment="got int 42")
    # and the other way round: the string row is fine, the int row is the bad one
    path = write_jsonl(tmp_path / "mixed2.jsonl", [{**PAIR, "prompt": 42}, {**PAIR, "prompt": "42"}])
    assert_names(refused(path, cache=cache, tok=tok), path, row=0, field="prompt", fragment="got int 42")


# ----------------------------------------------------------------------------- 2. nesting

def deep(levels):
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("levels", [10_000, MAX_DEPTH + 5])
def test_deeply_nested_jsonl_value(tmp_path, cache, levels):
    path = tmp_path / "deep.jsonl"
    path.write_text(LINE + "\n" + '{"prompt": ' + deep(levels) + "}\n")
    err = refused(path, cache=cache)
    assert_names(err, path, row=1, line=3, fragment="nested too deeply")
    if levels < 900:                     # parsed, then measured: the field is known
        assert err.field == "prompt"


@pytest.mark.parametrize("levels", [10_000, MAX_DEPTH + 5])
def test_deeply_nested_json_value(tmp_path, cache, levels):
    path = tmp_path / "deep.json"
    path.write_text("[\n" + json.dumps(PAIR) + ",\n" + json.dumps(PAIR) + ",\n"
                    + '{"prompt": "x", "chosen": ' + deep(levels) + "}\n]\n")
    assert_names(refused(path, cache=cache), path, row=2, line=4, fragment="nested too deeply")


def test_nesting_at_the_limit_loads(tmp_path, cache):
    value = 0
    for _ in range(MAX_DEPTH - 1):       # the record itself is the first level
        value = [value]
    path = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "x", "extra": value}])
    assert rows_of(path, cache=cache)[0]["extra"] == value


# ----------------------------------------------------------------------------- 3. numbers beyond float range

@pytest.mark.parametrize("number", ["1e999", "-1e999", "9" * 400, "-" + "9" * 400, "9" * 5000])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_number_beyond_float_range(tmp_path, tok, cache, number, suffix):
    bad = '{"prompt": "Describe.", "responses": ["a", "b"], "scores": [' + number + ", 0]}"
    path = tmp_path / f"big{suffix}"
    path.write_text(json.dumps(LIST) + "\n" + bad + "\n" if suffix == ".jsonl"
                    else "[" + json.dumps(LIST) + ",\n" + bad + "]")
    for err in (refused(path, cache=cache), refused(path, cache=cache, tok=tok)):
        assert_names(err, path, row=1, field="scores", line=2, fragment="out of float range")


def test_large_but_representable_numbers_load(tmp_path, cache):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"a": 1e308, "b": ' + "9" * 300 + ', "c": 1e-999, "d": NaN}\n')
    row = rows_of(path, cache=cache)[0]
    assert row["a"] == 1e308 and row["b"] == int("9" * 300) and row["c"] == 0.0 and row["d"] != row["d"]


def test_out_of_range_number_deep_in_a_field(tmp_path, cache):
    path = tmp_path / "deep_number.jsonl"
    path.write_text('{"prompt": "x", "meta": {"a": [1, {"b": 2e400}]}}\n')
    assert_names(refused(path, cache=cache), path, row=0, field="meta", fragment="2e400 is out of float range")


# ----------------------------------------------------------------------------- 4. bytes that are not UTF-8

def test_non_utf8_jsonl_names_line_and_row(tmp_path, cache):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(LINE.encode() + b"\n" + LINE.encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    assert_names(refused(path, cache=cache), path, row=2, line=4, fragment="is not UTF-8 text")


def test_non_utf8_json_names_line_and_row(tmp_path, cache):
    path = tmp_path / "latin1.json"
    path.write_bytes(b"[\n" + json.dumps(PAIR).encode() + b",\n"
                     + '{"prompt": "x",\n "chosen": "caf\u00e9"}\n]'.encode("latin-1"))
    assert_names(refused(path, cache=cache), path, row=1, line=4, fragment="line 4 is not UTF-8 text")


def test_utf16_file_is_not_utf8(tmp_path, cache):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes(LINE.encode("utf-16"))
    assert_names(refused(path, cache=cache), path, row=0, line=1, fragment="not UTF-8")


def test_utf8_byte_order_mark_is_allowed(tmp_path, cache):
    for name in ("bom.jsonl", "bom.json"):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + LINE.encode())
        assert rows_of(path, cache=cache) == [PAIR]


# ----------------------------------------------------------------------------- other JSON problems

def test_duplicate_keys(tmp_path, cache):
    path = tmp_path / "dup.jsonl"
    path.write_text(LINE + '{"prompt": "a", "chosen": "b", "prompt": "c"}\n')
    assert_names(refused(path, cache=cache), path, row=1, field="prompt", line=2, fragment="duplicate key 'prompt'")
    path = tmp_path / "dup_nested.json"
    path.write_text('[{"prompt": [{"role": "user", "role": "system", "content": "x"}]}]')
    assert_names(refused(path, cache=cache), path, row=0, field="prompt", fragment="duplicate key 'role'")


def test_json_document_shapes(tmp_path, cache):
    single = tmp_path / "single.json"
    single.write_text(json.dumps(PAIR, indent=2))
    assert rows_of(single, cache=cache) == [PAIR]
    lines = tmp_path / "lines.json"
    lines.write_text(LINE + "\n" + LINE)
    assert rows_of(lines, cache=cache) == [PAIR, PAIR]
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"text"')
    assert_names(refused(scalar, cache=cache), scalar, fragment="expected a JSON array of objects, got a string")
    not_object = tmp_path / "array.json"
    not_object.write_text("[\n" + json.dumps(PAIR) + ",\n[1]\n]")
    assert_names(refused(not_object, cache=cache), not_object, row=1, line=3,
                 fragment="expected a JSON object, got an array")
    extra = tmp_path / "extra.json"
    extra.write_text("[" + json.dumps(PAIR) + "]\n]")
    assert_names(refused(extra, cache=cache), extra, fragment="invalid JSON on line 2, column 1: Extra data")
    missing_comma = tmp_path / "comma.json"
    missing_comma.write_text("[" + json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "]")
    err = refused(missing_comma, cache=cache)
    assert_names(err, missing_comma, fragment="invalid JSON on line 2, column 1: Expecting ',' delimiter (row 1)")
    assert err.row == 1
    blank = tmp_path / "blank.json"
    blank.write_text("  \n")
    assert_names(refused(blank, cache=cache), blank, fragment="no rows")
    no_fields = tmp_path / "empty_records.jsonl"
    no_fields.write_text("{}\n{}\n")
    assert_names(refused(no_fields, cache=cache), no_fields, fragment="the records have no fields")


# ----------------------------------------------------------------------------- split slices

@pytest.mark.parametrize("split,expected", [
    ("train", list(range(10))), ("train[:3]", [0, 1, 2]), ("train[7:]", [7, 8, 9]),
    ("train[2:5]", [2, 3, 4]), ("train[:50%]", [0, 1, 2, 3, 4]), ("train[-2:]", [8, 9]),
    ("train[:100]", list(range(10))), ("train[:2]+train[-1:]", [0, 1, 9]), (" train ", list(range(10))),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_split_slices_of_a_local_file(tmp_path, cache, split, expected, suffix):
    rows = [{**PAIR, "i": i} for i in range(10)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        write_parquet(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        write_jsonl(path, rows)
    assert [r["i"] for r in rows_of(path, split, cache=cache)] == expected


@pytest.mark.parametrize("split,fragment", [
    ("train[:x]", "invalid split 'train[:x]'"), ("train[:200%]", "invalid split"),
    ("test", "single split 'train'"), ("train+test", "single split 'train'"),
    ("train[20:]", "selects none of the rows (10 in 'train')"),
])
def test_bad_split_of_a_local_file(tmp_path, cache, split, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR] * 10)
    assert_names(refused(path, cache=cache, split=split), path, fragment=fragment)


# ----------------------------------------------------------------------------- 5, 6. folders

def test_folder_of_mixed_formats_loads_every_file_in_sorted_order(tmp_path, cache):
    rows = [{**PAIR, "i": i} for i in range(6)]
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_parquet(folder / "a.parquet", rows[:2])
    (folder / "b.json").write_text(json.dumps(rows[2:4]))
    (folder / "sub").mkdir()
    write_jsonl(folder / "sub" / "c.jsonl", rows[4:])
    (folder / "README.md").write_text("# card")
    (folder / "notes.txt").write_text("documentation, not data")
    (folder / ".hidden.jsonl").write_text("not even JSON")
    (folder / "instruction.md").write_text("a name datasets would take for a 'test' split")
    assert [r["i"] for r in rows_of(folder, cache=cache)] == list(range(6))
    assert [r["i"] for r in rows_of(folder, "train[:50%]", cache=cache)] == [0, 1, 2]


def test_folder_files_with_different_columns(tmp_path, cache):
    folder = tmp_path / "cols"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [PAIR])
    write_parquet(folder / "b.parquet", [LIST])
    err = refused(folder, cache=cache)
    assert_names(err, folder, fragment="different columns")
    assert "a.jsonl: prompt, chosen, rejected" in str(err) and "b.parquet: prompt, responses, scores" in str(err)


def test_folder_split_naming_keeps_working(tmp_path, tok, cache):
    rows = [{**PAIR, "prompt": f"Describe river {i}."} for i in range(6)]
    folder = tmp_path / "splits"
    folder.mkdir()
    write_jsonl(folder / "train-00000.jsonl", rows[:2])
    write_parquet(folder / "train-00001.parquet", rows[2:4])
    write_jsonl(folder / "test.jsonl", rows[4:])
    assert rows_of(folder, "train", cache=cache) == rows[:4]
    assert rows_of(folder, "test", cache=cache) == rows[4:]
    assert rows_of(folder, "train[:1]+test[-1:]", cache=cache) == [rows[0], rows[5]]
    assert_names(refused(folder, cache=cache, split="validation"), folder,
                 fragment="no split 'validation' in the directory (its splits: train, test)")
    data = load_preference_data(DataConfig(path=str(folder), eval_split="test"), tok, seed=0, cache_dir=cache)
    assert len(data.train) == 4 and len(data.eval) == 2

    by_dir = tmp_path / "by_dir"
    for split, part in (("train", rows[:3]), ("test", rows[3:])):
        (by_dir / split).mkdir(parents=True)
        write_jsonl(by_dir / split / "part-0.jsonl", part)
    assert rows_of(by_dir, "train", cache=cache) == rows[:3]
    assert rows_of(by_dir, "test", cache=cache) == rows[3:]


def test_folder_file_outside_every_split_is_refused(tmp_path, cache):
    folder = tmp_path / "outside"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [PAIR])
    write_jsonl(folder / "extra.jsonl", [PAIR])
    (folder / "more.csv").write_text("a\n1\n")
    (folder / "README.md").write_text("# card")              # documentation: ignored
    assert_names(refused(folder, cache=cache), folder,
                 fragment="in no split and would be ignored: extra.jsonl, more.csv")


def test_folder_with_an_unsupported_data_file_is_refused(tmp_path, cache):
    folder = tmp_path / "csv"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [PAIR])
    (folder / "b.csv").write_text("prompt,chosen,rejected\nx,y,z\n")
    (folder / "c.jsonl.gz").write_bytes(b"\x1f\x8b")
    assert_names(refused(folder, cache=cache), folder,
                 fragment="files of a type prefopt does not load: b.csv, c.jsonl.gz")


@pytest.mark.parametrize("contents", [{"README.txt": "hello"}, {}, {"data.csv": "a\n1\n", "README.md": "x"}])
def test_folder_without_data_files(tmp_path, cache, contents):
    folder = tmp_path / "nodata"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    err = refused(folder, cache=cache)
    held = ", ".join(sorted(contents)) or "nothing"
    assert_names(err, folder, fragment=f"no .jsonl/.json/.parquet files in the directory (it holds: {held})")


def test_bad_file_in_a_folder_is_named(tmp_path, cache):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [PAIR])
    (folder / "b.jsonl").write_text(LINE + '{"prompt": "x", "chosen": [1e999]}\n')
    assert_names(refused(folder, cache=cache), folder / "b.jsonl", row=1, line=2, field="chosen",
                 fragment="out of float range")


def test_broken_parquet_is_a_data_error(tmp_path, cache):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    assert_names(refused(path, cache=cache), path, fragment="could not read the Parquet file")
    empty = write_parquet(tmp_path / "empty.parquet", [])
    assert_names(refused(empty, cache=cache), empty, fragment="no rows")


# ----------------------------------------------------------------------------- 7. unreadable files

@pytest.fixture
def unreadable(monkeypatch):
    """Make ``open`` of the paths added to the returned set raise PermissionError (tests run as root,
    where chmod 000 does not stop reads)."""
    denied: set = set()
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).resolve() in denied:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    return denied


@pytest.mark.parametrize("name", ["locked.jsonl", "locked.json", "locked.parquet"])
def test_unreadable_file(tmp_path, cache, unreadable, name):
    path = tmp_path / name
    write_parquet(path, [PAIR]) if name.endswith(".parquet") else write_jsonl(path, [PAIR])
    unreadable.add(path.resolve())
    assert_names(refused(path, cache=cache), path, fragment="cannot read: permission denied")


def test_unreadable_file_in_a_folder(tmp_path, cache, unreadable):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [PAIR])
    locked = write_jsonl(folder / "b.jsonl", [PAIR])
    unreadable.add(locked.resolve())
    assert_names(refused(folder, cache=cache), locked, fragment="cannot read: permission denied")


# ----------------------------------------------------------------------------- fuzz: bytes

GOOD_FILE = (json.dumps(PAIR) + "\n" + json.dumps(LIST) + "\n").encode()
PIECES = st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b'"', b"\n", b"\xff", b"\xc3", b"1e999",
                          b"NaN", b"9" * 320, b'"prompt"', b"\\u", b"\xef\xbb\xbf", b" ", b"[" * 1200])


@st.composite
def mangled(draw):
    data = bytearray(GOOD_FILE)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        if draw(st.booleans()):
            data[at:at] = draw(st.one_of(PIECES, st.binary(max_size=4)))
        else:
            del data[at:at + draw(st.integers(1, 6))]
    return bytes(data)


_fuzz_ids = iter(range(10**9))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mangled(), suffix=st.sampled_from([".jsonl", ".json"]))
def test_fuzz_mangled_files_load_or_raise_data_error(tmp_path_factory, cache, data, suffix):
    path = tmp_path_factory.getbasetemp() / f"mangled-{next(_fuzz_ids)}{suffix}"
    path.write_bytes(data)
    try:
        rows = rows_of(path, cache=cache)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert rows and all(isinstance(r, dict) for r in rows)
