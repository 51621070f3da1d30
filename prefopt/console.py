"""What a run says on the console: short status lines while it starts, then the progress bar.

``output.log_level`` (or ``prefopt train --verbose``): ``info`` (default) prints prefopt's status
lines and keeps third-party output (DeepSpeed, vLLM, Ray, actors' prints) out of the console —
it stays in Ray's session logs; ``warning`` prints only warnings and errors; ``debug`` shows
everything, actors' output included.
"""
from __future__ import annotations

import logging
import os
import sys
import time

LEVELS = ("debug", "info", "warning")
_state = {"level": "info", "start": None}


def configure(level: str) -> None:
    """Set the console level for this process (``output.log_level``)."""
    _state["level"] = level
    _state["start"] = time.perf_counter()
    log = logging.getLogger("prefopt")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("prefopt: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    if level != "debug":
        for name in ("ray", "deepspeed", "DeepSpeed", "vllm", "transformers", "datasets", "torch"):
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:   # e.g. "Writing model shards" while a builtin model is built on first use
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:
            pass


def verbose() -> bool:
    return _state["level"] == "debug"


def status(message: str) -> None:
    """One status line (``prefopt [12s]: message``) unless the level is ``warning``."""
    if _state["level"] == "warning":
        return
    start = _state["start"] if _state["start"] is not None else time.perf_counter()
    print(f"prefopt [{time.perf_counter() - start:4.0f}s]: {message}", file=sys.stderr, flush=True)
