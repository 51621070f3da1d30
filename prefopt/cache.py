"""Where prefopt caches what it builds offline (tiny models, synthetic data)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PREFOPT_CACHE``, else ``~/.cache/prefopt``."""
    root = os.environ.get("PREFOPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prefopt")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
