"""The reward-model row kinds beside pairs, lists and SFT rows (:mod:`prefopt.data.examples`).

* pairs may carry a margin (``data.margin_field``): how far the chosen reward should exceed the
  rejected one (Llama 2's margin; the preference strength ``prefopt score`` writes; DPO's offset,
  :mod:`prefopt.objectives.dpo`), and a weight (``data.weight_field``): a factor >= 0 on the row's
  loss in the policy's pair objectives (DPO, IPO, SimPO);
* ``attributes``: ``{prompt, response, attributes: {name: rating}}`` (HelpSteer2): one regression
  target per attribute, in the order of ``data.attributes`` (default: first seen in the training
  rows); an attribute a row does not rate is masked out of its loss;
* ``steps``: ``{prompt, steps: [...], labels: [...]}`` (Math-Shepherd): a response written as its
  steps, each followed by ``data.step_delimiter``; one label in [0, 1] per step (hard 0/1, or soft:
  the fraction of completions from that step that reach the right answer). The response's tokens
  are the concatenation of each ``step + delimiter`` tokenized alone (:func:`tokenize_steps`), so a
  step's last token is known exactly; a reward model served on sampled text re-tokenizes it the same way.
"""
from __future__ import annotations

import math
from numbers import Real

from prefopt.errors import DataError


def _number(value) -> float | None:
    if not isinstance(value, Real) or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (OverflowError, TypeError, ValueError):   # an int too large for a float
        return None
    return value if math.isfinite(value) else None


def row_margin(row: dict, field: str, source: str, i: int) -> float | None:
    """The row's margin, or None when it has none."""
    if row.get(field) is None:
        return None
    value = _number(row[field])
    if value is None:
        raise DataError(f"the margin must be a finite number, got {row[field]!r}", source=source, row=i, field=field)
    return value


def row_weight(row: dict, field: str, source: str, i: int) -> float | None:
    """The row's loss weight (a finite number >= 0), or None when it has none."""
    if row.get(field) is None:
        return None
    value = _number(row[field])
    if value is None or value < 0:
        raise DataError(f"the weight must be a finite number >= 0, got {row[field]!r}"[:200], source=source, row=i,
                        field=field)
    return value


def attribute_names(rows: list, field: str) -> list[str]:
    """Attribute names in first-seen order over ``rows`` (rows that are not objects are skipped here
    and refused by the row validation)."""
    names: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get(field), dict):
            names.update(dict.fromkeys(k for k in row[field] if isinstance(k, str)))
    return list(names)


def row_targets(row: dict, field: str, names: list[str], source: str, i: int) -> list[float]:
    """One rating per attribute of ``names`` (NaN where the row does not rate it)."""
    value = row.get(field)
    if not isinstance(value, dict) or not value:
        raise DataError(f"expected an object {{attribute: rating}}, got {value!r}"[:200], source=source, row=i,
                        field=field)
    unknown = [k for k in value if k not in names]
    if unknown:
        raise DataError(f"attribute(s) {unknown} are not among the attributes trained ({names}; data.attributes)",
                        source=source, row=i, field=field)
    out = []
    for name in names:
        if value.get(name) is None:
            out.append(math.nan)
            continue
        rating = _number(value[name])
        if rating is None:
            raise DataError(f"rating of '{name}' must be a finite number, got {value[name]!r}", source=source,
                            row=i, field=f"{field}.{name}")
        out.append(rating)
    if all(math.isnan(v) for v in out):
        raise DataError("rates none of the attributes", source=source, row=i, field=field)
    return out


def row_steps(row: dict, steps_field: str, labels_field: str, source: str, i: int) -> tuple[list[str], list[float]]:
    """The row's step texts and labels, validated."""
    steps, labels = row.get(steps_field), row.get(labels_field)
    if not isinstance(steps, list) or not steps:
        raise DataError(f"expected a non-empty list of step texts, got {steps!r}"[:200], source=source, row=i,
                        field=steps_field)
    for j, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise DataError(f"step {j} must be a non-empty string, got {step!r}"[:200], source=source, row=i,
                            field=steps_field)
    if not isinstance(labels, list) or len(labels) != len(steps):
        got = f"{len(labels)} labels" if isinstance(labels, list) else repr(labels)[:80]
        raise DataError(f"expected one label per step ({len(steps)}), got {got}", source=source, row=i,
                        field=labels_field)
    out = []
    for j, label in enumerate(labels):
        value = _number(label)
        if value is None or not 0.0 <= value <= 1.0:
            raise DataError(f"label {j} must be a number in [0, 1], got {label!r}", source=source, row=i,
                            field=labels_field)
        out.append(value)
    return steps, out


def step_pieces(steps: list[str], delimiter: str) -> list[str]:
    """The text of each step as the model reads it: the step, then the delimiter."""
    return [step + delimiter for step in steps]


def join_steps(piece_ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """``(response_ids, step_ends)``: the pieces' tokens concatenated and each piece's last index."""
    ids, ends = [], []
    for piece in piece_ids:
        ids.extend(piece)
        ends.append(len(ids) - 1)
    return ids, ends


def tokenize_steps(tokenizer, steps: list[str], delimiter: str) -> tuple[list[int], list[int]]:
    """Tokenize a response given as steps: ``(response_ids, step_ends)`` (no special tokens)."""
    pieces = tokenizer(step_pieces(steps, delimiter), add_special_tokens=False)["input_ids"]
    return join_steps([list(p) for p in pieces])
