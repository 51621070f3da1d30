"""Load raw data rows: local files, `datasets` names, synthetic data.

``data.path`` (and ``data.eval_path``) may be

* a local ``.jsonl`` / ``.json`` file, parsed with the standard library's JSON parser
  (:mod:`prefopt.data.json_rows`), so rows keep their exact JSON types (no column casts: a string
  score stays a string and is refused by the row validation); or a ``.parquet`` file, read with
  pyarrow. Such a file has the single split ``train``; slices such as ``train[:100]``,
  ``train[10:20]``, ``train[:50%]`` work (``datasets`` split syntax);
* a local directory: its ``.jsonl`` / ``.json`` / ``.parquet`` files, split by the ``datasets``
  file naming (``train-*`` / ``test.jsonl`` / ``train/`` ...; without such names every file is in
  ``train``). Every file of the chosen split is loaded, in sorted path order; their columns must
  agree. Documentation files (``README*``, ``*.md``, ``*.txt``, ...) and hidden paths are
  ignored; any other file that would be left out (another format, or a data file outside every
  split) is a :class:`DataError` naming it, as is a directory without data files;
* ``synthetic:pairs`` / ``lists`` / ``sft`` / ``attributes`` / ``steps`` / ``reverse``: generated offline into the cache
  (:mod:`prefopt.data.synthetic`), then loaded as a JSONL file;
* anything else is a ``datasets`` hub name (needs the network or the hub cache).

A name that looks local (a file suffix, a leading ``./``, ``../``, ``/`` or ``~``, or two or more
path separators; ``org/name`` hub names have one) but does not exist is a :class:`DataError`.

Every local file is read and checked in full before any row is returned: unreadable files,
non-UTF-8 bytes, JSON syntax errors, records that are no objects, values nested too deeply,
numbers beyond float range and duplicate keys are :class:`DataError`\\ s naming the file, the
row, the line and (where it applies) the field; nothing else escapes (see
:mod:`prefopt.data.json_rows`). Row numbers are 0-based record indices: in such parse errors,
the index in the file named (blank lines of a JSONL file are not counted, slices are not yet
applied); in later errors about the loaded rows (which name ``data.path``), the index in what was
loaded (the slice; for a directory, its files' rows concatenated). Line numbers are 1-based.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from prefopt.cache import cache_dir as default_cache_dir
from prefopt.config_schema import SyntheticDataConfig
from prefopt.data.json_rows import parse_json_file
from prefopt.errors import ConfigError, DataError, did_you_mean

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_KINDS = ("pairs", "lists", "sft", "attributes", "steps", "reverse")
# files in a data directory that are not data and are left out without a word
DOC_SUFFIXES = {".md", ".txt", ".rst", ".html", ".pdf", ".png", ".jpg", ".jpeg", ".svg", ".yaml",
                ".yml", ".toml", ".cfg", ".ini", ".py", ".sh", ".lock", ".log"}
DOC_STEMS = {"readme", "license", "licence", "notice", "changelog", "authors", "citation"}
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "config.json"}
_SPLIT_NAME = re.compile(r"\s*(\w+(?:\.\w+)*)")


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
    try:
        is_file, is_dir = local.is_file(), local.is_dir()
    except OSError as e:
        raise DataError(f"cannot access: {_os_reason(e)}", source=path) from None
    if is_file:
        return _load_file(local, split, source=path), path
    if is_dir:
        return _load_dir(local, split, source=path), path
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
                          f"expected one of {', '.join(SYNTHETIC_PREFIX + k for k in SYNTHETIC_KINDS)}")
    if kind == "lists" and syn.list_size < 2:
        raise ConfigError(f"data.synthetic.list_size must be >= 2 (got {syn.list_size})")
    if syn.num_rows < 1:
        raise ConfigError(f"data.synthetic.num_rows must be >= 1 (got {syn.num_rows})")
    file = materialize(kind, syn.num_rows, syn.seed, syn.list_size, cache, words=syn.words)
    return _load_file(file, split, source=str(file)), str(file)


def _load_file(file: Path, split: str, *, source: str) -> list[dict]:
    if file.suffix.lower() not in FILE_FORMATS:
        raise DataError(f"unsupported file type '{file.suffix}' (expected one of "
                        f"{', '.join(FILE_FORMATS)}, a directory of them, or a datasets name)",
                        source=source)
    if any(name != "train" for name in _split_names(split, source)):
        raise DataError(f"a local data file has the single split 'train' (got split '{split}'); "
                        f"put held-out rows in their own file and set data.eval_path", source=source)
    rows = read_file(file, source)
    return _select(split, {"train": rows}, source)


def _load_dir(directory: Path, split: str, *, source: str) -> list[dict]:
    names = _split_names(split, source)
    splits, listing = _dir_splits(directory, source)
    data_files = [f for f in listing if _is_data_file(f)]
    if not data_files:
        held = ", ".join(str(f.relative_to(directory)) for f in listing[:10]) or "nothing"
        more = f" and {len(listing) - 10} more" if len(listing) > 10 else ""
        raise DataError(f"no .jsonl/.json/.parquet files in the directory (it holds: {held}{more})",
                        source=source)
    in_splits = {f for files in splits.values() for f in files}
    outside = [f for f in listing if f not in in_splits and not _is_doc_file(f)]
    if outside:
        named = "; ".join(f"{s}: {_names(files, directory)}" for s, files in splits.items())
        raise DataError(f"the file names split the directory ({named}); these files are in no split "
                        f"and would be ignored: {_names(outside, directory)}", source=source)
    rows_by_split = {}
    for name in dict.fromkeys(names):
        if name not in splits:
            raise DataError(f"no split '{name}' in the directory (its splits: {', '.join(splits)})",
                            source=source)
        rows_by_split[name] = _read_split(directory, name, splits[name], source)
    return _select(split, rows_by_split, source)


def _dir_splits(directory: Path, source: str) -> tuple[dict[str, list[Path]], list[Path]]:
    """``({split: sorted files}, every visible file)``, splits by the ``datasets`` file naming."""
    from datasets import data_files as ds_files

    def resolve(glob: str) -> list[str]:   # documentation files play no part in the split naming
        with contextlib.suppress(FileNotFoundError):
            return [f for f in ds_files.resolve_pattern(glob, str(directory)) if not _is_doc_file(Path(f))]
        return []

    try:
        listing = sorted((f for f in directory.rglob("*") if f.is_file()
                          and not _hidden(f.relative_to(directory))), key=lambda f: str(f.relative_to(directory)))
        find_patterns = getattr(ds_files, "_get_data_files_patterns", None)
        try:
            patterns = (find_patterns(resolve) if find_patterns is not None
                        else ds_files.get_data_patterns(str(directory)))
        except (FileNotFoundError, ds_files.EmptyDatasetError):
            patterns = {}
        splits: dict[str, list[Path]] = {}
        for name, globs in patterns.items():
            files = {Path(f).resolve() for glob in globs for f in resolve(glob)}
            splits[str(name)] = [f for f in listing if f.resolve() in files]
    except OSError as e:
        raise DataError(f"cannot list the directory: {_os_reason(e)}", source=source) from None
    except Exception as e:   # datasets refusing a split name, ...
        raise DataError(f"cannot tell the directory's splits: {_describe(e)}", source=source) from e
    return splits, listing


def _read_split(directory: Path, name: str, files: list[Path], source: str) -> list[dict]:
    other = [f for f in files if not _is_data_file(f) and not _is_doc_file(f)]
    if other:
        raise DataError(f"split '{name}' holds files of a type prefopt does not load: "
                        f"{_names(other, directory)} (expected {', '.join(FILE_FORMATS)}; "
                        f"convert them or move them out)", source=source)
    files = [f for f in files if _is_data_file(f)]
    if not files:
        raise DataError(f"split '{name}' has no .jsonl/.json/.parquet files", source=source)
    rows, columns = [], {}
    for f in files:
        file_rows = read_file(f, str(f))
        columns[f] = list(dict.fromkeys(k for row in file_rows for k in row))
        rows.extend(file_rows)
    if len({frozenset(c) for c in columns.values()}) > 1:
        described = "; ".join(f"{f.relative_to(directory)}: {', '.join(c) or 'none'}" for f, c in columns.items())
        raise DataError(f"the files of split '{name}' have different columns ({described})", source=source)
    return rows


def _load_hub(name: str, split: str, cache: Path) -> list[dict]:
    try:
        ds = _load_dataset(name, split=split, cache=cache)
    except Exception as e:
        raise DataError(f"not a local file or directory, and loading it as a `datasets` data set "
                        f"(split '{split}') failed: {_describe(e)}", source=name) from e
    if hasattr(ds, "keys") and not hasattr(ds, "to_list"):   # a DatasetDict: no split chosen
        raise DataError(f"expected one split, got {list(ds.keys())}", source=name)
    try:
        rows = ds.to_list()
    except Exception as e:   # e.g. pyarrow refusing duplicate field names
        raise DataError(f"could not convert the rows: {_describe(e)}", source=name) from e
    if not rows:
        raise DataError("no rows", source=name)
    return rows


def _load_dataset(*args, split: str, cache: Path, **kwargs):
    import datasets

    with _quiet_datasets():
        return datasets.load_dataset(*args, split=split, cache_dir=str(cache / "datasets"), **kwargs)


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or log lines (errors are re-raised as DataError)."""
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


# ----------------------------------------------------------------------------- files

def read_file(file: Path, source: str) -> list[dict]:
    """All rows of one local ``.jsonl`` / ``.json`` / ``.parquet`` file; DataError naming
    ``source`` (and the row, line and field) for anything wrong with it."""
    data = _read_bytes(file, source)
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(data, source)
    else:
        rows = parse_json_file(data, source, lines=suffix == ".jsonl")
    if not any(rows):
        raise DataError("no data: the records have no fields", source=source)
    return rows


def _read_bytes(file: Path, source: str) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read: {_os_reason(e)}", source=source) from None


def _parquet_rows(data: bytes, source: str) -> list[dict]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except Exception as e:
        raise DataError(f"could not read the Parquet file: {_describe(e)}", source=source) from e
    if not rows:
        raise DataError("no rows (the Parquet file has none)", source=source)
    return rows


# ----------------------------------------------------------------------------- splits

def _split_names(split: str, source: str) -> list[str]:
    """The split names in ``split`` (``train``, ``train[:10%]+test``, ...); DataError if invalid."""
    names = []
    for part in split.split("+"):
        m = _SPLIT_NAME.match(part)
        if not m:
            raise DataError(f"invalid split '{split}' (expected e.g. 'train', 'train[:100]', "
                            f"'train[10:20]', 'train[:50%]')", source=source)
        names.append(m.group(1))
    if split.strip() not in names:   # slices: let datasets check the syntax now
        _instructions(split, {n: 0 for n in names}, source)
    return names


def _select(split: str, rows_by_split: dict[str, list[dict]], source: str) -> list[dict]:
    """The rows ``split`` selects (slices and ``+`` as in ``datasets``)."""
    if split.strip() in rows_by_split:
        rows = rows_by_split[split.strip()]
    else:
        rows = [row for ins in _instructions(split, {n: len(r) for n, r in rows_by_split.items()}, source)
                for row in rows_by_split[ins.splitname][ins.from_:ins.to]]
    if not rows:
        sizes = ", ".join(f"{len(r)} in '{n}'" for n, r in rows_by_split.items())
        raise DataError(f"no rows: split '{split}' selects none of the rows ({sizes})", source=source)
    return rows


def _instructions(split: str, sizes: dict[str, int], source: str):
    import datasets

    try:
        return datasets.ReadInstruction.from_spec(split.strip()).to_absolute(sizes)
    except Exception as e:
        raise DataError(f"invalid split '{split}': {e} (expected e.g. 'train', 'train[:100]', "
                        f"'train[10:20]', 'train[:50%]')", source=source) from None


# ----------------------------------------------------------------------------- helpers

def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "__")) for part in relative.parts)


def _is_data_file(f: Path) -> bool:
    return f.suffix.lower() in FILE_FORMATS and f.name.lower() not in METADATA_FILES


def _is_doc_file(f: Path) -> bool:
    return (f.suffix.lower() in DOC_SUFFIXES or f.stem.lower() in DOC_STEMS
            or f.name.lower() in METADATA_FILES)


def _names(files: list[Path], directory: Path, limit: int = 10) -> str:
    shown = ", ".join(str(f.relative_to(directory)) for f in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _os_reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror.lower() if e.strerror else f"{type(e).__name__}: {e}"


def _describe(e: BaseException) -> str:
    parts = [f"{type(e).__name__}: {e}".rstrip(": ")]
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in parts[0]:
        parts.append(f"{type(cause).__name__}: {cause}")
    return "; ".join(parts)
