"""Experiment loggers: where a run's metrics go besides ``metrics.jsonl`` (``output.loggers``).

    tensorboard   TensorBoard event files in {run_dir}/tensorboard/ (torch's SummaryWriter)
    wandb         a W&B run whose files land in {run_dir}/wandb/; offline unless WANDB_API_KEY is set
                  (WANDB_MODE, when set, wins); pip install 'prefopt[wandb]'
    mlflow        an MLflow run at output.mlflow_tracking_uri, by default a file store in
                  {run_dir}/mlflow/; pip install 'prefopt[mlflow]'

Each backend is a plain class in :data:`LOGGERS`, built as ``Backend(run_dir, config, run_name)``
(``config``: the run's recipe as a dict, secrets already redacted; its ``output`` section holds the
backend's settings) with ``log(step, metrics, prefix)`` (finite numbers only, named
``{prefix}/{name}``), ``log_samples(step, columns, rows)`` (a table of sampled completions) and
``close(failed)``. A backend imports its library only when it is built, so this module is cheap to
import: the recipe checks use it before Ray starts (:func:`check_logger_names`,
:func:`check_logger_packages`). :class:`prefopt.io.run_dir.MetricsLogger` fans out to them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import time
from pathlib import Path

from prefopt.errors import ConfigError, did_you_mean
from prefopt.registry import Registry

LOGGERS = Registry("logger")


def check_logger_names(names: list[str], what: str = "recipe") -> None:
    """Every entry of ``output.loggers`` names a backend, once; ``what``: where the list was set."""
    for i, name in enumerate(names):
        if name not in LOGGERS:
            raise ConfigError(f"{what}: 'output.loggers[{i}]' is '{name}', which is not a logger"
                              f"{did_you_mean(str(name), LOGGERS.names())}; available: {', '.join(LOGGERS.names())}")
        if name in names[:i]:
            raise ConfigError(f"{what}: 'output.loggers[{i}]': '{name}' is listed twice")


def check_logger_packages(names: list[str]) -> None:
    """The library of every requested backend is installed (checked without importing it)."""
    for name in names:
        backend = LOGGERS.get(name)
        if importlib.util.find_spec(backend.package) is None:
            raise ConfigError(f"output.loggers: '{name}' logs through the '{backend.package}' library, which is not "
                              f"installed here; install it with: {backend.install}")


def open_loggers(names: list[str], run_dir: Path, config: dict, run_name: str) -> dict[str, object]:
    """The backends named in ``names``, built; if one fails to start, those already built are closed."""
    opened: dict[str, object] = {}
    try:
        for name in names:
            opened[name] = LOGGERS.get(name)(run_dir, config, run_name)
    except BaseException:
        for backend in opened.values():
            with contextlib.suppress(Exception):
                backend.close(failed=True)
        raise
    return opened


def sample_table(records: list[dict]) -> tuple[list[str], list[list]]:
    """``(columns, rows)`` of sampled completions: every key of the records in order of first
    appearance; values that are not text, numbers or null become JSON text (e.g. reward components)."""
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]

    def cell(value):
        return value if value is None or isinstance(value, (str, int, float)) else json.dumps(value)
    return columns, [[cell(record.get(c)) for c in columns] for record in records]


def _output(config: dict) -> dict:
    return config.get("output") or {}


@LOGGERS.register("tensorboard")
class TensorBoardLogger:
    """Scalars as ``{prefix}/{name}``; sampled completions as a markdown table (text tab, tag ``samples``)."""
    package, install = "tensorboard", "pip install tensorboard"     # a dependency of prefopt itself

    def __init__(self, run_dir: Path, config: dict, run_name: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.flush()

    def log_samples(self, step: int, columns: list[str], rows: list[list]) -> None:
        def text(value) -> str:
            return "" if value is None else str(value).replace("|", "\\|").replace("\n", "<br>")
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in rows]
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


@LOGGERS.register("wandb")
class WandbLogger:
    """A W&B run (``output.wandb_project``, default "prefopt"; ``output.wandb_entity``) named after the
    run folder, with the redacted recipe as its config; sampled completions as a ``wandb.Table``.
    Its console output is off unless ``output.log_level`` is debug, and it never captures the console."""
    package, install = "wandb", "pip install 'prefopt[wandb]'"

    def __init__(self, run_dir: Path, config: dict, run_name: str):
        import wandb

        from prefopt.console import verbose
        out = _output(config)
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        # create_new: a run of its own, not wandb's global one (a sweep or a test runs several in one process)
        settings = wandb.Settings(console="off", silent=not verbose(), reinit="create_new")
        self.run = wandb.init(project=out.get("wandb_project") or "prefopt", entity=out.get("wandb_entity"),
                              name=run_name, dir=str(run_dir), config=config, mode=mode, settings=settings)

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        self.run.log({f"{prefix}/{name}": value for name, value in metrics.items()}, step=step)

    def log_samples(self, step: int, columns: list[str], rows: list[list]) -> None:
        import wandb
        self.run.log({"samples": wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


MLFLOW_KEY_LIMIT, MLFLOW_VALUE_LIMIT = 250, 6000      # mlflow.utils.validation: param key and value lengths
MLFLOW_PARAMS_BATCH, MLFLOW_METRICS_BATCH = 100, 1000   # per log_batch call


def mlflow_name(name: str) -> str:
    """``name`` as a valid MLflow metric or param key: characters other than letters, digits and
    ``_ - . / space`` become ``_``; no empty, ``.`` or ``..`` path segment; at most 250 characters."""
    name = re.sub(r"[^\w.\-/ ]", "_", str(name))
    parts = [p if p not in (".", "..") else p.replace(".", "_") for p in name.split("/") if p]
    return "/".join(parts)[:MLFLOW_KEY_LIMIT] or "_"


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested recipe dict as ``{"train.lr": "1e-05", ...}``: mappings (and lists of mappings) are
    walked, other values become their JSON text (plain strings as they are), cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[mlflow_name(name)] = (value if isinstance(value, str) else json.dumps(value))[:MLFLOW_VALUE_LIMIT]
    return out


@LOGGERS.register("mlflow")
class MlflowLogger:
    """An MLflow run (through ``MlflowClient``, no global active run) in experiment
    ``output.mlflow_experiment`` (default: the recipe's name), named after the run folder, with the
    flattened redacted recipe as params; sampled completions as table artifacts
    ``samples/step_<N>.json``. The default tracking URI is a file store in the run folder, which
    MLflow 3 keeps in maintenance mode: ``MLFLOW_ALLOW_FILE_STORE=true`` is set for it unless the
    environment sets it already. A ``sqlite:`` URI needs ``sqlalchemy`` and ``alembic`` too."""
    package, install = "mlflow", "pip install 'prefopt[mlflow]'"     # mlflow-skinny

    def __init__(self, run_dir: Path, config: dict, run_name: str):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        out = _output(config)
        uri = out.get("mlflow_tracking_uri") or (Path(run_dir).resolve() / "mlflow").as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        name = out.get("mlflow_experiment") or config.get("name") or "prefopt"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:     # created meanwhile by another run (a sweep on one tracking server)
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                             tags={"prefopt.run_dir": str(run_dir)}).info.run_id
        params = [Param(k, v) for k, v in flat_params(config).items()]
        for i in range(0, len(params), MLFLOW_PARAMS_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_PARAMS_BATCH])

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        rows = [Metric(mlflow_name(f"{prefix}/{name}"), value, now, step) for name, value in metrics.items()]
        for i in range(0, len(rows), MLFLOW_METRICS_BATCH):
            self.client.log_batch(self.run_id, metrics=rows[i:i + MLFLOW_METRICS_BATCH])

    def log_samples(self, step: int, columns: list[str], rows: list[list]) -> None:
        import warnings
        table = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
        with warnings.catch_warnings():     # e.g. pandas' deprecation notes about MLflow's own code
            warnings.simplefilter("ignore")
            self.client.log_table(self.run_id, data=table, artifact_file=f"samples/step_{step:06d}.json")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
