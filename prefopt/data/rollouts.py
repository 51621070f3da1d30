"""Rollout samples: what each stage of an online iteration adds to a sampled response, and their
collation for the learners.

A :class:`RolloutSample` is filled in stage by stage (generate → score → annotate → advantages);
its per-token fields hold one value per response token. Collated per-token tensors are
``[N, L - 1]`` and *aligned with next-token prediction*: index ``t - 1`` holds the value for the
token at position ``t`` — the same layout as ``PolicyOutput.token_logps`` — so objectives combine
them elementwise under ``token_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PER_TOKEN_KEYS = ("old_logps", "ref_logps", "values", "advantages", "returns")


@dataclass
class RolloutSample:
    """One sampled response. Shapes: ``P`` prompt tokens, ``T`` response tokens, ``H`` critic heads
    (constrained PPO: one per reward channel)."""
    prompt_ids: list[int]                            # [P]       generate
    response_ids: list[int]                          # [T]       generate (eos when the engine gave none)
    prompt_text: str = ""                            #           the prompt as the reward functions see it
    row: dict = field(default_factory=dict)          #           the prompt row's fields
    rollout_logps: list[float] | None = None         # [T]       the engine's log-probs of the sampled tokens
    reward: float | None = None                      #           score: the (clipped / normalised) sequence reward
    task_reward: float | None = None                 #           score: the sources' weighted sum, before any shaping
    reward_components: dict[str, float] = field(default_factory=dict)   # score: each source's raw value
    process_rewards: list[float] | None = None       # [T]       score: refined step rewards at step-end tokens
    ref_logps: list[float] | None = None             # [T]       annotate: the reference's log-probs
    old_logps: list[float] | None = None             # [T]       annotate: the policy's, before the update
    values: list | None = None                       # [T]/[T,H] annotate: the critic's values (GAE)
    advantages: list[float] | None = None            # [T]       advantages
    returns: list | None = None                      # [T]/[T,H] advantages: the critic's targets (GAE)


def collate_rollouts(samples: list[RolloutSample], *, pad_id: int) -> dict:
    import torch

    rows = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    prompt_lengths = [len(s.prompt_ids) for s in samples]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    loss_mask = torch.tensor([[False] * p + [True] * (len(row) - p) + [False] * (width - len(row))
                              for p, row in zip(prompt_lengths, rows)], dtype=torch.bool)
    present = [k for k in PER_TOKEN_KEYS if all(getattr(s, k) is not None for s in samples)]
    per_token = {}
    for k in present:
        columns = [getattr(s, k) for s in samples]
        # a multi-head critic's values / returns carry a list per token: [N, L-1, H]
        heads = len(columns[0][0]) if columns[0] and isinstance(columns[0][0], list) else None
        zero = [0.0] * heads if heads else 0.0
        for i, (s, col) in enumerate(zip(samples, columns)):
            if len(col) != len(s.response_ids):
                raise ValueError(f"rollout sample {i}: {len(col)} '{k}' values for {len(s.response_ids)} "
                                 f"response tokens")
        per_token[k] = torch.tensor([[zero] * (p - 1) + list(col) + [zero] * (width - p - len(col))
                                     for p, col in zip(prompt_lengths, columns)], dtype=torch.float64)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
             "token_mask": loss_mask[:, 1:].clone()}
    batch.update(per_token)
    return batch


def response_values(token_values, samples: list[RolloutSample]) -> list[list[float]]:
    """Inverse of the alignment above: ``[N, L-1(, H)]`` per-token values -> per sample, one per
    response token (a list of H for a multi-head critic)."""
    out = []
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        out.append(token_values[i, p - 1:p - 1 + r].tolist())
    return out
