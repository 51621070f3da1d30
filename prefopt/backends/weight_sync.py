"""Weight transport from the policy learners to the rollout engines.

Two transports, selected by ``roles.rollout.weight_sync``:

* ``object_store``: learner rank 0 returns its named tensors as numpy views (:func:`to_wire`: pickled
  out of band, so the one copy is the object store's own); every engine reads them from the store
  without a copy (:func:`from_wire`) and loads them into its own weights.
* ``process_group``: learner rank 0 and the engines form a *stateless* process group of their own
  (gloo on CPU, NCCL on GPU) next to the learners' training group and to vLLM's internal group,
  and rank 0 broadcasts each tensor; engines receive into preallocated buffers. The tensor names,
  shapes and dtypes travel once through Ray when the group is built.

Neither writes a checkpoint to disk.
"""
from __future__ import annotations

from datetime import timedelta

import torch


def to_wire(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, object, str]]:
    """``(name, numpy view, dtype)`` per CPU tensor, no copy: Ray pickles numpy arrays out of band
    (straight into the object store), torch tensors in band (one more copy of every weight). 16-bit floats
    travel as int16 views (numpy has no bfloat16)."""
    out = []
    for name, t in named:
        t = t.detach().contiguous()
        view = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
        out.append((name, view.numpy(), str(t.dtype).removeprefix("torch.")))
    return out


def from_wire(wire: list[tuple[str, object, str]]) -> list[tuple[str, torch.Tensor]]:
    """:func:`to_wire`'s tensors, back as torch tensors over the same (read-only, object-store) memory:
    for loading, which copies them into the engine's own weights."""
    import warnings
    out = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")     # read only: we never write them
        for name, array, dtype in wire:
            t = torch.from_numpy(array)
            out.append((name, t.view(getattr(torch, dtype)) if dtype in ("bfloat16", "float16") else t))
    return out


class StatelessGroup:
    """A process group that does not touch torch.distributed's default (global) group."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, timeout_s: float = 600.0):
        import torch.distributed as dist

        from prefopt.backends.distributed import make_store

        timeout = timedelta(seconds=timeout_s)
        self.store = make_store(host, port, rank, world_size, timeout_s=timeout_s)
        self.rank, self.world_size = rank, world_size
        if torch.cuda.is_available():
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
            self.device = torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        from torch.distributed import BroadcastOptions
        opts = BroadcastOptions()
        opts.rootRank = root
        self.pg.broadcast([tensor], opts).wait()
        return tensor


def broadcast_weights(group: StatelessGroup, named: list[tuple[str, torch.Tensor]]) -> None:
    """Sender side (rank 0): broadcast every tensor, in order."""
    for _, tensor in named:
        group.broadcast(tensor.detach().to(group.device).contiguous())


def receive_weights(group: StatelessGroup, specs) -> list[tuple[str, torch.Tensor]]:
    """Receiver side: one buffer per spec, filled by rank 0's broadcasts."""
    out = []
    for name, shape, dtype in specs:
        buf = torch.empty(shape, dtype=getattr(torch, dtype), device=group.device)
        group.broadcast(buf)
        out.append((name, buf))
    return out
