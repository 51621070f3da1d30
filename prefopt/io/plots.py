"""``curves.png``: a run's main metrics over steps, one small panel each (from ``metrics.jsonl``).

Panels are named ``"<split>/<key>"`` (as in ``final_metrics``: ``train/loss``, ``eval/rewards/accuracy``).
By default (:func:`curve_keys`):

* offline runs (train records have ``loss``): train loss, eval loss, the eval accuracy metric(s)
  (keys containing ``accuracy``; the train ones if there is no eval record), reward margins
  (keys containing ``margin``);
* online runs (train records have ``reward/mean``): ``reward/mean``, the KL to the reference (keys
  starting with ``kl`` or ``policy/kl``), entropy (``policy/entropy``), ``response_length``, ``loss``.

Only keys with at least one finite value get a panel. matplotlib is imported only when drawing
(Agg canvas, no pyplot state: safe from any thread).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

CURVES = "curves.png"


def _value(v) -> float | None:
    """A finite number as float, else None (missing, null for a non-finite value, bool, text)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _keys_with_data(records: list[dict], split: str) -> list[str]:
    """The keys of ``split``'s records with at least one finite value, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        if r.get("split") == split:
            for k, v in r.items():
                if k not in ("step", "split") and k not in seen and _value(v) is not None:
                    seen[k] = None
    return list(seen)


def _kind(records: list[dict]) -> str | None:
    train = _keys_with_data(records, "train")
    if "reward/mean" in train:
        return "online"
    if "loss" in train or "loss" in _keys_with_data(records, "eval"):
        return "offline"
    return None


def curve_keys(records: list[dict]) -> list[str]:
    """The panels ``write_curves`` draws by default for these ``metrics.jsonl`` records, in order,
    as ``"<split>/<key>"`` (also the titles of the figure's axes). Empty if there is nothing to plot."""
    kind = _kind(records)
    train, evals = _keys_with_data(records, "train"), _keys_with_data(records, "eval")
    out: list[str] = []
    if kind == "offline":
        out += ["train/loss"] if "loss" in train else []
        out += ["eval/loss"] if "loss" in evals else []
        accuracy = [f"eval/{k}" for k in evals if "accuracy" in k]
        out += accuracy or [f"train/{k}" for k in train if "accuracy" in k]
        margins = [f"train/{k}" for k in train if "margin" in k]
        out += margins or [f"eval/{k}" for k in evals if "margin" in k]
    elif kind == "online":
        out += ["train/reward/mean"]
        out += [f"train/{k}" for k in train if k.startswith(("kl", "policy/kl"))]
        out += [f"train/{k}" for k in train if k in ("policy/entropy", "entropy")]
        out += [f"train/{k}" for k in ("response_length", "loss") if k in train]
    return out


def _resolve(records: list[dict], keys: list[str]) -> list[tuple[str, str, str]]:
    """``"<split>/<key>"`` or a bare train key -> ``(title, split, key)``, those with data only."""
    splits = {r.get("split") for r in records}
    have = {split: set(_keys_with_data(records, split)) for split in splits}
    out = []
    for name in keys:
        split, _, rest = name.partition("/")
        if not (rest and split in splits and rest in have[split]):
            split, rest = "train", name
        if rest in have.get(split, ()):
            out.append((f"{split}/{rest}", split, rest))
    return out


def series(records: list[dict], key: str, split: str = "train") -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one metric in ``split``'s records that have it (nan for a logged null)."""
    steps, values = [], []
    for r in records:
        if r.get("split") == split and key in r:
            v = _value(r[key])
            steps.append(r["step"])
            values.append(math.nan if v is None else v)
    return steps, values


def curves_figure(records: list[dict], keys: list[str] | None = None):
    """The matplotlib ``Figure`` of ``write_curves`` (one axes per panel, titled ``"<split>/<key>"``),
    or None if none of ``keys`` (default :func:`curve_keys`) has data."""
    panels = _resolve(records, curve_keys(records) if keys is None else keys)
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xlabel = "iteration" if _kind(records) == "online" else "step"
    ncols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width, height = 3.6 * ncols, 2.6 * nrows
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    # fixed margins (in inches), not tight_layout: that draws the whole figure once more
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.45 / height, top=1 - 0.3 / height,
                        wspace=0.35, hspace=0.55)
    for i, (title, split, key) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        steps, values = series(records, key, split)
        ax.plot(steps, values, color="C1" if split == "eval" else "C0", linewidth=1.2,
                marker="o" if len(steps) <= 25 else None, markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return fig


def write_curves(run_dir: str | Path, *, keys: list[str] | None = None, best_effort: bool = False) -> Path | None:
    """Draw ``curves.png`` beside ``metrics.jsonl`` in ``run_dir``; returns its path, or None when
    there is nothing to plot (no metrics file, no records, none of ``keys`` logged).

    ``keys``: panels as ``"<split>/<key>"`` (``eval/loss``) or bare train keys (``reward/mean``);
    default :func:`curve_keys`. ``best_effort=True`` (for a failed run's ``finally``): any error is
    logged as a warning on the "prefopt" logger and None returned instead of raising. The PNG is
    written to a temporary name and renamed, so a kill mid-write never leaves a broken file."""
    try:
        from prefopt.io.run_dir import read_metrics
        run_dir = Path(run_dir)
        if not (run_dir / "metrics.jsonl").is_file():
            return None
        fig = curves_figure(read_metrics(run_dir), keys)
        if fig is None:
            return None
        path, tmp = run_dir / CURVES, run_dir / f".{CURVES}.part"
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
        return path
    except Exception as e:
        if not best_effort:
            raise
        logging.getLogger("prefopt").warning("could not draw %s in %s: %s", CURVES, run_dir, e)
        return None


def summary_trend(records: list[dict], key: str, split: str = "train") -> tuple[float, float] | None:
    """``(first, last)`` finite value of one metric over ``split``'s records (for the CLI summary:
    "reward, KL, entropy, response length (first -> last)"), or None if it was never logged."""
    values = [v for r in records if r.get("split") == split and (v := _value(r.get(key))) is not None]
    return (values[0], values[-1]) if values else None
