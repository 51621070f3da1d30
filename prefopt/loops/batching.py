"""How examples are split into global batches, learner shards and micro-batches.

Every learner must run the same number of forwards in a collective call (ZeRO-3 gathers
parameters inside each forward), so shards are padded with *dummy* micro-batches whose results
are dropped.
"""
from __future__ import annotations

import random


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_examples))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def step_batches(num_examples: int, batch_size: int, *, seed: int, epochs: int,
                 max_steps: int = -1) -> list[list[int]]:
    """Indices of each optimizer step's global batch (the incomplete last batch is dropped)."""
    steps = []
    for epoch in range(epochs):
        order = epoch_order(num_examples, seed, epoch)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            steps.append(order[start:start + batch_size])
            if 0 < max_steps <= len(steps):
                return steps
    return steps


def example_length(example: dict) -> int:
    """Padded row length an example needs: prompt plus its longest response."""
    responses = example.get("response_ids") or [[]]
    if responses and isinstance(responses[0], int):   # a rollout sample: one response
        return len(example["prompt_ids"]) + len(responses)
    return len(example["prompt_ids"]) + max(len(r) for r in responses)


def split_for_learners(batch: list, num_learners: int, micro_batch_size: int, *,
                       sort_by_length: bool = False) -> list[list[list]]:
    """A global batch -> per learner, a list of micro-batches (equal sizes).

    With ``sort_by_length`` the batch is ordered longest first and dealt round-robin, so each
    micro-batch holds rows of similar length (less padding; measured -8% tokens on variable-length
    data) and the learners get balanced work. Only valid for losses that are a mean over examples
    (the offline objectives): then the grouping does not change the step.
    """
    if sort_by_length:
        ordered = sorted(batch, key=example_length, reverse=True)
        shards = [ordered[r::num_learners][:len(batch) // num_learners] for r in range(num_learners)]
    else:
        per = len(batch) // num_learners
        shards = [batch[r * per:(r + 1) * per] for r in range(num_learners)]
    return [[s[i:i + micro_batch_size] for i in range(0, len(s), micro_batch_size)] for s in shards]


def shard_for_inference(items: list, num_learners: int, micro_batch_size: int):
    """Split ``items`` (any length) over learners for a no-grad pass.

    Returns ``(plan, keep)``: ``plan[r]`` is learner r's micro-batches, all learners with the same
    count; ``keep[r][m]`` is False for a dummy micro-batch whose results must be dropped. Results
    read back in learner order then micro-batch order restore the order of ``items``.
    """
    per = -(-len(items) // num_learners)
    shards = [items[r * per:(r + 1) * per] for r in range(num_learners)]
    plan = [[s[i:i + micro_batch_size] for i in range(0, len(s), micro_batch_size)] for s in shards]
    most = max(len(p) for p in plan)
    keep = [[True] * len(p) + [False] * (most - len(p)) for p in plan]
    filler = [items[:micro_batch_size]]
    plan = [p + filler * (most - len(p)) for p in plan]
    return plan, keep


def split_rows(values, examples: list[dict]) -> list[list[float]]:
    """Per-row values of a collated micro-batch -> per example, its responses' values in order.

    Rows are ordered as ``collate_examples`` builds them: pairs as a chosen block then a rejected
    block; lists row-major.
    """
    values = [float(v) for v in values]
    if examples and examples[0].get("kind", "pairs") == "pairs":
        b = len(examples)
        return [[values[i], values[b + i]] for i in range(b)]
    out, pos = [], 0
    for ex in examples:
        k = len(ex["response_ids"])
        out.append(values[pos:pos + k])
        pos += k
    return out
