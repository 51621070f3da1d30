"""Pieces shared by the roles that run the policy or a frozen copy of it."""
from __future__ import annotations


def actor_info(role: str) -> dict:
    """Where this actor runs: what ``placement.json`` records for every actor of a run."""
    import os

    from prefopt.backends.distributed import node_id, node_ip, placement_group_id
    return {"role": role, "pid": os.getpid(), "node_ip": node_ip(), "node_id": node_id(),
            "placement_group": placement_group_id()}


def use_actor_cpus(num_cpus: float, ray_env: dict) -> int:
    """Run torch with one intra-op thread per logical CPU Ray reserved for this actor.

    Worker processes start with ``OMP_NUM_THREADS=1`` (so that co-scheduled actors never
    oversubscribe the cores); an actor that reserved more CPUs uses them. An explicit
    ``ray.env.OMP_NUM_THREADS`` in the recipe wins.
    """
    import torch
    threads = int(ray_env.get("OMP_NUM_THREADS") or max(1, int(num_cpus)))
    torch.set_num_threads(threads)
    return threads


def collate_to(examples: list, pad_id: int, device, kind: str):
    """Collate a micro-batch of the objective's batch ``kind`` (pairs, lists, sft examples or rollout
    samples) and move it to ``device``."""
    if kind == "rollouts":
        from prefopt.data.rollouts import collate_rollouts
        batch = collate_rollouts(examples, pad_id=pad_id)
    else:
        from prefopt.data.collate import collate_examples
        batch = collate_examples(examples, pad_id=pad_id, kind=kind)
    return {k: v.to(device) for k, v in batch.items()}


def sample_token_logps(model, micro_batches: list[list[dict]], pad_id: int, device,
                temperature: float = 1.0, packing: str | None = None) -> list[list[list[float]]]:
    """No-grad per-token log-probs of each rollout sample's response tokens."""
    import torch

    from prefopt.data.rollouts import response_values
    from prefopt.models.logprobs import forward_logps

    out = []
    with torch.no_grad():
        for samples in micro_batches:
            policy = forward_logps(model, collate_to(samples, pad_id, device, "rollouts"), temperature,
                                   packing=packing)
            out.append(response_values(policy.token_logps.double().cpu(), samples))
    return out


def response_logps(model, micro_batches: list[list[dict]], pad_id: int, device, kind: str,
                   packing: str | None = None) -> list[list[list[float]]]:
    """No-grad summed response log-probs: per micro-batch, per example, per response."""
    import torch

    from prefopt.data.batching import split_rows
    from prefopt.models.logprobs import forward_logps

    out = []
    with torch.no_grad():
        for examples in micro_batches:
            policy = forward_logps(model, collate_to(examples, pad_id, device, kind), packing=packing)
            out.append(split_rows(policy.logps.double().cpu(), examples, kind))
    return out
