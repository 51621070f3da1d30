"""The batch in flight of ``train.async_rollouts``: prompts whose generation (and pipelined reference
pass) was started one iteration early, and its part in checkpoints.

A checkpoint taken after iteration i waits for iteration i+1's generation and saves it (prompt rows,
token ids, engine log-probs) in ``state.json``: those samples came from the weights before update i,
which the resumed run no longer has, so they cannot be drawn again. The resumed run uses them as
iteration i+1's batch, exactly as the uninterrupted run did (its reference pass is recomputed).
"""
from __future__ import annotations


class Prefetch:
    optional_state = True     # a checkpoint of a synchronous run has none: nothing in flight

    def __init__(self, roles):
        self.roles = roles
        self.entries: dict[int, dict] = {}

    def put(self, iteration: int, prompts: list[dict], pending, pending_ref) -> None:
        self.entries[iteration] = {"prompts": prompts, "pending": pending, "pending_ref": pending_ref,
                                   "generations": None}

    def pop(self, iteration: int) -> dict | None:
        """The entry of ``iteration`` (``prompts``, and ``generations`` or ``pending``), or None."""
        return self.entries.pop(iteration, None)

    def state_dict(self) -> dict:
        """Waits for the generations still in flight (their reference passes are dropped)."""
        out = {}
        for it, entry in self.entries.items():
            if entry["generations"] is None:
                entry["generations"] = self.roles.collect_generate(entry["pending"])
                entry["pending"] = entry["pending_ref"] = None
            out[str(it)] = {"prompts": entry["prompts"], "generations": entry["generations"]}
        return out

    def load_state_dict(self, state: dict | None) -> None:
        self.entries = {int(it): {"prompts": e["prompts"], "generations": e["generations"], "pending": None,
                                  "pending_ref": None} for it, e in (state or {}).items()}
