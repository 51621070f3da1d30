"""Numerical guards of the training loops."""
from __future__ import annotations

import logging
import math


class SkipGuard:
    """Counts optimizer steps the learners skipped (non-finite loss or gradients): each is logged;
    more than ``limit`` in a row stop the run, naming the step and the rows of its batch."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def check(self, stats: dict, step, rows) -> int:
        bad = stats.get("skipped", 0) > 0 or not math.isfinite(stats["loss"])
        if not bad:
            self.in_a_row = 0
            return 0
        self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        stats["skipped"] = 1
        logging.getLogger("prefopt").warning("step %s skipped: non-finite loss %s or gradients (%d in a row)",
                                             step, stats["loss"], self.in_a_row)
        if self.in_a_row > self.limit:
            shown = ", ".join(map(str, list(rows)[:16])) + (" ..." if len(rows) > 16 else "")
            raise FloatingPointError(f"{self.in_a_row} steps in a row skipped for non-finite loss or gradients "
                                     f"(train.max_skipped_steps={self.limit}); last: step {step}, loss "
                                     f"{stats['loss']}, batch rows [{shown}]")
        return self.in_a_row
