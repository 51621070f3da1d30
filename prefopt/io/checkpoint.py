"""Run checkpoints: atomic directories under ``<run_dir>/checkpoints/``, the last K kept.

Layout of one checkpoint (``iter_000010`` / ``step_000010``)::

    state.json          driver state: counters, data position, RNG, reward statistics, multipliers
    policy/ds/...       DeepSpeed checkpoint of the policy learners (model, optimizer, scheduler, RNG)
    critic/ds/...       the same for the critic, if any
    hf/                 the policy in HF format (safetensors + tokenizer), with output.checkpoint_hf

A checkpoint is written into ``.tmp-<name>`` and renamed when complete (``state.json`` last), so a
crash mid-save leaves the previous checkpoint untouched and at most a ``.tmp-*`` directory, which
the next save or resume removes. Learners write their shards themselves, so on a multi-node
cluster ``output.root`` must be on storage every node sees.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prefopt.errors import ConfigError

STATE = "state.json"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if not p.name.startswith(".") and (p / STATE).is_file()]
    return sorted(done, key=lambda p: json.loads((p / STATE).read_text())["counter"])


def remove_stale(run_dir: Path) -> None:
    """Remove what an interrupted save left (``.tmp-*`` directories)."""
    for stale in checkpoints_dir(run_dir).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def begin(run_dir: Path, name: str) -> Path:
    """A fresh temporary directory for checkpoint ``name`` (stale temporaries are removed)."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(run_dir)
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, state: dict, keep_last: int) -> Path:
    """Write ``state.json`` into ``tmp``, rename it into place, drop checkpoints beyond the last K."""
    state_path = tmp / STATE
    with open(state_path.with_suffix(".part"), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(state_path.with_suffix(".part"), state_path)
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in list_checkpoints(tmp.parent.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE).read_text())


def find_resume_point(resume: str, output_root: str, name: str) -> tuple[Path, Path]:
    """``resume``: "auto" (the newest run of this recipe name under ``output_root`` that has a
    checkpoint), a run directory, or one checkpoint directory -> ``(run_dir, checkpoint)``."""
    run_dir, ckpt = _resume_point(resume, output_root, name)
    remove_stale(run_dir)
    return run_dir, ckpt


def _resume_point(resume: str, output_root: str, name: str) -> tuple[Path, Path]:
    if resume == "auto":
        root = Path(output_root)
        runs = sorted((p for p in root.glob(f"{name}-*") if p.is_dir() and list_checkpoints(p)),
                      key=lambda p: list_checkpoints(p)[-1].stat().st_mtime) if root.is_dir() else []
        if not runs:
            raise ConfigError(f"resume=auto: no run of '{name}' with a checkpoint under {root.resolve()}")
        return runs[-1].resolve(), list_checkpoints(runs[-1])[-1].resolve()
    path = Path(resume)
    if (path / STATE).is_file():
        return path.parent.parent.resolve(), path.resolve()
    found = list_checkpoints(path)
    if not found:
        raise ConfigError(f"resume={resume}: not a checkpoint directory, nor a run directory with a "
                          f"complete checkpoint under {checkpoints_dir(path)}")
    return path.resolve(), found[-1].resolve()


def prepare_resume(resume: str, output_root: str, name: str) -> tuple[Path, Path]:
    """The run directory and checkpoint to continue (``find_resume_point``), with the run's metrics
    cut back to the checkpoint (``truncate_metrics``)."""
    run_dir, ckpt = find_resume_point(resume, output_root, name)
    truncate_metrics(run_dir, read_state(ckpt)["counter"])
    return run_dir, ckpt


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume: keep the metrics up to the checkpoint; later records move to a side file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    keep, later = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            (keep if json.loads(line)["step"] <= last_step else later).append(line)
    if later:
        with open(Path(run_dir) / "metrics.after-checkpoint.jsonl", "a") as f:
            f.write("\n".join(later) + "\n")
    path.write_text("".join(line + "\n" for line in keep))
