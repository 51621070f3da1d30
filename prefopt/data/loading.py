"""Load raw data rows: local files, `datasets` names, synthetic data.

``data.path`` (and ``data.eval_path``) may be

* a local ``.jsonl`` / ``.json`` / ``.parquet`` file, loaded with ``datasets``
  (``load_dataset("json" | "parquet", data_files=..., split=...)``); such a file has the single
  split ``train`` (slices such as ``train[:100]`` work);
* a local directory, passed to ``load_dataset(dir, split=...)`` (a directory of data files, with
  the usual ``train-*`` / ``test-*`` file naming for splits);
* ``synthetic:pairs`` / ``synthetic:lists``: generated offline into the cache
  (:mod:`prefopt.data.synthetic`), then loaded as a JSONL file;
* anything else is a ``datasets`` hub name (needs the network or the hub cache).

A name that looks local (a file suffix, a leading ``./``, ``../``, ``/`` or ``~``, or two or more
path separators; ``org/name`` hub names have one) but does not exist is a :class:`DataError`.

Row numbers in errors are 0-based record indices in what was loaded (for JSONL, blank lines are
not counted; for a directory, the index in its loaded split); JSON syntax errors also give the
1-based line number.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from prefopt.cache import cache_dir as default_cache_dir
from prefopt.config_schema import SyntheticDataConfig
from prefopt.errors import ConfigError, DataError, did_you_mean

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_KINDS = ("pairs", "lists")


def load_rows(path: str, split: str | None = "train", *, cache_dir: str | Path | None = None,
              synthetic: SyntheticDataConfig | None = None) -> tuple[list[dict], str]:
    """Load the rows of ``path`` (see the module docstring) as plain dicts.

    Returns ``(rows, source)``; ``source`` (the file path or data set name) is what error
    messages name. ``synthetic`` parameterises ``synthetic:*`` paths (default values otherwise).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    split = split or "train"
    if not isinstance(path, str) or not path.strip():
        raise DataError("empty data path", source=repr(path))
    if path.startswith(SYNTHETIC_PREFIX):
        return _load_synthetic(path, split, cache, synthetic or SyntheticDataConfig())
    local = Path(os.path.expanduser(path))
    if local.is_file():
        return _load_file(local, split, cache, source=path), path
    if local.is_dir():
        return _load_dir(local, split, cache, source=path), path
    if looks_local(path):
        raise DataError("no such file or directory", source=path)
    return _load_hub(path, split, cache), path


def looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a local path rather than a ``datasets`` hub name."""
    if path.startswith(("./", "../", "/", "~", ".\\", "..\\")) or os.path.isabs(path):
        return True
    if path.count("/") + (path.count(os.sep) if os.sep != "/" else 0) >= 2:
        return True
    suffix = Path(path).suffix
    return len(suffix) > 1 and suffix[1:].isalnum()


# ----------------------------------------------------------------------------- sources

def _load_synthetic(path: str, split: str, cache: Path, syn: SyntheticDataConfig):
    from prefopt.data.synthetic import materialize

    kind = path[len(SYNTHETIC_PREFIX):]
    if kind not in SYNTHETIC_KINDS:
        raise ConfigError(f"unknown synthetic data set '{path}'{did_you_mean(kind, SYNTHETIC_KINDS)}; "
                          f"expected 'synthetic:pairs' or 'synthetic:lists'")
    if kind == "lists" and syn.list_size < 2:
        raise ConfigError(f"data.synthetic.list_size must be >= 2 (got {syn.list_size})")
    if syn.num_rows < 1:
        raise ConfigError(f"data.synthetic.num_rows must be >= 1 (got {syn.num_rows})")
    file = materialize(kind, syn.num_rows, syn.seed, syn.list_size, cache)
    return _load_file(file, split, cache, source=str(file)), str(file)


def _load_file(file: Path, split: str, cache: Path, *, source: str) -> list[dict]:
    fmt = FILE_FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise DataError(f"unsupported file type '{file.suffix}' (expected one of "
                        f"{', '.join(FILE_FORMATS)}, a directory of them, or a datasets name)",
                        source=source)
    _check_local_split(split, source)
    if fmt == "json":
        _precheck_json(file, source)
    try:
        ds = _load_dataset(fmt, data_files=str(file), split=split, cache=cache)
    except Exception as e:
        if fmt == "json":
            _precheck_json(file, source, full=True)   # raises with the line, if it finds it
        if "corresponds to no data" in str(e):
            raise DataError("no data: the records have no fields", source=source) from e
        raise DataError(f"could not read the file: {_describe(e)}", source=source) from e
    return _to_rows(ds, source)


def _load_dir(directory: Path, split: str, cache: Path, *, source: str) -> list[dict]:
    json_files = sorted(f for f in directory.rglob("*") if f.is_file()
                        and f.suffix.lower() in (".json", ".jsonl")
                        and not any(part.startswith(".") for part in f.relative_to(directory).parts))
    for f in json_files:
        _precheck_json(f, str(f))
    try:
        ds = _load_dataset(str(directory), split=split, cache=cache)
    except Exception as e:
        for f in json_files:
            _precheck_json(f, str(f), full=True)
        raise DataError(f"could not load the directory as a data set (split '{split}'): "
                        f"{_describe(e)}", source=source) from e
    return _to_rows(ds, source)


def _load_hub(name: str, split: str, cache: Path) -> list[dict]:
    try:
        ds = _load_dataset(name, split=split, cache=cache)
    except Exception as e:
        raise DataError(f"not a local file or directory, and loading it as a `datasets` data set "
                        f"(split '{split}') failed: {_describe(e)}", source=name) from e
    return _to_rows(ds, name)


def _load_dataset(*args, split: str, cache: Path, **kwargs):
    import datasets

    with _quiet_datasets():
        return datasets.load_dataset(*args, split=split, cache_dir=str(cache / "datasets"), **kwargs)


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or "Failed to load JSON" log lines (errors are re-raised as DataError)."""
    from datasets.utils import logging as ds_logging

    bars = ds_logging.is_progress_bar_enabled()
    level = ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            ds_logging.enable_progress_bar()


def _to_rows(ds, source: str) -> list[dict]:
    if hasattr(ds, "keys") and not hasattr(ds, "to_list"):   # a DatasetDict: no split chosen
        raise DataError(f"expected one split, got {list(ds.keys())}", source=source)
    try:
        rows = ds.to_list()
    except Exception as e:   # e.g. pyarrow refusing duplicate field names
        raise DataError(f"could not convert the rows: {_describe(e)}", source=source) from e
    if not rows:
        raise DataError("no rows", source=source)
    return rows


def _check_local_split(split: str, source: str) -> None:
    if not re.match(r"^\s*train\b", split):
        raise DataError(f"a local data file has the single split 'train' (got split '{split}'); "
                        f"put held-out rows in their own file and set data.eval_path", source=source)


def _describe(e: BaseException) -> str:
    parts = [f"{type(e).__name__}: {e}".rstrip(": ")]
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in parts[0]:
        parts.append(f"{type(cause).__name__}: {cause}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- JSON checks

def _precheck_json(file: Path, source: str, *, full: bool = False) -> None:
    """Raise a DataError naming the line of a JSON syntax error or a record that is no object.

    ``.jsonl`` files are scanned line by line; unless ``full``, only lines that do not start with
    ``{`` are parsed (cheap). ``.json`` files are parsed whole (a JSON array of objects, a single
    object, or JSON lines in a .json file).
    """
    if file.suffix.lower() == ".jsonl":
        _check_json_lines(file, source, full=full)
        return
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e}", source=source) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":        # JSON lines in a .json file
            _check_json_lines(file, source, full=full)
            return
        raise DataError(f"invalid JSON on line {e.lineno}, column {e.colno}: {e.msg}",
                        source=source) from None
    if isinstance(doc, list):
        if not doc:
            raise DataError("no rows (an empty JSON array)", source=source)
        for i, record in enumerate(doc):
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {_json_type(record)}", source=source, row=i)
    elif not isinstance(doc, dict):
        raise DataError(f"expected a JSON array of objects, got {_json_type(doc)}", source=source)


def _check_json_lines(file: Path, source: str, *, full: bool) -> None:
    row = 0
    with open(file, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            stripped = line.strip()
            if not stripped:
                continue
            if full or not stripped.startswith(b"{"):
                try:
                    record = json.loads(stripped)
                except UnicodeDecodeError as e:
                    raise DataError(f"line {lineno} is not UTF-8 text: {e}", source=source,
                                    row=row) from None
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON on line {lineno}, column {e.colno}: {e.msg}",
                                    source=source, row=row) from None
                if not isinstance(record, dict):
                    raise DataError(f"line {lineno}: expected a JSON object, got {_json_type(record)}",
                                    source=source, row=row)
            row += 1
    if row == 0:
        raise DataError("no rows (the file is empty)", source=source)


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
