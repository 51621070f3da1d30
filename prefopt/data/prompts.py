"""Prompt sets for online (rollout) objectives.

Rows need a prompt field (``data.prompt_field``): a string or chat messages (rendered with the
tokenizer's chat template and a generation prompt). Every other field of the row is kept and
handed to reward functions as ``row`` (e.g. a reference answer). Over-long prompts keep their
last ``data.max_prompt_length`` tokens. Any preference data set works as a prompt set too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from prefopt.config_schema import DataConfig
from prefopt.errors import DataError


@dataclass
class PromptSet:
    source: str
    prompts: list[dict] = field(default_factory=list)   # {"prompt_ids", "prompt_text", "row"}


def load_prompt_splits(cfg: DataConfig, tokenizer, *, cache_dir=None, held_out: bool) -> tuple[list[dict], list[dict]]:
    """Training prompts and, with ``held_out`` (``train.eval_every`` > 0), held-out prompts:
    ``data.eval_path`` when given, else a seeded ``data.eval_fraction`` of the prompt set, at most
    ``data.max_eval_examples``, kept out of training. Without ``held_out``: every prompt trains."""
    import dataclasses
    import random

    from prefopt.data.preference import validate_data_config
    validate_data_config(cfg)
    prompts = load_prompts(cfg, tokenizer, cache_dir=cache_dir).prompts
    if not held_out:
        return prompts, []
    if cfg.eval_path:
        eval_cfg = dataclasses.replace(cfg, path=cfg.eval_path, split=cfg.eval_split or cfg.split)
        return prompts, load_prompts(eval_cfg, tokenizer, cache_dir=cache_dir).prompts[:cfg.max_eval_examples]
    count = min(cfg.max_eval_examples, int(len(prompts) * cfg.eval_fraction))
    if count < 1 or count >= len(prompts):
        raise DataError(f"data.eval_fraction={cfg.eval_fraction} of {len(prompts)} prompts leaves "
                        f"{count} held-out prompts and {len(prompts) - count} to train on; set data.eval_fraction "
                        f"or data.eval_path", source=cfg.path)
    order = list(range(len(prompts)))
    random.Random("held-out-prompts").shuffle(order)
    held = set(order[:count])
    return ([p for i, p in enumerate(prompts) if i not in held], [prompts[i] for i in sorted(held)])


def load_prompts(cfg: DataConfig, tokenizer, *, cache_dir=None) -> PromptSet:
    from prefopt.data.loading import load_rows

    rows, source = load_rows(cfg.path, cfg.split, cache_dir=cache_dir, synthetic=cfg.synthetic)
    out = PromptSet(source=source)
    for i, row in enumerate(rows):
        # (datasets gives a row that lacks a column present in other rows that column as None)
        if not isinstance(row, dict) or row.get(cfg.prompt_field) is None:
            found = ", ".join(k for k, v in row.items() if v is not None) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"missing prompt field (found: {found})", source=source, row=i, field=cfg.prompt_field)
        prompt = row[cfg.prompt_field]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError("empty prompt", source=source, row=i, field=cfg.prompt_field)
            text, ids = prompt, tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                         for m in prompt):
            try:
                text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            except Exception as e:
                raise DataError(f"chat template failed: {e}", source=source, row=i, field=cfg.prompt_field) from None
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            raise DataError(f"expected a string or a list of chat messages, got {type(prompt).__name__}",
                            source=source, row=i, field=cfg.prompt_field)
        if len(ids) > cfg.max_prompt_length:
            ids = ids[-cfg.max_prompt_length:]
        out.prompts.append({"prompt_ids": ids, "prompt_text": text, "row": row})
    if not out.prompts:
        raise DataError("no prompts", source=source)
    return out
