"""The environment every role actor starts with (prefopt.cluster.worker_env)."""
import os

from prefopt.cluster import MALLOC_ENV, worker_env
from prefopt.config_schema import RayConfig


def test_actors_get_one_thread_and_malloc_that_keeps_freed_memory(monkeypatch):
    for key in MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    env = worker_env(RayConfig())
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1"
    # large tensors stay in the heap (no mmap/munmap per tensor) and the heap is not trimmed
    assert int(env["MALLOC_MMAP_THRESHOLD_"]) >= 1 << 30
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) > int(env["MALLOC_MMAP_THRESHOLD_"])
    assert int(env["MALLOC_TOP_PAD_"]) > 0
    assert all(isinstance(v, str) for v in env.values())


def test_a_users_malloc_setting_wins_over_the_default(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    env = worker_env(RayConfig())
    assert env["MALLOC_TRIM_THRESHOLD_"] == "131072"
    env = worker_env(RayConfig(env={"MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "2"}))
    assert env["MALLOC_TRIM_THRESHOLD_"] == "0" and env["OMP_NUM_THREADS"] == "2"


def test_a_real_ray_worker_sees_the_worker_env(ray_cluster):
    @ray_cluster.remote(num_cpus=0)
    def read_env(keys):
        return {k: os.environ.get(k) for k in keys}

    keys = [*MALLOC_ENV, "OMP_NUM_THREADS"]
    seen = ray_cluster.get(read_env.remote(keys), timeout=120)
    expected = worker_env(RayConfig(num_cpus=4))     # the conftest cluster's config
    assert seen == {k: expected[k] for k in keys}


def test_malloc_settings_only_for_runs_without_gpus(monkeypatch):
    from prefopt.algorithms import role_spec

    def uses_gpus(recipe):
        return role_spec(recipe).uses_gpus()
    from prefopt.config import load_recipe

    for key in MALLOC_ENV:
        monkeypatch.delenv(key, raising=False)
    assert not set(MALLOC_ENV) & set(worker_env(RayConfig(), cpu_only=False))
    assert not uses_gpus(load_recipe("recipes/tiny_dpo.yaml"))
    assert uses_gpus(load_recipe("recipes/tiny_dpo.yaml", ["roles.learner.num_gpus=1"]))
