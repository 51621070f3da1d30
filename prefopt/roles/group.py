"""A group of DeepSpeed learner actors (policy or critic) that act as one data-parallel model."""
from __future__ import annotations

from prefopt.config_schema import LearnerRoleConfig, Recipe
from prefopt.data import batching


class LearnerGroup:
    """``cfg.num_actors`` LearnerWorker actors in one placement group and one process group."""

    def __init__(self, recipe: Recipe, cfg: LearnerRoleConfig, *, model_kind: str = "policy", objective=None,
                 colocated: dict[str, float] | None = None, value_heads: int = 1):
        """``colocated``: resources added to every bundle for an actor that shares it (a rollout engine);
        ``value_heads``: outputs of a critic's value head."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from prefopt import console
        from prefopt.cluster import placement_group_for
        from prefopt.roles.learner import LearnerWorker

        self.timeout, self.cfg, self.model_kind = recipe.ray.call_timeout_s, cfg, model_kind
        bundle = {"CPU": cfg.num_cpus, **({"GPU": cfg.num_gpus} if cfg.num_gpus else {}), **cfg.resources}
        for key, amount in (colocated or {}).items():
            if amount:
                bundle[key] = bundle.get(key, 0) + amount
        console.status(f"placing {cfg.num_actors} {model_kind} learner{'s' if cfg.num_actors > 1 else ''} "
                       f"(DeepSpeed ZeRO-{cfg.zero_stage}, {cfg.num_cpus:g} CPU{'s' if cfg.num_cpus != 1 else ''} each)")
        self.pg = placement_group_for([bundle] * cfg.num_actors, cfg.placement, timeout_s=120)
        remote_cls = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                                resources=cfg.resources or None)(LearnerWorker)
        self.actors = [
            remote_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank)).remote(
                    recipe, rank, cfg.num_actors, model_kind=model_kind, role_cfg=cfg, objective=objective,
                    value_heads=value_heads)
            for rank in range(cfg.num_actors)]

    def bundle_strategy(self, index: int):
        """Scheduling strategy that puts an actor into bundle ``index`` of this group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=index)

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, per_actor_args: list[tuple] | None = None, what: str | None = None, **kwargs):
        """Call ``method`` on every actor at once (a collective) and wait, bounded by the timeout."""
        from prefopt.cluster import remote_get
        args = per_actor_args or [()] * len(self.actors)
        refs = [getattr(a, method).remote(*arg, **kwargs) for a, arg in zip(self.actors, args)]
        return remote_get(refs, self.timeout, what or f"{self.model_kind}.{method}")

    def setup(self, **kwargs) -> list[dict]:
        from prefopt import console
        from prefopt.cluster import remote_get
        if not self.cfg.num_gpus and not shm_op_built():
            console.status("compiling DeepSpeed's CPU communication op (first run on this machine, about 50 s)")
        addr, port = remote_get(self.actors[0].address.remote(), self.timeout, f"{self.model_kind}.address")
        return self.call("setup", [(addr, port)] * len(self.actors), **kwargs)

    def train_step(self, examples: list, micro: int | batching.Budget, what: str, *,
                   sort_by_length: bool = False, inject_nan: bool = False) -> list[dict]:
        """One optimizer step on a global batch, split into equal shards (see ``split_for_learners``)."""
        return self.collect(self.submit_train_step(examples, micro, sort_by_length=sort_by_length,
                                                   inject_nan=inject_nan), what)

    def submit_train_step(self, examples: list, micro: int | batching.Budget, *, sort_by_length: bool = False,
                          inject_nan: bool = False) -> list:
        """``train_step`` without waiting: Ray runs each actor's calls in order, so a step submitted
        while the previous one runs starts the moment it ends (no driver round trip in between)."""
        shards = batching.split_for_learners(examples, len(self.actors), micro, sort_by_length=sort_by_length)
        return [a.train_step.remote(s, inject_nan=inject_nan) for a, s in zip(self.actors, shards)]

    def collect(self, refs: list, what: str) -> list:
        from prefopt.cluster import remote_get
        return remote_get(refs, self.timeout, what)

    def infer(self, method: str, items: list, micro: int | batching.Budget) -> list:
        """A no-grad collective pass over ``items`` (any count); results in the order of ``items``."""
        return run_sharded(self.actors, method, items, micro, self.timeout)

    def submit(self, method: str, items: list, micro: int | batching.Budget):
        """``infer`` without waiting: pass the result to ``collect_sharded``."""
        return submit_sharded(self.actors, method, items, micro)

    def kill(self) -> None:
        import ray
        for actor in self.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self.pg)


def submit_sharded(workers: list, method: str, items: list, micro: int | batching.Budget):
    """Start ``method`` on ``workers`` over ``items`` (equal micro-batch counts); see ``collect_sharded``."""
    plan, keep = batching.shard_for_inference(items, len(workers), micro)
    return [getattr(w, method).remote(p) for w, p in zip(workers, plan)], keep


def collect_sharded(pending, timeout_s: float, what: str) -> list:
    """Wait for a ``submit_sharded`` call; its per-micro-batch results in the order of the items."""
    from prefopt.cluster import remote_get
    refs, keep = pending
    results = remote_get(refs, timeout_s, what)
    return [out for worker_out, flags in zip(results, keep) for out, k in zip(worker_out, flags) if k]


def run_sharded(workers: list, method: str, items: list, micro: int | batching.Budget, timeout_s: float) -> list:
    """Spread ``items`` over ``workers`` (equal micro-batch counts), call ``method``, flatten in order."""
    return collect_sharded(submit_sharded(workers, method, items, micro), timeout_s,
                           f"{method} on {len(items)} items")


def shm_op_built() -> bool:
    """Whether DeepSpeed's shared-memory all-reduce op (JIT-compiled on CPU) is in the build cache,
    built from this DeepSpeed installation (torch rebuilds it when its sources moved, e.g. another venv)."""
    try:
        import importlib.util
        from pathlib import Path

        from torch.utils.cpp_extension import _get_build_directory
        build = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
        deepspeed_dir = importlib.util.find_spec("deepspeed").submodule_search_locations[0]
        return any(build.glob("*.so")) and deepspeed_dir in (build / "build.ninja").read_text()
    except Exception:
        return True
