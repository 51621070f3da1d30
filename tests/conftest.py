"""Test-wide settings: one thread per process, offline hub, a cache inside the repo, and one
embedded Ray cluster shared by the end-to-end tests (started on first use)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFOPT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "prefopt"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (4 logical CPUs: 2 learners + a reference actor + slack)."""
    import ray

    from prefopt.cluster import init_ray, shutdown_ray
    from prefopt.config_schema import RayConfig

    started = init_ray(RayConfig(num_cpus=4), num_cpus_needed=4)
    yield ray
    if started:
        shutdown_ray()


@pytest.fixture(scope="module")
def tok():
    """The tiny offline tokenizer (built once, cached)."""
    from transformers import AutoTokenizer

    from prefopt.models.tiny import resolve_model_path
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")
