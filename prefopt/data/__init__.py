"""Preference data: loading, validation + tokenization, collation.

``load_preference_data(cfg.data, tokenizer, seed=...)`` gives tokenized train / eval examples;
``collate_examples`` turns a micro-batch of them into tensors.
"""
from prefopt.data.collate import collate_examples, count_tokens, make_micro_batches
from prefopt.data.examples import build_examples, detect_kind, truncate
from prefopt.data.loading import load_rows
from prefopt.data.preference import (
    PreferenceData,
    load_preference_data,
    split_train_eval,
    validate_data_config,
)

__all__ = [
    "PreferenceData",
    "build_examples",
    "collate_examples",
    "count_tokens",
    "detect_kind",
    "load_preference_data",
    "load_rows",
    "make_micro_batches",
    "split_train_eval",
    "truncate",
    "validate_data_config",
]
