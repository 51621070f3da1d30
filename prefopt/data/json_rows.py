"""Parse local ``.jsonl`` / ``.json`` files into rows with the standard library's JSON parser.

Rows keep their exact JSON types (a string stays a string, ``1`` stays an int): nothing is cast to
a common column type, so a wrong type is reported for the row that has it. Every record is
checked before any row is returned; a problem is a :class:`DataError` naming the file, the row
(0-based record index in the file; blank lines of a ``.jsonl`` file are not counted) and the line
(1-based; for a record of a ``.json`` array, the line on which the record starts), and the
(top-level) field where one applies:

* bytes that are not UTF-8 (a UTF-8 byte-order mark at the start is allowed);
* JSON syntax errors (with line and column);
* a record that is not a JSON object;
* a value nested more than :data:`MAX_DEPTH` arrays/objects deep ("nested too deeply");
* a number a 64-bit float cannot hold (``1e999``, a 400-digit integer: "out of float range");
  ``NaN`` / ``Infinity`` literals are kept, for the row validation to judge;
* an object with the same key twice.

A ``.jsonl`` file has one record per line; a ``.json`` file holds an array of records, a single
record, or JSON lines.
"""
from __future__ import annotations

import json
import re

from prefopt.errors import DataError

MAX_DEPTH = 100                 # arrays/objects, the record itself included
_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")
_CONTAINERS = (dict, list)


def parse_json_file(data: bytes, source: str, *, lines: bool) -> list[dict]:
    """The records of a ``.jsonl`` (``lines=True``) or ``.json`` file's bytes (see the module doc)."""
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    parser = _Parser(source)
    return parser.json_lines(data) if lines else parser.json_document(data)


class _BadNumber:
    """Stands in for a number literal that a float cannot hold (reported, never returned)."""
    __slots__ = ("literal",)

    def __init__(self, literal: str):
        self.literal = literal


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.issues: list[tuple[object, str, str | None]] = []   # (object, problem, key) per record
        self.decoder = json.JSONDecoder(parse_float=self._float, parse_int=self._int,
                                        object_pairs_hook=self._object, strict=False)

    # -- parse hooks: record problems; _check names the row and field afterwards

    def _float(self, literal: str):
        value = float(literal)
        if value in (float("inf"), float("-inf")):      # a finite literal beyond float range
            return self._bad_number(literal)
        return value

    def _int(self, literal: str):
        digits = len(literal) - literal.startswith("-")
        if digits < 309:                                 # < 1e308 < the largest float
            return int(literal)
        if digits == 309:
            value = int(literal)
            try:
                float(value)
                return value
            except OverflowError:
                pass
        return self._bad_number(literal)

    def _bad_number(self, literal: str) -> _BadNumber:
        marker = _BadNumber(literal)
        shown = literal if len(literal) <= 24 else f"{literal[:12]}...{literal[-6:]} ({len(literal)} characters)"
        self.issues.append((marker, f"the number {shown} is out of float range", None))
        return marker

    def _object(self, pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))
            self.issues.append((obj, f"duplicate key '{key}'", key))
        return obj

    # -- files

    def json_lines(self, data: bytes) -> list[dict]:
        rows: list[dict] = []
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            row = len(rows)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise self._error(f"line {lineno} is not UTF-8 text: {_utf8_problem(e)} at byte "
                                  f"{e.start + 1} of the line", row) from None
            self.issues = []
            try:
                value = self.decoder.decode(text)
            except RecursionError:
                raise self._error(f"line {lineno}: nested too deeply (more than {MAX_DEPTH} levels "
                                  f"of arrays/objects)", row) from None
            except json.JSONDecodeError as e:
                raise self._error(f"invalid JSON on line {lineno}, column {e.colno}: {e.msg}", row) from None
            rows.append(self._check(value, row, lineno))
        if not rows:
            raise DataError("no rows (the file is empty)", source=self.source)
        return rows

    def json_document(self, data: bytes) -> list[dict]:
        try:
            text = data.decode("utf-8")
            bad_at = None
        except UnicodeDecodeError as e:
            # parse what decodes (the bad bytes as lone surrogates) to find the record they are in
            text = data.decode("utf-8", "surrogateescape")
            bad_at = (len(data[:e.start].decode("utf-8")), data.count(b"\n", 0, e.start) + 1, e)
        pos = _WS.match(text, 0).end()
        if pos == len(text):
            raise DataError("no rows (the file is empty)", source=self.source)
        if text[pos] != "[":
            return self._single_or_lines(text, data, pos, bad_at)
        rows: list[dict] = []
        pos = _WS.match(text, pos + 1).end()
        if text.startswith("]", pos):
            self._raise_bad_bytes(bad_at, None, len(text))
            end = _WS.match(text, pos + 1).end()
            if end != len(text):
                raise self._syntax(json.JSONDecodeError("Extra data", text, end), None)
            raise DataError("no rows (an empty JSON array)", source=self.source)
        while True:
            row = len(rows)
            value, end = self._decode(text, pos, row, bad_at)
            self._raise_bad_bytes(bad_at, row, end)
            rows.append(self._check(value, row, _line(text, pos)))
            pos = _WS.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                end = _WS.match(text, pos + 1).end()
                self._raise_bad_bytes(bad_at, None, len(text))
                if end != len(text):
                    raise self._syntax(json.JSONDecodeError("Extra data", text, end), None)
                return rows
            self._raise_bad_bytes(bad_at, row + 1, pos + 1)
            raise self._syntax(json.JSONDecodeError("Expecting ',' delimiter", text, pos), row + 1)

    def _single_or_lines(self, text: str, data: bytes, pos: int, bad_at) -> list[dict]:
        value, end = self._decode(text, pos, 0, bad_at)
        if _WS.match(text, end).end() != len(text):       # more values: JSON lines in a .json file
            return self.json_lines(data)
        self._raise_bad_bytes(bad_at, 0, len(text))
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON array of objects, got {json_type(value)}", source=self.source)
        return [self._check(value, 0, _line(text, pos))]

    def _decode(self, text: str, pos: int, row: int, bad_at):
        self.issues = []
        try:
            return self.decoder.raw_decode(text, pos)
        except RecursionError:
            self._raise_bad_bytes(bad_at, row, len(text))
            raise self._error(f"line {_line(text, pos)}: nested too deeply (more than {MAX_DEPTH} "
                              f"levels of arrays/objects)", row) from None
        except json.JSONDecodeError as e:
            self._raise_bad_bytes(bad_at, row, e.pos + 1)
            raise self._syntax(e, row) from None

    # -- checks and errors

    def _check(self, value, row: int, lineno: int) -> dict:
        if not isinstance(value, dict):
            raise self._error(f"line {lineno}: expected a JSON object, got {json_type(value)}", row)
        problem = _find_problem(value, self.issues)
        if problem is not None:
            field, message = problem
            raise DataError(f"line {lineno}: {message}", source=self.source, row=row, field=field)
        return value

    def _raise_bad_bytes(self, bad_at, row: int | None, end: int) -> None:
        """Report non-UTF-8 bytes once the parse has reached them (``end``: a text position)."""
        if bad_at is not None and bad_at[0] < end:
            _, lineno, e = bad_at
            raise self._error(f"line {lineno} is not UTF-8 text: {_utf8_problem(e)}", row)

    def _syntax(self, e: json.JSONDecodeError, row: int | None) -> DataError:
        # (no row in the prefix: "file F: invalid JSON on line L" as before; .row is still set)
        err = DataError(f"invalid JSON on line {e.lineno}, column {e.colno}: {e.msg}"
                        + (f" (row {row})" if row is not None else ""), source=self.source)
        err.row = row
        return err

    def _error(self, message: str, row: int | None) -> DataError:
        return DataError(message, source=self.source, row=row)


def _find_problem(record: dict, issues: list) -> tuple[str | None, str] | None:
    """``(top-level field, message)`` of the first problem in ``record``: an issue the parse
    hooks recorded for one of its values, or nesting deeper than MAX_DEPTH; None if it is fine."""
    targets = {id(obj): (message, key) for obj, message, key in issues}
    if id(record) in targets:
        message, key = targets[id(record)]
        return key, message
    for field, value in record.items():
        if not isinstance(value, (dict, list, _BadNumber)):
            continue
        stack = [(value, 2)]
        while stack:
            v, depth = stack.pop()
            if id(v) in targets:
                message, key = targets[id(v)]
                return field, message + (" in a nested object" if key is not None else "")
            if isinstance(v, _CONTAINERS):
                if depth > MAX_DEPTH:
                    return field, f"nested too deeply (more than {MAX_DEPTH} levels of arrays/objects)"
                children = v.values() if isinstance(v, dict) else v
                stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, _BadNumber)))
    if targets:                                          # cannot happen; never return a marker
        return None, next(iter(targets.values()))[0]
    return None


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _utf8_problem(e: UnicodeDecodeError) -> str:
    return f"{e.reason} (byte 0x{e.object[e.start]:02x})"


def json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
