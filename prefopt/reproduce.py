"""Recipe reproduction: a recipe's ``expect:`` ranges checked against a run's final metrics.

``expect: {"eval/rewards/accuracy": [0.9, 1.0], "summary/reward_final": [0.5, 1.0]}`` — keys are
``<split>/<metric>`` of the last ``metrics.jsonl`` record of that split, or ``summary/<key>``
(see ``prefopt.io.run_dir.final_metrics``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    key: str
    low: float
    high: float
    value: float | None

    @property
    def passed(self) -> bool:
        return self.value is not None and self.low <= self.value <= self.high


def check_run(expect: dict[str, list[float]], run_dir: str | Path) -> list[Check]:
    from prefopt.io.run_dir import final_metrics
    metrics = final_metrics(run_dir)
    return [Check(key, float(lo), float(hi), metrics.get(key)) for key, (lo, hi) in sorted(expect.items())]


def format_checks(checks: list[Check], title: str) -> str:
    rows = [("metric", "expected", "got", "result")]
    for c in checks:
        got = "missing" if c.value is None else f"{c.value:.4g}"
        rows.append((c.key, f"[{c.low:g}, {c.high:g}]", got, "pass" if c.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [title] + [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(2, "-+-".join("-" * w for w in widths))
    verdict = "PASS" if checks and all(c.passed for c in checks) else "FAIL"
    return "\n".join(lines + [f"{verdict}: {sum(c.passed for c in checks)}/{len(checks)} expectations met"])
