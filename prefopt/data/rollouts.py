"""Collate rollout samples (prompt + sampled response + per-token training signals).

A sample is a dict ``{"prompt_ids", "response_ids", <per-token lists>}`` where each per-token list
(``old_logps``, ``ref_logps``, ``values``, ``advantages``, ``returns``) has one value per response
token. Collated per-token tensors are ``[N, L - 1]`` and *aligned with next-token prediction*:
index ``t - 1`` holds the value for the token at position ``t`` — the same layout as
``PolicyOutput.token_logps`` — so objectives combine them elementwise under ``token_mask``.
"""
from __future__ import annotations

import torch

PER_TOKEN_KEYS = ("old_logps", "ref_logps", "values", "advantages", "returns", "token_rewards")


def collate_rollouts(samples: list[dict], *, pad_id: int) -> dict[str, torch.Tensor]:
    rows = [list(s["prompt_ids"]) + list(s["response_ids"]) for s in samples]
    prompt_lengths = [len(s["prompt_ids"]) for s in samples]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    loss_mask = torch.tensor([[False] * p + [True] * (len(row) - p) + [False] * (width - len(row))
                              for p, row in zip(prompt_lengths, rows)], dtype=torch.bool)
    present = [k for k in PER_TOKEN_KEYS if all(k in s for s in samples)]
    per_token = {}
    for k in present:
        # a multi-head critic's values / returns carry a list per token: [N, L-1, H]
        heads = len(samples[0][k][0]) if samples[0][k] and isinstance(samples[0][k][0], list) else None
        zero = [0.0] * heads if heads else 0.0
        for i, s in enumerate(samples):
            if len(s[k]) != len(s["response_ids"]):
                raise ValueError(f"rollout sample {i}: {len(s[k])} '{k}' values for {len(s['response_ids'])} "
                                 f"response tokens")
        per_token[k] = torch.tensor([[zero] * (p - 1) + list(s[k]) + [zero] * (width - p - len(s[k]))
                                     for p, s in zip(prompt_lengths, samples)], dtype=torch.float64)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
             "token_mask": loss_mask[:, 1:].clone()}
    batch.update(per_token)
    return batch


def response_values(token_values: torch.Tensor, samples: list[dict]) -> list[list[float]]:
    """Inverse of the alignment above: ``[N, L-1(, H)]`` per-token values -> per sample, one per
    response token (a list of H for a multi-head critic)."""
    out = []
    for i, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        out.append(token_values[i, p - 1:p - 1 + r].tolist())
    return out
