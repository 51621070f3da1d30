"""The run directory: resolved config, metrics (JSONL + TensorBoard), final model.

    runs/<name>-<timestamp>/
      config.yaml        the fully resolved recipe
      metrics.jsonl      one JSON object per logged step / evaluation
      tensorboard/       TensorBoard event files
      model/             final policy in HF format (safetensors) + tokenizer
      summary.json       final numbers of the run

A run never writes into a directory that already holds results: an existing ``run_dir`` with
``metrics.jsonl`` or ``model/`` in it is an error, so nobody's results are overwritten.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from prefopt.config_schema import Recipe
from prefopt.errors import ConfigError


def create_run_dir(recipe: Recipe) -> Path:
    out = recipe.output
    if out.run_dir:
        path = Path(out.run_dir)
        if path.exists() and any((path / name).exists() for name in ("metrics.jsonl", "model", "summary.json")):
            raise ConfigError(f"output.run_dir '{path}' already holds a run's results; choose another "
                              f"directory (prefopt never overwrites results)")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(out.root) / f"{recipe.name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(out.root) / f"{recipe.name}-{stamp}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential", re.IGNORECASE)
REDACTED = "***redacted***"


def redact(value, key: str = ""):
    """A copy of a config tree with the values under secret-looking keys (token, secret, password,
    api_key, credential) replaced, so logged configs never carry them."""
    if isinstance(value, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and not isinstance(v, dict) else redact(v, str(k)))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    return value


def write_config(run_dir: Path, recipe: Recipe) -> None:
    """``config.yaml``: the resolved recipe, secrets redacted (e.g. an ``HF_TOKEN`` in ``ray.env``)."""
    from omegaconf import OmegaConf

    from prefopt.config import recipe_to_dict
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(redact(recipe_to_dict(recipe)))))


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends metrics to ``metrics.jsonl`` and, if enabled, TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        record = {"step": step, "split": prefix, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict]:
    """The records of ``metrics.jsonl`` (optionally only one split: "train" or "eval")."""
    records = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl") if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


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
