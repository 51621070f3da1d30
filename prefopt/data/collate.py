"""Collate tokenized preference examples into padded micro-batch tensors.

One tensor row per response, prompt + response, right-padded to the longest row of the
micro-batch. Row order (what the objectives expect, see :mod:`prefopt.objectives.base`):

* pairs: ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]`` (one concatenated forward);
* lists: the responses of each example in order, example after example (row-major over the
  valid slots of ``slot_mask``);
* sft: one response per example, in order.

``loss_mask[i, t]`` is True when token ``t`` of row ``i`` is a response token (the learner scores
token ``t`` with the logits at ``t - 1``, so position 0 is never True).
"""
from __future__ import annotations

import torch

KINDS = ("pairs", "lists", "sft")


def collate_examples(examples: list, *, pad_id: int, kind: str) -> dict[str, torch.Tensor]:
    """Tensors of a micro-batch of ``B`` examples with ``N`` response rows in total.

    ``input_ids`` / ``attention_mask`` ``[N, L]`` long, ``loss_mask`` ``[N, L]`` bool,
    ``scores`` ``[B, K]`` float (0 on padded slots), ``slot_mask`` ``[B, K]`` bool, and
    ``ref_logps`` ``[N]`` float64 when every example carries its ``ref_logps``. Pairs with a margin or a
    weight (see :class:`prefopt.data.examples.Example`) add ``margin`` ``[B]`` (0 where a pair has
    none) or ``weight`` ``[B]`` (1 where a pair has none), when some example of the micro-batch has one;
    reward-model examples add ``targets`` / ``target_mask`` ``[N, A]`` (one response per example); ``step_positions``
    ``[N, S]`` (index in the row of each step's last token, -1 on padded steps), ``step_labels`` and
    ``step_mask`` ``[N, S]``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown batch kind '{kind}' (expected one of {KINDS})")
    if not examples:
        raise ValueError("cannot collate an empty micro-batch")
    if pad_id is None:
        raise ValueError("pad_id is None (set the tokenizer's pad token)")
    if kind == "pairs":
        for ex in examples:
            if len(ex.response_ids) != 2:
                raise ValueError(f"a pairs example has 2 responses, row {ex.row} has {len(ex.response_ids)}")
        slots = [(b, k) for k in range(2) for b in range(len(examples))]
    else:
        slots = [(b, k) for b, ex in enumerate(examples) for k in range(len(ex.response_ids))]

    rows = [list(examples[b].prompt_ids) + list(examples[b].response_ids[k]) for b, k in slots]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    prompt_lengths = [len(examples[b].prompt_ids) for b, _ in slots]
    loss_mask = torch.tensor([[False] * p + [True] * (len(row) - p) + [False] * (width - len(row))
                              for p, row in zip(prompt_lengths, rows)], dtype=torch.bool)

    num_slots = max(len(ex.response_ids) for ex in examples)
    for ex in examples:
        if len(ex.scores) != len(ex.response_ids):
            raise ValueError(f"row {ex.row}: {len(ex.scores)} scores for {len(ex.response_ids)} responses")
    scores = torch.tensor([list(ex.scores) + [0.0] * (num_slots - len(ex.scores)) for ex in examples],
                          dtype=torch.float32)
    slot_mask = torch.tensor([[True] * len(ex.response_ids) + [False] * (num_slots - len(ex.response_ids))
                              for ex in examples], dtype=torch.bool)

    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
             "scores": scores, "slot_mask": slot_mask}
    if all(ex.ref_logps is not None for ex in examples):
        for ex in examples:
            if len(ex.ref_logps) != len(ex.response_ids):
                raise ValueError(f"row {ex.row}: {len(ex.ref_logps)} ref_logps for {len(ex.response_ids)} responses")
        batch["ref_logps"] = torch.tensor([float(examples[b].ref_logps[k]) for b, k in slots],
                                          dtype=torch.float64)
    batch.update(_reward_fields(examples, kind))
    return batch


def _reward_fields(examples: list, kind: str) -> dict[str, torch.Tensor]:
    out = {}
    if any(ex.margin is not None for ex in examples):
        out["margin"] = torch.tensor([ex.margin or 0.0 for ex in examples], dtype=torch.float32)
    if any(ex.weight is not None for ex in examples):
        out["weight"] = torch.tensor([1.0 if ex.weight is None else ex.weight for ex in examples],
                                     dtype=torch.float32)
    if examples[0].targets is not None:
        if kind != "sft":
            raise ValueError("examples with attribute targets collate one response per example (kind 'sft')")
        targets = torch.tensor([ex.targets for ex in examples], dtype=torch.float32)
        out["target_mask"] = ~torch.isnan(targets)
        out["targets"] = torch.nan_to_num(targets)
    if examples[0].step_ends is not None:
        if kind != "sft":
            raise ValueError("examples with step labels collate one response per example (kind 'sft')")
        width = max(len(ex.step_ends) for ex in examples)
        pad = [width - len(ex.step_ends) for ex in examples]
        out["step_positions"] = torch.tensor([[len(ex.prompt_ids) + e for e in ex.step_ends] + [-1] * p
                                              for ex, p in zip(examples, pad)], dtype=torch.long)
        out["step_labels"] = torch.tensor([list(ex.step_labels) + [0.0] * p for ex, p in zip(examples, pad)],
                                          dtype=torch.float32)
        out["step_mask"] = out["step_positions"] >= 0
    return out


def count_tokens(examples: list) -> int:
    """Non-pad tokens of the collated micro-batch (the prompt counts once per response row)."""
    return sum(len(ex.prompt_ids) * len(ex.response_ids) + sum(len(r) for r in ex.response_ids)
               for ex in examples)


def make_micro_batches(examples: list, micro_batch_size: int) -> list[list]:
    """Consecutive chunks of ``micro_batch_size`` examples (the last one may be smaller)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 (got {micro_batch_size})")
    return [examples[i:i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)]
