"""The run directory: resolved config, metrics (JSONL + experiment loggers), final model.

    runs/<name>-<timestamp>/
      .prefopt-run       marker: this folder was created by prefopt (JSON: name, creation time)
      config.yaml        the fully resolved recipe
      metrics.jsonl      one JSON object per logged step / evaluation
      samples.jsonl      sampled completions (online, train.sample_log_every), one per line with its step
      tensorboard/       TensorBoard event files (output.loggers, prefopt.io.loggers; also wandb/, mlflow/)
      model/             final policy in HF format (safetensors) + tokenizer
      summary.json       final numbers of the run

Nothing of the user's is ever overwritten: a run never writes into a directory that already holds
results (``metrics.jsonl``, ``model/`` or ``summary.json``), nor into an existing non-empty folder
that prefopt did not create (no ``.prefopt-run`` marker). An existing empty folder is fine: it gets
the marker; so is a marked folder whose run failed before its first result (at most an empty
``metrics.jsonl``): the run starts again in it. :func:`check_run_dir` is the pure check (for the
pre-flight, before Ray starts); :func:`create_run_dir` checks again and creates the folder and its
marker. A torn last line of ``metrics.jsonl`` (a run killed mid-write) is skipped when reading.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from prefopt.config_schema import Recipe
from prefopt.errors import ConfigError, DataError

MARKER = ".prefopt-run"
RESULTS = ("metrics.jsonl", "model", "summary.json")
RUN_PREFIX = "run:"
log = logging.getLogger("prefopt")


def run_model(reference: str, root: str | Path, what: str) -> str:
    """``run:NAME`` (a model path in a recipe) -> the ``model/`` folder of the newest finished run of the
    recipe named NAME under ``root`` (``{root}/NAME-<timestamp>``, with ``summary.json``), so that one
    stage of a pipeline (SFT, reward model) feeds the next. Another path is returned unchanged."""
    if not isinstance(reference, str) or not reference.startswith(RUN_PREFIX):
        return reference
    import re
    name = reference[len(RUN_PREFIX):]
    own = re.compile(re.escape(name) + r"-\d{8}-\d{6}(-\d+)?")     # not tiny-rm-lists-... for run:tiny-rm
    runs = [p for p in Path(root).glob(f"{name}-*") if own.fullmatch(p.name) and (p / MARKER).exists()
            and (p / "summary.json").exists() and (p / "model" / "config.json").exists()]
    if not runs:
        raise ConfigError(f"{what}: '{reference}' names the model of a finished run of recipe '{name}', but "
                          f"{Path(root).resolve()} has none (run `prefopt train` on that recipe first, with "
                          f"output.save_model: true)")
    newest = max(runs, key=lambda p: (p / "summary.json").stat().st_mtime)
    return str((newest / "model").resolve())


def check_run_dir(recipe: Recipe) -> Path:
    """The run directory ``create_run_dir`` will create (absolute), checked without writing anything.

    ``output.run_dir`` if set, else ``{output.root}/{name}-{timestamp}`` (``-2``, ``-3``... if taken).
    Raises :class:`ConfigError` when the folder already holds a run's results, is an existing
    non-empty folder without prefopt's marker (someone else's files), is a file or lies under one, or
    cannot be created (no write permission)."""
    out = recipe.output
    if out.run_dir:
        path = Path(out.run_dir)
        _check_folder_path("output.run_dir", path)
        if path.is_dir():
            _check_existing_run_dir(path)
        return path.resolve()
    root = Path(out.root)
    _check_folder_path("output.root", root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{recipe.name}-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"{recipe.name}-{stamp}-{n}"
    return path.resolve()


def create_run_dir(recipe: Recipe) -> Path:
    """Check (:func:`check_run_dir`), then create the run directory and its ``.prefopt-run`` marker."""
    path = check_run_dir(recipe)
    key = "output.run_dir" if recipe.output.run_dir else "output.root"
    try:
        if recipe.output.run_dir:
            path.mkdir(parents=True, exist_ok=True)
        else:   # exist_ok=False: two runs started in the same second never share a folder
            path.parent.mkdir(parents=True, exist_ok=True)
            base, n = path, 1
            while True:
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    n += 1
                    path = base.with_name(f"{base.name}-{n}")
        marker = path / MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"name": recipe.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                          "prefopt": _version()}) + "\n")
    except OSError as e:
        raise ConfigError(f"{key}: cannot create the run directory '{path}': "
                          f"{e.strerror or e.__class__.__name__}") from e
    return path


def _is_empty_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size == 0


def _version() -> str:
    try:
        from prefopt import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _check_folder_path(key: str, path: Path) -> None:
    """``path`` is, or can be created as, a folder: not a file, no file among its parents, writable."""
    try:
        _check_folder_path_raw(key, path)
    except OSError as e:   # e.g. no permission to look into a parent
        raise ConfigError(f"{key} '{path}' cannot be checked: {e.strerror or e}") from e


def _check_folder_path_raw(key: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} '{path}' is a file, not a folder; choose a folder for the run's outputs")
    existing = path
    while not existing.exists() and existing.parent != existing:
        if existing.is_symlink():
            raise ConfigError(f"{key} '{path}': '{existing}' is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key} '{path}': '{existing}' is a file, not a folder, so '{path}' cannot be created "
                          f"under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write into" if existing == path else "create folders in"
        raise ConfigError(f"{key} '{path}': no permission to {what} '{existing}'")


def _check_existing_run_dir(path: Path) -> None:
    marked = (path / MARKER).is_file()
    results = [name for name in RESULTS if (path / name).exists()
               # an empty metrics.jsonl in a marked folder: a run that failed before its first record
               and not (marked and name == "metrics.jsonl" and _is_empty_file(path / name))]
    if results:
        raise ConfigError(f"output.run_dir '{path}' already holds a run's results ({', '.join(results)}); choose "
                          f"another directory (prefopt never overwrites results)")
    if marked:
        return      # a folder prefopt created whose run ended before any result: reused
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as e:
        raise ConfigError(f"output.run_dir '{path}' cannot be read: {e.strerror}") from e
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ConfigError(f"output.run_dir '{path}' is a non-empty folder that prefopt did not create (it holds "
                          f"{shown}); prefopt would write config.yaml, metrics.jsonl, model/... into it. Choose a "
                          f"new or empty folder, or leave output.run_dir unset for {{output.root}}/{{name}}-{{time}}")


def write_config(run_dir: Path, recipe: Recipe) -> None:
    """``config.yaml``: the resolved recipe, secrets redacted (e.g. an ``HF_TOKEN`` in ``ray.env``)."""
    from omegaconf import OmegaConf

    from prefopt.config import recipe_to_dict
    from prefopt.secrets import redact
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(redact(recipe_to_dict(recipe)))))


def _clean(value):
    """A value as JSON can hold it: non-finite floats become null (also inside lists and mappings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class MetricsLogger:
    """Appends metrics to ``metrics.jsonl`` (always) and sends them to the experiment loggers named in
    ``loggers`` (``output.loggers``: tensorboard, wandb, mlflow; :mod:`prefopt.io.loggers`).

    ``config``: the run's recipe as a dict (redacted here again before any logger sees it);
    ``run_name``: the name of the run in W&B and MLflow (default: the run folder's name). A logger
    that fails while logging is dropped with a warning; ``metrics.jsonl`` stays the run's record."""

    def __init__(self, run_dir: Path, loggers: list[str] | tuple[str, ...] = ("tensorboard",),
                 config: dict | None = None, run_name: str | None = None):
        from prefopt.io.loggers import open_loggers
        from prefopt.secrets import redact
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.file = open(self.path, "a")
        try:
            self.backends = open_loggers(list(loggers), run_dir, redact(config or {}), run_name or run_dir.name)
        except BaseException:
            self.file.close()
            raise

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        record = {"step": step, "split": prefix, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {name: float(value) for name, value in metrics.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        if scalars:
            self._each("log", step, scalars, prefix)

    def log_samples(self, step: int, records: list[dict]) -> None:
        """Sampled completions (``{prompt, response, reward, ...}`` each): one line per record in
        ``samples.jsonl`` (with the step), and a table in each logger."""
        from prefopt.io.loggers import sample_table
        rows = [{"step": step, **_clean(dict(r))} for r in records]
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if rows:
            self._each("log_samples", step, *sample_table(rows))

    def _each(self, method: str, *args) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, method)(*args)
            except Exception as e:
                log.warning("logger '%s' failed (%s: %s); it is off for the rest of this run, metrics.jsonl "
                            "keeps every record", name, type(e).__name__, e)
                del self.backends[name]
                self._close(name, backend, failed=True)

    def close(self) -> None:
        """Close the file and every logger. Called while an exception propagates (a failed or stopped
        run), it marks the W&B and MLflow runs as failed."""
        import sys
        failed = sys.exc_info()[0] is not None
        self.file.close()
        for name, backend in self.backends.items():
            self._close(name, backend, failed)
        self.backends = {}

    @staticmethod
    def _close(name: str, backend, failed: bool) -> None:
        try:
            backend.close(failed=failed)
        except Exception as e:
            log.warning("logger '%s' did not close cleanly (%s: %s)", name, type(e).__name__, e)


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict]:
    """The records of ``metrics.jsonl`` (optionally only one split: "train" or "eval").

    A torn last line (a run killed while writing it) is skipped with a warning; a broken line
    before the last is a :class:`DataError` naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    lines, torn = parse_metrics(path)
    if torn is not None:
        log.warning("%s: skipping its torn last line %d (a run killed while writing it): %r", path, torn[0],
                    preview_line(torn[1]))
    return [r for _, r in lines if split is None or r["split"] == split]


def parse_metrics(path: Path) -> tuple[list[tuple[bytes, dict]], tuple[int, bytes] | None]:
    """The lines of a ``metrics.jsonl`` as ``(raw line, record)`` and its torn last line as
    ``(line number, raw text)`` or None. Raises :class:`DataError` for a broken line before the last."""
    raw_lines = Path(path).read_bytes().split(b"\n")
    numbered = [(n, line) for n, line in enumerate(raw_lines, 1) if line.strip()]
    out, torn = [], None
    for i, (n, line) in enumerate(numbered):
        record, problem = _record(line)
        if problem is None:
            out.append((line.rstrip(b"\r"), record))
        elif i == len(numbered) - 1:
            torn = (n, line)
        else:
            raise DataError(f"line {n} is not a metrics record ({problem}): {preview_line(line)!r}; only the "
                            f"last line of a killed run may be torn, so this file was edited or damaged: fix or "
                            f"delete that line", source=str(path))
    return out, torn


def _record(line: bytes) -> tuple[dict | None, str | None]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError as e:   # JSONDecodeError
        return None, str(e)
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "split" not in record:
        return None, "not a JSON object with 'step' and 'split'"
    return record, None


def preview_line(line: bytes, limit: int = 80) -> str:
    text = line.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "..."


def final_metrics(run_dir: str | Path) -> dict[str, float]:
    """A finished run's numbers, flat: the last record of each split in ``metrics.jsonl`` as
    ``"<split>/<key>"`` (e.g. ``eval/rewards/accuracy``, ``train/reward/mean``) and the scalars of
    ``summary.json`` as ``"summary/<key>"``."""
    out: dict[str, float] = {}
    path = Path(run_dir)
    if (path / "metrics.jsonl").exists():
        last: dict[str, dict] = {}
        for record in read_metrics(path):
            last[record["split"]] = record
        for split, record in last.items():
            out.update({f"{split}/{k}": v for k, v in record.items()
                        if k not in ("step", "split") and isinstance(v, (int, float))})
    if (path / "summary.json").exists():
        summary = json.loads((path / "summary.json").read_text())
        out.update({f"summary/{k}": v for k, v in summary.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


@dataclass
class Run:
    """What a run directory holds, loaded: for ablation scripts (``prefopt.read_run``)."""
    run_dir: Path
    config: dict
    metrics: list[dict]
    final: dict[str, float]
    summary: dict

    def history(self, key: str, split: str = "train") -> list[float]:
        """One metric over the run: its values in the records of ``split`` that have it."""
        return [r[key] for r in self.metrics if r["split"] == split and key in r]


def read_run(run_dir: str | Path) -> Run:
    import yaml
    path = Path(run_dir)
    if not (path / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{path} is not a prefopt run directory (no metrics.jsonl)")
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").exists() else {}
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    return Run(run_dir=path, config=config, metrics=read_metrics(path), final=final_metrics(path), summary=summary)
