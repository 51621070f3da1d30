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
    lengths = [len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples]
    n, width = len(samples), max(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    present = [k for k in PER_TOKEN_KEYS if all(k in s for s in samples)]
    # a multi-head critic's values / returns carry a list per token: [N, L-1, H]
    heads = {k: len(samples[0][k][0]) if samples[0][k] and isinstance(samples[0][k][0], list) else None
             for k in present}
    per_token = {k: torch.zeros((n, width - 1) + ((heads[k],) if heads[k] else ()), dtype=torch.float64)
                 for k in present}
    for i, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        input_ids[i, :p + r] = torch.tensor(list(s["prompt_ids"]) + list(s["response_ids"]))
        attention_mask[i, :p + r] = 1
        loss_mask[i, p:p + r] = True
        for k in present:
            per_token[k][i, p - 1:p - 1 + r] = torch.tensor(s[k], dtype=torch.float64)
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
