"""The generation-independent part of an evaluation: metrics and per-sample records from responses that
were already generated and scored (``prefopt eval``, and periodic evaluation inside a training loop).

:func:`summarize` is pure: lists in, ``(metrics, records)`` out. Every list holds one value per
sample, in the same order (with ``n`` samples per prompt, each prompt appears ``n`` times in
``prompts``); a baseline's lists pair sample for sample with the model's (sample j of a prompt against
the baseline's sample j of the same prompt).

Metrics (a flat dict of numbers, ready to log under a prefix such as ``eval/``):

* ``samples``; ``reward/mean``, ``reward/std`` (ddof 1; 0 for one sample) and ``reward/<component>``
  (the mean of each reward source, before weights);
* ``length/mean``: response length in tokens (the engine's token ids, EOS included, as the training
  loop's ``response_length``); ``length/max_tokens_fraction``: the fraction of responses with
  ``length >= max_tokens`` (cut off by the limit);
* with a baseline, the same keys under ``baseline/``, then ``win_rate`` (ties count half; a response
  identical to the baseline's is a tie whatever the scores, which a reward model can give with
  rounding noise from batching), ``wins``, ``ties``, ``losses``, ``lc_win_rate`` (the length-controlled
  win rate, :func:`prefopt.evaluation.winrate.length_controlled_win_rate`) and ``length/mean_diff``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

RESERVED = ("mean", "std")


@dataclass
class Responses:
    """One model's scored responses, one entry per sample."""
    responses: list[str]
    rewards: list[float]
    lengths: list[int]                                              # tokens
    components: dict[str, list[float]] = field(default_factory=dict)  # reward source -> value per sample


def _stats(prefix: str, side: Responses, max_tokens: int) -> dict[str, float]:
    n = len(side.rewards)
    mean = sum(side.rewards) / n
    var = sum((r - mean) ** 2 for r in side.rewards) / (n - 1) if n > 1 else 0.0
    out = {f"{prefix}reward/mean": mean, f"{prefix}reward/std": math.sqrt(var)}
    out.update({f"{prefix}reward/{name}": sum(v) / n for name, v in side.components.items()})
    out[f"{prefix}length/mean"] = sum(side.lengths) / n
    out[f"{prefix}length/max_tokens_fraction"] = sum(length >= max_tokens for length in side.lengths) / n
    return out


def _check(side: Responses, n: int, what: str) -> None:
    sizes = {"responses": len(side.responses), "rewards": len(side.rewards), "lengths": len(side.lengths),
             **{f"components['{k}']": len(v) for k, v in side.components.items()}}
    wrong = {k: v for k, v in sizes.items() if v != n}
    if wrong:
        raise ValueError(f"{what}: expected one value per sample ({n}), got " +
                         ", ".join(f"{k}: {v}" for k, v in wrong.items()))
    taken = [k for k in side.components if k in RESERVED]
    if taken:
        raise ValueError(f"{what}: a reward component named '{taken[0]}' would hide reward/{taken[0]}")
    bad = next((i for i, r in enumerate(side.rewards) if not math.isfinite(r)), None)
    if bad is not None:
        raise ValueError(f"{what}: sample {bad} has the reward {side.rewards[bad]}")


def summarize(prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float],
              components: dict[str, Sequence[float]], lengths: Sequence[int], max_tokens: int,
              baseline: Responses | None = None) -> tuple[dict[str, float], list[dict]]:
    """Metrics and per-sample records of scored responses (see the module docstring).

    ``prompts``: the prompt text of each sample; ``components``: each reward source's value per sample
    (``SequenceRewards`` returns them with the weighted total); ``lengths``: response tokens per sample.
    Records: ``{"prompt", "response", "reward", "components", "length"}``, plus ``baseline_response``,
    ``baseline_reward``, ``baseline_components``, ``baseline_length`` and ``win`` (1, 0.5 or 0) with a
    baseline."""
    from prefopt.evaluation.winrate import length_controlled_win_rate, win_indicators
    n = len(prompts)
    if n == 0:
        raise ValueError("summarize needs at least one sample")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
    model = Responses(list(responses), [float(r) for r in rewards], [int(x) for x in lengths],
                      {k: [float(x) for x in v] for k, v in components.items()})
    _check(model, n, "model")
    metrics = {"samples": float(n), **_stats("", model, max_tokens)}
    records = [{"prompt": p, "response": r, "reward": w, "components": {k: v[i] for k, v in model.components.items()},
                "length": length}
               for i, (p, r, w, length) in enumerate(zip(prompts, model.responses, model.rewards, model.lengths))]
    if baseline is None:
        return metrics, records
    _check(baseline, n, "baseline")
    metrics.update(_stats("baseline/", baseline, max_tokens))
    same = [a == b for a, b in zip(model.responses, baseline.responses)]
    wins = win_indicators(model.rewards, baseline.rewards, ties=same)
    diff = [a - b for a, b in zip(model.lengths, baseline.lengths)]
    metrics.update({"win_rate": sum(wins) / n, "lc_win_rate": length_controlled_win_rate(wins, diff),
                    "wins": float(sum(w == 1.0 for w in wins)), "ties": float(sum(w == 0.5 for w in wins)),
                    "losses": float(sum(w == 0.0 for w in wins)), "length/mean_diff": sum(diff) / n})
    for i, record in enumerate(records):
        record.update(baseline_response=baseline.responses[i], baseline_reward=baseline.rewards[i],
                      baseline_components={k: v[i] for k, v in baseline.components.items()},
                      baseline_length=baseline.lengths[i], win=wins[i])
    return metrics, records


def format_table(metrics: dict[str, float], title: str = "", baseline_name: str = "baseline") -> str:
    """The metrics as a two- or three-column text table (model | baseline when there is one)."""
    has_baseline = "win_rate" in metrics
    keys = [k for k in metrics if not k.startswith("baseline/") and k not in
            ("samples", "win_rate", "lc_win_rate", "wins", "ties", "losses", "length/mean_diff")]

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    rows = [(k, fmt(metrics[k]), fmt(metrics.get(f"baseline/{k}"))) for k in keys]
    if has_baseline:
        rows += [("win rate (ties count half)", fmt(metrics["win_rate"]), ""),
                 ("length-controlled win rate", fmt(metrics["lc_win_rate"]), ""),
                 ("wins / ties / losses", " / ".join(f"{metrics[k]:.0f}" for k in ("wins", "ties", "losses")), ""),
                 ("length difference (tokens)", fmt(metrics["length/mean_diff"]), "")]
    header = ("samples: " + f"{metrics['samples']:.0f}", "model", baseline_name if has_baseline else "")
    rows = [header] + rows
    widths = [max(len(r[c]) for r in rows) for c in range(3 if has_baseline else 2)]
    line = "-" * (sum(widths) + 3 * (len(widths) - 1))
    body = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(([title] if title else []) + [line, body[0], line, *body[1:], line])
