"""Pieces shared by the roles that run the policy or a frozen copy of it."""
from __future__ import annotations


def collate_to(examples: list[dict], pad_id: int, device):
    from prefopt.data.collate import collate_examples

    batch = collate_examples(examples, pad_id=pad_id, kind=examples[0].get("kind", "pairs"))
    return {k: v.to(device) for k, v in batch.items()}


def response_logps(model, micro_batches: list[list[dict]], pad_id: int, device) -> list[list[list[float]]]:
    """No-grad summed response log-probs: per micro-batch, per example, per response."""
    import torch

    from prefopt.loops.batching import split_rows
    from prefopt.models.logprobs import forward_logps

    out = []
    with torch.no_grad():
        for examples in micro_batches:
            policy = forward_logps(model, collate_to(examples, pad_id, device))
            out.append(split_rows(policy.logps.double().cpu(), examples))
    return out
