"""Preference data sets: load, validate + tokenize (:mod:`prefopt.data.examples`), split.

``load_preference_data(cfg.data, tokenizer, seed=...)`` returns a :class:`PreferenceData` whose
``train`` / ``eval`` lists hold examples ``{"prompt_ids", "response_ids", "scores", "row"}``
(format, tokenization and truncation policy: :mod:`prefopt.data.examples`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

from prefopt.config_schema import DataConfig
from prefopt.data.examples import MAX_SKIP_MESSAGES, build_examples
from prefopt.data.loading import SYNTHETIC_PREFIX, load_rows
from prefopt.errors import ConfigError, DataError, did_you_mean

ON_ERROR = ("raise", "skip")


@dataclass
class PreferenceData:
    kind: str                                  # "pairs" | "lists" | "sft" | "attributes" | "steps"
    train: list[dict]
    eval: list[dict]
    num_skipped: int = 0                       # malformed rows dropped (on_error: skip)
    source: str = ""                           # training data file / name
    skip_messages: list[str] = field(default_factory=list)   # the first few reasons, for logs
    attributes: list[str] = field(default_factory=list)      # attributes rows: the order of their ratings


def load_preference_data(cfg: DataConfig, tokenizer, *, seed: int, cache_dir: str | Path | None = None,
                         attributes: list[str] | None = None, kinds: tuple[str, ...] = ()) -> PreferenceData:
    """Load, validate, tokenize and split the data of a recipe's ``data:`` section.

    Held-out data: ``eval_path`` / ``eval_split`` when given (an ``eval_split`` alone is another
    split of ``path``; an ``eval_path`` alone uses its ``train`` split), capped at
    ``max_eval_examples`` by a seeded sample; otherwise a seeded random ``eval_fraction`` of the
    valid rows (at least one when the fraction is > 0, at most ``max_eval_examples``).
    Train and eval examples are in source row order. ``attributes``: the order of attributes rows'
    ratings (default: first seen in the training rows). ``kinds``: the row kinds the objective trains
    on, preferred when a row's fields fit several.
    """
    validate_data_config(cfg)
    from prefopt.data.reward_rows import attribute_names
    rows, source = load_rows(cfg.path, cfg.split, cache_dir=cache_dir, synthetic=cfg.synthetic)
    attributes = list(attributes or attribute_names(rows, cfg.attributes_field))
    kind, train, skipped, messages = build_examples(rows, tokenizer, cfg, source=source, attributes=attributes,
                                                    kinds=kinds)
    if cfg.eval_path or cfg.eval_split:
        eval_rows, eval_source = load_rows(cfg.eval_path or cfg.path, cfg.eval_split or "train",
                                           cache_dir=cache_dir, synthetic=cfg.synthetic)
        eval_kind, held_out, eval_skipped, eval_messages = build_examples(
            eval_rows, tokenizer, cfg, source=eval_source, attributes=attributes, kinds=kinds)
        if eval_kind != kind:
            raise DataError(f"the held-out data are {eval_kind} but the training data are {kind}",
                            source=eval_source)
        eval_set = sample_examples(held_out, cfg.max_eval_examples, seed)
        skipped += eval_skipped
        messages = (messages + eval_messages)[:MAX_SKIP_MESSAGES]
    else:
        train, eval_set = split_train_eval(train, cfg.eval_fraction, cfg.max_eval_examples, seed,
                                           source=source)
    return PreferenceData(kind=kind, train=train, eval=eval_set, num_skipped=skipped, source=source,
                          skip_messages=messages, attributes=attributes if kind == "attributes" else [])


def validate_data_config(cfg: DataConfig) -> None:
    """Raise :class:`ConfigError` naming the key of an invalid ``data:`` value."""
    def bad(key: str, message: str):
        raise ConfigError(f"data.{key}: {message} (got {getattr(cfg, key, None)!r})")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(cfg.path, str) or not cfg.path.strip():
        bad("path", "must be a file, directory, datasets name or synthetic:pairs|lists")
    if not isinstance(cfg.split, str) or not cfg.split.strip():
        bad("split", "must be a split name such as 'train'")
    if not isinstance(cfg.eval_fraction, Real) or isinstance(cfg.eval_fraction, bool) \
            or not 0 <= cfg.eval_fraction < 1:
        bad("eval_fraction", "must be a number in [0, 1)")
    if not is_int(cfg.max_eval_examples) or cfg.max_eval_examples < 0:
        bad("max_eval_examples", "must be an integer >= 0")
    if not is_int(cfg.max_length) or cfg.max_length < 2:
        bad("max_length", "must be an integer >= 2")
    if not is_int(cfg.max_prompt_length) or cfg.max_prompt_length < 1:
        bad("max_prompt_length", "must be an integer >= 1")
    if cfg.max_prompt_length >= cfg.max_length:
        bad("max_prompt_length", f"must be < data.max_length ({cfg.max_length}) to leave room for responses")
    for key in ("prompt_field", "chosen_field", "rejected_field", "responses_field", "scores_field",
                "margin_field", "weight_field", "attributes_field", "steps_field", "labels_field"):
        if not isinstance(getattr(cfg, key), str) or not getattr(cfg, key):
            bad(key, "must be a non-empty field name")
    if len({cfg.prompt_field, cfg.chosen_field, cfg.rejected_field}) < 3:
        bad("rejected_field", "prompt_field, chosen_field and rejected_field must differ")
    if len({cfg.prompt_field, cfg.responses_field, cfg.scores_field}) < 3:
        bad("scores_field", "prompt_field, responses_field and scores_field must differ")
    if len({cfg.prompt_field, cfg.chosen_field, cfg.rejected_field, cfg.margin_field, cfg.weight_field}) < 5:
        bad("weight_field", "prompt_field, chosen_field, rejected_field, margin_field and weight_field must differ")
    if not isinstance(cfg.step_delimiter, str) or not cfg.step_delimiter:
        bad("step_delimiter", "must be a non-empty string (written after every step)")
    if cfg.on_error not in ON_ERROR:
        bad("on_error", f"must be 'raise' or 'skip'{did_you_mean(str(cfg.on_error), ON_ERROR)}")
    if isinstance(cfg.path, str) and cfg.path.startswith(SYNTHETIC_PREFIX):
        syn = cfg.synthetic
        if not is_int(syn.num_rows) or syn.num_rows < 1:
            raise ConfigError(f"data.synthetic.num_rows: must be an integer >= 1 (got {syn.num_rows!r})")
        if not is_int(syn.list_size) or syn.list_size < 2:
            raise ConfigError(f"data.synthetic.list_size: must be an integer >= 2 (got {syn.list_size!r})")
        from prefopt.data.synthetic import NOUNS
        if not is_int(syn.words) or not 2 <= syn.words <= len(NOUNS):
            raise ConfigError(f"data.synthetic.words: must be an integer in [2, {len(NOUNS)}] (distinct nouns "
                              f"to reverse; got {syn.words!r})")
        if not is_int(syn.seed):
            raise ConfigError(f"data.synthetic.seed: must be an integer (got {syn.seed!r})")


def split_train_eval(examples: list[dict], eval_fraction: float, max_eval_examples: int, seed: int,
                     *, source: str = "") -> tuple[list[dict], list[dict]]:
    """A seeded random held-out split: ``max(1, round(fraction * n))`` examples, capped."""
    if eval_fraction <= 0 or max_eval_examples <= 0:
        return list(examples), []
    n = len(examples)
    n_eval = min(max(1, round(eval_fraction * n)), max_eval_examples)
    if n_eval >= n:
        raise DataError(f"only {n} valid rows: too few to hold out {n_eval} for evaluation "
                        f"(set data.eval_fraction: 0 or data.eval_path)", source=source or None)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def sample_examples(examples: list[dict], max_examples: int, seed: int) -> list[dict]:
    """At most ``max_examples`` examples: a seeded sample, kept in source order."""
    if len(examples) <= max_examples:
        return list(examples)
    keep = set(random.Random(seed).sample(range(len(examples)), max_examples))
    return [ex for i, ex in enumerate(examples) if i in keep]
