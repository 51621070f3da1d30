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

A checkpoint whose ``state.json`` cannot be read, is not valid JSON or has no integer ``counter``
(e.g. truncated by a full disk) is not intact: :func:`list_checkpoints` skips it with a warning, so
``resume=auto`` / ``resume=<run dir>`` continue from the newest intact one, and naming it explicitly
(``resume=<checkpoint dir>``) is a :class:`ConfigError`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from prefopt.errors import ConfigError

STATE = "state.json"
log = logging.getLogger("prefopt")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Intact checkpoints of a run, oldest first (each ``state.json`` is read once). Checkpoints
    whose ``state.json`` is unreadable, invalid or lacks ``counter`` are skipped with a warning."""
    intact, broken = _scan(run_dir)
    for ckpt, problem in broken:
        log.warning("checkpoint %s is not intact and is skipped: %s %s", ckpt, ckpt / STATE, problem)
    return intact


def _scan(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(intact checkpoints oldest first, [(broken checkpoint, what is wrong)])``."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return [], []
    intact, broken = [], []
    for p in root.iterdir():
        if p.name.startswith(".") or not (p / STATE).is_file():
            continue
        state, problem = _load_state(p)
        if problem is None:
            intact.append((state["counter"], p.name, p))
        else:
            broken.append((p, problem))
    return [p for _, _, p in sorted(intact)], sorted(broken)


def _load_state(checkpoint: Path) -> tuple[dict | None, str | None]:
    """``(state, None)`` or ``(None, what is wrong with state.json)``."""
    try:
        text = (Path(checkpoint) / STATE).read_bytes()
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    if not text.strip():
        return None, "is empty"
    try:
        state = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except ValueError as e:
        return None, f"is not valid JSON ({e})"
    if not isinstance(state, dict):
        return None, "is not a JSON object"
    if not isinstance(state.get("counter"), int) or isinstance(state["counter"], bool):
        return None, "has no integer 'counter'"
    return state, None


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
    """A checkpoint's ``state.json``; :class:`ConfigError` naming the file if it is not intact."""
    state, problem = _load_state(checkpoint)
    if problem is not None:
        raise ConfigError(_not_intact(Path(checkpoint), problem))
    return state


def _not_intact(checkpoint: Path, problem: str) -> str:
    run_dir = checkpoint.parent.parent
    intact = _scan(run_dir)[0] if checkpoint.parent.name == "checkpoints" else []
    hint = (f"intact checkpoints of this run: {', '.join(str(p) for p in intact)} (resume={run_dir} continues "
            f"from the newest)" if intact else "this run has no other intact checkpoint")
    return f"checkpoint {checkpoint} is not intact: {checkpoint / STATE} {problem}; {hint}"


def find_resume_point(resume: str, output_root: str, name: str) -> tuple[Path, Path]:
    """``resume``: "auto" (the newest run of this recipe name under ``output_root`` that has a
    checkpoint), a run directory, or one checkpoint directory -> ``(run_dir, checkpoint)``."""
    run_dir, ckpt = _resume_point(resume, output_root, name)
    remove_stale(run_dir)
    return run_dir, ckpt


def _resume_point(resume: str, output_root: str, name: str) -> tuple[Path, Path]:
    if resume == "auto":
        root = Path(output_root)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"resume=auto: output.root '{root}' is a file, not a folder")
        newest = []    # (mtime of the run's newest intact checkpoint, run dir, checkpoint)
        for run in sorted(root.glob(f"{name}-*")) if root.is_dir() else []:
            found = list_checkpoints(run) if run.is_dir() else []
            if found:
                newest.append((found[-1].stat().st_mtime, run, found[-1]))
        if not newest:
            raise ConfigError(f"resume=auto: no run of '{name}' with an intact checkpoint under {root.resolve()}")
        _, run, ckpt = max(newest, key=lambda t: (t[0], t[1].name))
        return run.resolve(), ckpt.resolve()
    path = Path(resume)
    if (path / STATE).is_file():
        read_state(path)    # ConfigError naming the file (and the intact checkpoints) if it is not intact
        return path.parent.parent.resolve(), path.resolve()
    intact, broken = _scan(path)
    for ckpt, problem in broken:
        log.warning("checkpoint %s is not intact and is skipped: %s %s", ckpt, ckpt / STATE, problem)
    if not intact:
        bad = (f" ({'; '.join(f'{c / STATE} {problem}' for c, problem in broken)})" if broken else "")
        raise ConfigError(f"resume={resume}: not a checkpoint directory, nor a run directory with an intact "
                          f"checkpoint under {checkpoints_dir(path)}{bad}")
    return path.resolve(), intact[-1].resolve()


def cut_to_checkpoint(run_dir: Path, ckpt: Path) -> None:
    """Before a run continues from ``ckpt`` (found by ``find_resume_point``): its metrics are cut back
    to the checkpoint (``truncate_metrics``)."""
    counter = read_state(ckpt)["counter"]
    truncate_metrics(run_dir, counter)
    truncate_samples(run_dir, counter)


def truncate_samples(run_dir: Path, last_step: int) -> None:
    """On resume: keep the logged samples (``samples.jsonl``, ``train.sample_log_every``) up to the
    checkpoint; later ones (and a torn last line) move to ``samples.after-checkpoint.jsonl``, so the
    resumed run does not log the same iterations twice."""
    import json
    path = Path(run_dir) / "samples.jsonl"
    if not path.exists():
        return
    keep, later = [], []
    for raw in path.read_bytes().splitlines():
        try:
            step = json.loads(raw)["step"]
        except (ValueError, KeyError, TypeError):
            step = None
        (keep if step is not None and step <= last_step else later).append(raw)
    if not later:
        return
    with open(path.with_name("samples.after-checkpoint.jsonl"), "ab") as f:
        f.write(b"".join(raw + b"\n" for raw in later))
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(b"".join(raw + b"\n" for raw in keep))
    os.replace(tmp, path)


def truncate_metrics(run_dir: Path, last_step: int) -> str | None:
    """On resume: keep the metrics up to the checkpoint; later records move to
    ``metrics.after-checkpoint.jsonl``. A torn last line (the run was killed while writing it) is
    dropped and its text appended to ``metrics.torn.txt``; that is logged as a warning and the message
    returned (else None). A broken line before the last is a :class:`DataError` naming the file and
    line (nothing is changed then)."""
    from prefopt.io.run_dir import parse_metrics, preview_line
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    lines, torn = parse_metrics(path)
    keep = [raw for raw, record in lines if record["step"] <= last_step]
    later = [raw for raw, record in lines if record["step"] > last_step]
    if later:
        with open(run_dir / "metrics.after-checkpoint.jsonl", "ab") as f:
            f.write(b"".join(raw + b"\n" for raw in later))
    message = None
    if torn is not None:
        side = run_dir / "metrics.torn.txt"
        with open(side, "ab") as f:
            f.write(torn[1] + b"\n")
        message = (f"{path}: dropped its torn last line {torn[0]} (the run was killed while writing it); its text "
                   f"is kept in {side}: {preview_line(torn[1])!r}")
        log.warning("%s", message)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:   # replaced atomically: a crash here never loses the metrics
        f.write(b"".join(raw + b"\n" for raw in keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return message
