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
import time
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


def write_config(run_dir: Path, recipe: Recipe) -> None:
    from prefopt.config import recipe_to_yaml
    (run_dir / "config.yaml").write_text(recipe_to_yaml(recipe))


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
