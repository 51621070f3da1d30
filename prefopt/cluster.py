"""Starting or joining a Ray cluster, and placing role actors on it."""
from __future__ import annotations

import os

from prefopt.config_schema import RayConfig
from prefopt.secrets import is_secret

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
# on the llama-30m benchmark, -7% step time once they are gone; docs/benchmarks.md).
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


def worker_env(ray_cfg: RayConfig, *, cpu_only: bool = True, local: bool = False) -> dict[str, str]:
    """The environment of every actor: ``WORKER_ENV``, ``MALLOC_ENV`` when no role uses a GPU, the
    driver's values of ``PASSTHROUGH_ENV``, then ``ray.env`` without its secrets (those travel by
    :func:`secret_env_hook`). On a local cluster the driver's working directory leads ``PYTHONPATH``,
    so a reward module beside the user imports in every actor (as ``python -m`` does)."""
    env = {**WORKER_ENV, **(MALLOC_ENV if cpu_only else {})}
    env.update({k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ})
    env.update({k: str(v) for k, v in ray_cfg.env.items() if not is_secret(k)})
    if local:
        parts = [os.getcwd(), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def secret_env(ray_cfg: RayConfig) -> dict[str, str]:
    """The secret-named variables of ``ray.env`` (tokens, keys, passwords: :func:`is_secret`)."""
    return {k: str(v) for k, v in ray_cfg.env.items() if is_secret(k)}


def secret_env_hook(secrets: dict[str, str]):
    """A worker setup hook that puts ``secrets`` into each worker's environment.

    Ray logs a runtime environment's ``env_vars`` in clear (the runtime-env agent's log, readable
    by every user of the machine); a callable setup hook is pickled into the cluster's internal
    key-value store instead, and the logged environment holds only its key.
    """
    def prefopt_secret_env():
        os.environ.update(secrets)
        remove_job_secrets_package()
    return prefopt_secret_env


def remove_job_secrets_package() -> None:
    """Inside a job of ``prefopt submit``: delete this node's unpacked copy of the job's secrets
    package (Ray unpacks a job's ``py_modules`` on every node that runs one of its workers)."""
    import importlib.util
    import shutil

    from prefopt.jobs import SECRETS_ENV
    name = os.environ.get(SECRETS_ENV)
    found = importlib.util.find_spec(name) if name else None
    for folder in (found.submodule_search_locations or []) if found is not None else []:
        shutil.rmtree(folder, ignore_errors=True)


def runtime_env_for(ray_cfg: RayConfig, *, cpu_only: bool = True, local: bool = False) -> dict:
    """The ``runtime_env`` of a run's job: worker variables, secrets through a setup hook."""
    env = {"env_vars": worker_env(ray_cfg, cpu_only=cpu_only, local=local)}
    secrets = secret_env(ray_cfg)
    if secrets:
        env["worker_process_setup_hook"] = secret_env_hook(secrets)
    return env


def is_local(ray_cfg: RayConfig) -> bool:
    """Whether the run starts its own embedded cluster (``ray.address: local`` outside a Ray job)."""
    return ray_cfg.address == "local" and not os.environ.get("RAY_ADDRESS")


def init_ray(ray_cfg: RayConfig, *, num_cpus_needed: float, cpu_only: bool = True,
             log_to_driver: bool = False) -> bool:
    """Start an embedded local cluster or connect to ``ray_cfg.address``.

    The embedded cluster listens on loopback only and requires a token of its own
    (:mod:`prefopt.local_ray`). ``log_to_driver``: actors' output on this console (``--verbose``).
    Returns True if this call started Ray (and so should shut it down). Inside a Ray job (or
    when Ray is already initialised) the existing connection is reused.
    """
    import ray

    from prefopt import console
    if ray.is_initialized():
        return False
    local = is_local(ray_cfg)
    runtime_env = runtime_env_for(ray_cfg, cpu_only=cpu_only, local=local)
    if local:
        from prefopt import local_ray
        num_cpus = ray_cfg.num_cpus or max(int(num_cpus_needed + 0.999), os.cpu_count() or 1)
        console.status(f"starting a local Ray cluster ({num_cpus} CPUs, listening on 127.0.0.1 only, "
                       f"token authentication)")
        local_ray.start(num_cpus=num_cpus, include_dashboard=ray_cfg.include_dashboard,
                        runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        address = os.environ.get("RAY_ADDRESS") if ray_cfg.address == "local" else ray_cfg.address
        console.status(f"joining the Ray cluster at {address}")
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING", log_to_driver=log_to_driver)
    return True


def shutdown_ray() -> None:
    """Disconnect; an embedded cluster stops and its token is removed."""
    import ray
    ray.shutdown()
    from prefopt import local_ray
    local_ray.cleanup()


def init_ray_for(recipe, spec) -> bool:
    """:func:`init_ray` for a run of ``recipe`` whose actors ``spec`` (a ``roles.spec.RoleSpec``)
    lists: the CPUs they need, malloc settings unless one uses a GPU."""
    from prefopt import console
    return init_ray(recipe.ray, num_cpus_needed=spec.cpus(), cpu_only=not spec.uses_gpus(),
                    log_to_driver=console.verbose())


def check_local_resources(recipe, spec) -> None:
    """Before an embedded local cluster starts: the run's actors must fit this machine.

    A local cluster may offer up to ``ray.oversubscribe`` logical CPUs per core (actors that wait
    on each other share cores well; 2 learners + a reference actor on 2 cores is the tiny recipes'
    case); more is refused, naming the numbers. GPUs must exist; custom resources (node labels)
    exist only on a cluster that defines them. Nothing to check when joining a cluster.
    """
    from prefopt.errors import ConfigError
    if not is_local(recipe.ray) or not recipe.ray.check_resources:
        return
    cores = os.cpu_count() or 1
    limit = cores * recipe.ray.oversubscribe
    rows = spec.demand()
    cpus = spec.cpus()
    offered = recipe.ray.num_cpus or max(int(cpus + 0.999), cores)
    roles = ", ".join(f"{k} {c} x {a.get('CPU', 0):g}" for k, c, a in rows if a.get("CPU"))
    if offered > limit + 1e-9:
        what = f"ray.num_cpus={recipe.ray.num_cpus}" if recipe.ray.num_cpus else f"the run needs CPU={cpus:g} ({roles})"
        raise ConfigError(f"{what}, but this machine has {cores} cores and a local cluster may offer at most "
                          f"ray.oversubscribe={recipe.ray.oversubscribe:g} x {cores} = {limit:g} logical CPUs; "
                          f"use fewer or smaller roles, raise ray.oversubscribe, or set ray.address to a cluster")
    if cpus > offered + 1e-9:
        raise ConfigError(f"the run needs CPU={cpus:g} ({roles}), but ray.num_cpus={offered:g}")
    gpus = sum(count * per_actor.get("GPU", 0.0) for _, count, per_actor in rows)
    if gpus:
        import torch
        have = torch.cuda.device_count()
        if gpus > have:
            roles = ", ".join(f"{k} {c} x {a['GPU']:g}" for k, c, a in rows if a.get("GPU"))
            raise ConfigError(f"the run needs GPU={gpus:g} ({roles}), but this machine has {have} GPU(s)")
    for key, _, per_actor in rows:
        custom = sorted(set(per_actor) - {"CPU", "GPU"})
        if custom:
            raise ConfigError(f"{key} asks for the custom resource(s) {', '.join(custom)}, which only a cluster "
                              f"that defines them has (the local cluster has none); set ray.address to it")


def check_cluster_resources(recipe, spec) -> None:
    """Fail fast (ConfigError naming the role) when the connected cluster cannot hold the run's
    actors: more of a resource in total than the cluster has, or more per actor than any node has.
    Skipped with ``ray.check_resources: false`` (autoscaling clusters grow on demand)."""
    import ray

    from prefopt.errors import ConfigError
    if not recipe.ray.check_resources:
        return
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    rows = spec.demand()
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
        shutdown_ray()
