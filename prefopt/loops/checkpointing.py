"""Saving and restoring a run's checkpoint from the driver (both loops).

The learner groups write their DeepSpeed checkpoints (model, optimizer, scheduler, RNG) into the
temporary checkpoint directory themselves; the driver adds ``state.json`` with the state of the
objects in ``driver_state`` (anything with ``state_dict`` / ``load_state_dict``: data position,
reward normaliser, multipliers) and plain values in ``extra``; then the directory is renamed into
place (``prefopt.io.checkpoint``).
"""
from __future__ import annotations

from pathlib import Path


def learner_groups(roles) -> list[tuple[str, object]]:
    """The checkpointed learner groups of a run's roles: the policy (and the critic)."""
    policy = getattr(roles, "policy", None) or roles.learners
    critic = getattr(roles, "critic", None)
    return [("policy", policy)] + ([("critic", critic)] if critic is not None else [])


def save(run_dir: Path, name: str, counter: int, roles, driver_state: dict, keep: int, *, tokenizer=None,
         describe=None, **extra) -> Path:
    """With ``tokenizer``, the checkpoint also holds ``hf/``: the policy in HF format (safetensors), then
    ``describe(hf_dir)`` (e.g. a reward model's serving metadata)."""
    from prefopt.io import checkpoint
    tmp = checkpoint.begin(run_dir, name)
    for group_name, group in learner_groups(roles):
        group.call("save_checkpoint", [(str(tmp / group_name),)] * len(group), what=f"{group_name} checkpoint")
    if tokenizer is not None:
        policy = learner_groups(roles)[0][1]
        policy.call("save_model", [(str(tmp / "hf"),)] * len(policy), what="checkpoint HF export")
        tokenizer.save_pretrained(str(tmp / "hf"))
        if describe is not None:
            describe(tmp / "hf")
    state = {"counter": counter, **extra,
             **{k: v.state_dict() for k, v in driver_state.items() if v is not None}}
    return checkpoint.commit(tmp, state, keep)


def restore(ckpt: Path, roles, driver_state: dict) -> dict:
    """Load the learner groups and the driver objects from ``ckpt``; returns its ``state.json``."""
    from prefopt.io import checkpoint
    state = checkpoint.read_state(ckpt)
    for group_name, group in learner_groups(roles):
        group.call("load_checkpoint", [(str(Path(ckpt) / group_name),)] * len(group),
                   what=f"{group_name} checkpoint load")
    for key, obj in driver_state.items():
        if obj is not None and (key in state or not getattr(obj, "optional_state", False)):
            obj.load_state_dict(state[key])
    return state


def history(run_dir: Path, split: str, counter_key: str) -> list[dict]:
    """The records of one split already logged (after ``truncate_metrics``), as in-memory history."""
    from prefopt.io.run_dir import read_metrics
    return [{counter_key: rec["step"], **{k: v for k, v in rec.items() if k not in ("step", "split")}}
            for rec in read_metrics(run_dir, split)]


class StopRequest:
    """SIGTERM / SIGINT (Ctrl-C) during a run: finish the current step, checkpoint, exit cleanly.

    Used as a context manager around the training loop (main thread only; elsewhere it is inert).
    The first signal sets ``requested``; the loop checks it between steps. A second signal gets the
    previous handler (Ctrl-C twice interrupts at once).
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal
        self.requested = signal.Signals(signum).name
        for sig, handler in self._previous.items():   # a second signal acts at once
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Checkpointer:
    """One run's checkpoint policy (``output.checkpoint_every`` / ``keep_checkpoints`` /
    ``checkpoint_hf``) bound to its run directory, roles and driver state."""

    def __init__(self, run_dir: Path, roles, output_cfg, *, driver_state: dict | None = None, tokenizer=None,
                 describe=None):
        self.run_dir, self.roles, self.driver_state, self.describe = run_dir, roles, driver_state or {}, describe
        self.every, self.keep = output_cfg.checkpoint_every, output_cfg.keep_checkpoints
        self.tokenizer = tokenizer if output_cfg.checkpoint_hf else None

    def due(self, counter: int, last: int) -> bool:
        return self.every > 0 and (counter % self.every == 0 or counter == last)

    def save(self, name: str, counter: int, **extra) -> Path:
        return save(self.run_dir, name, counter, self.roles, self.driver_state, self.keep,
                    tokenizer=self.tokenizer, describe=self.describe, **extra)

    def stop_now(self, stop: StopRequest, name: str, counter: int, **extra):
        """Checkpoint and raise :class:`prefopt.errors.RunInterrupted` (the caller's ``finally``
        frees the actors)."""
        from prefopt.errors import RunInterrupted
        path = self.save(name, counter, **extra)
        raise RunInterrupted(f"stopped by {stop.requested} after {name}; checkpoint {path}; continue with "
                             f"`resume=auto` (or resume={path})")
