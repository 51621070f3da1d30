"""Starting or joining a Ray cluster, and placing role actors on it."""
from __future__ import annotations

import os

from prefopt.config_schema import RayConfig

# Every worker process: one BLAS/OpenMP thread per logical CPU Ray gives it (without this, two
# learners on two cores oversubscribe and run 10-40x slower), offline hub access, CPU DeepSpeed.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TORCHDYNAMO_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore::FutureWarning",
}
# glibc malloc: keep freed memory in the process instead of handing it back to the OS after every
# micro-batch. By default large tensors are mmap-ed and unmapped on free, and the heap is trimmed,
# so each training step faults the same 140-340 MB of pages in again (35-85k page faults per step
# on the llama-30m benchmark, -7% step time once they are gone; docs/benchmarks.md, session 6/7).
# The learner's peak RSS did not rise in that benchmark; the memory is kept between steps instead.
# Only for runs whose roles use no GPU: a GPU node's host memory sees little churn, and a freed
# multi-GB host buffer (a gathered checkpoint) should go back to the OS there.
# A value already in the driver's environment, or in ``ray.env``, wins over these.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
PASSTHROUGH_ENV = ("PREFOPT_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR",
                   "DS_ACCELERATOR", "VLLM_CPU_KVCACHE_SPACE", "PYTHONPATH", *MALLOC_ENV)


def worker_env(ray_cfg: RayConfig, *, cpu_only: bool = True) -> dict[str, str]:
    """The environment of every actor: ``WORKER_ENV``, ``MALLOC_ENV`` when no role uses a GPU, the
    driver's values of ``PASSTHROUGH_ENV``, then ``ray.env``."""
    env = {**WORKER_ENV, **(MALLOC_ENV if cpu_only else {})}
    env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ})
    env.update({k: str(v) for k, v in ray_cfg.env.items()})
    return env


def init_ray(ray_cfg: RayConfig, *, num_cpus_needed: float, cpu_only: bool = True) -> bool:
    """Start an embedded local cluster or connect to ``ray_cfg.address``.

    Returns True if this call started Ray (and so should shut it down). Inside a Ray job (or
    when Ray is already initialised) the existing connection is reused.
    """
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": worker_env(ray_cfg, cpu_only=cpu_only)}
    if ray_cfg.address == "local" and not os.environ.get("RAY_ADDRESS"):
        num_cpus = ray_cfg.num_cpus or max(int(num_cpus_needed + 0.999), os.cpu_count() or 1)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=ray_cfg.include_dashboard,
                 dashboard_host="127.0.0.1", runtime_env=env, log_to_driver=True,
                 logging_level="WARNING", configure_logging=True)
    else:
        address = os.environ.get("RAY_ADDRESS") if ray_cfg.address == "local" else ray_cfg.address
        ray.init(address=address, runtime_env=env, logging_level="WARNING")
    return True


def init_ray_for(recipe) -> bool:
    """:func:`init_ray` for a run of ``recipe``: the CPUs its actors need, malloc settings unless a
    role uses a GPU."""
    return init_ray(recipe.ray, num_cpus_needed=cpus_needed(recipe), cpu_only=not uses_gpus(recipe))


def resource_demand(recipe) -> list[tuple[str, int, dict[str, float]]]:
    """``(recipe key, actor count, resources per actor)`` of every role the run will start."""
    r = recipe.roles

    def need(cfg, extra=None):
        out = {"CPU": float(cfg.num_cpus), "GPU": float(cfg.num_gpus), **{k: float(v) for k, v in (extra or {}).items()}}
        return {k: v for k, v in out.items() if v}

    rows = [("roles.learner", r.learner.num_actors, need(r.learner, r.learner.resources))]
    online = recipe.objective.name in ("ppo", "constrained_ppo")
    if r.critic is not None and getattr(recipe.objective, "advantage", None) == "gae":
        rows.append(("roles.critic", r.critic.num_actors, need(r.critic, r.critic.resources)))
    if r.reference is not None and (r.reference.placement == "actor" or online) \
            and getattr(recipe.objective, "kl_coef", 1) > 0:
        rows.append(("roles.reference", r.reference.num_actors, need(r.reference)))
    if online and r.rollout is not None:
        rows.append(("roles.rollout", r.rollout.engines, need(r.rollout, r.rollout.resources)))
    if r.reward is not None:
        rows += [(f"roles.reward.sources[{i}]", 1, need(src)) for i, src in enumerate(r.reward.sources) if src.model]
    return rows


def cpus_needed(recipe) -> float:
    """Logical CPUs of all the run's actors (what an embedded local cluster must offer)."""
    return sum(count * per_actor.get("CPU", 0.0) for _, count, per_actor in resource_demand(recipe))


def uses_gpus(recipe) -> bool:
    """Whether any of the run's actors asks for a GPU."""
    return any(per_actor.get("GPU", 0.0) for _, _, per_actor in resource_demand(recipe))


def check_cluster_resources(recipe) -> None:
    """Fail fast (ConfigError naming the role) when the connected cluster cannot hold the run's
    actors: more of a resource in total than the cluster has, or more per actor than any node has.
    Skipped with ``ray.check_resources: false`` (autoscaling clusters grow on demand)."""
    import ray

    from prefopt.errors import ConfigError
    if not recipe.ray.check_resources:
        return
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    rows = resource_demand(recipe)
    demand: dict[str, float] = {}
    for key, count, per_actor in rows:
        for name, amount in per_actor.items():
            demand[name] = demand.get(name, 0.0) + count * amount
            if not any(node.get(name, 0.0) >= amount for node in nodes):
                raise ConfigError(f"{key} asks for {name}={amount:g} per actor, but no node of the cluster has "
                                  f"that much (largest: {max((n.get(name, 0.0) for n in nodes), default=0):g}; "
                                  f"cluster: {_fmt(total)})")
    for name, amount in demand.items():
        if amount > total.get(name, 0.0) + 1e-9:
            roles = ", ".join(f"{k} {c} x {a[name]:g}" for k, c, a in rows if name in a)
            raise ConfigError(f"the run needs {name}={amount:g} ({roles}), but the cluster has "
                              f"{name}={total.get(name, 0.0):g} (cluster: {_fmt(total)})")


def _fmt(resources: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if not k.startswith(("node:", "memory",
                                                                                             "object_store")))


def placement_group_for(bundles: list[dict], strategy: str, timeout_s: float):
    """Reserve ``bundles`` (e.g. one per learner) with PACK or SPREAD; error if impossible."""
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(bundles, strategy={"pack": "PACK", "spread": "SPREAD"}[strategy])
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        from prefopt.errors import ConfigError
        ray.util.remove_placement_group(pg)
        raise ConfigError(f"the cluster cannot provide the requested resources {bundles} "
                          f"(strategy {strategy}); available: {ray.available_resources()}")
    return pg


class ActorDiedError(RuntimeError):
    """A remote call failed because its actor died (killed, OOM, node lost)."""


def remote_get(refs, timeout_s: float, what: str):
    """ray.get with a bound: a dead or hung actor becomes a clear error, never a hang."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise RuntimeError(f"{what} did not finish within ray.call_timeout_s={timeout_s:g}s") from None
    except RayActorError as e:
        raise ActorDiedError(f"{what} failed: an actor died ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None


def release(roles, started_ray: bool) -> None:
    """End a run: kill its actors, and stop Ray if this run started it."""
    if roles is not None:
        roles.shutdown()
    if started_ray:
        import ray
        ray.shutdown()
