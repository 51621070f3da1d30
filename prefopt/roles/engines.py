"""The rollout engines of an online run: ``roles.rollout.engines`` RolloutWorker actors, their
placement (own placement group, colocated in the learners' bundles, or free), prompt sharding, and
replacing an engine that died (a fresh actor from the same spec; the caller pushes the weights)."""
from __future__ import annotations

from prefopt.config_schema import Recipe


class EngineGroup:
    def __init__(self, recipe: Recipe, learner_bundle=None):
        """``learner_bundle(i)``: the scheduling strategy of learner bundle i (colocated engines)."""
        import ray

        from prefopt.roles.rollout import RolloutWorker

        self.recipe, self.cfg = recipe, recipe.roles.rollout
        ro = self.cfg
        self.timeout = recipe.ray.call_timeout_s
        self._cls = ray.remote(num_cpus=ro.num_cpus, num_gpus=ro.num_gpus,
                               resources=ro.resources or None)(RolloutWorker)
        self._learner_bundle = learner_bundle if ro.colocate_with_learners else None
        self.pg = None
        if ro.placement and self._learner_bundle is None:   # engines packed on few nodes or spread over many
            from prefopt.cluster import placement_group_for
            bundle = {"CPU": ro.num_cpus, **({"GPU": ro.num_gpus} if ro.num_gpus else {}), **ro.resources}
            self.pg = placement_group_for([bundle] * ro.engines, ro.placement, timeout_s=120)
        self.actors = [self._start(i) for i in range(ro.engines)]
        self.restarts = 0

    def _start(self, i: int):
        opts = {}
        if self._learner_bundle is not None:
            opts = {"scheduling_strategy": self._learner_bundle(i)}
        elif self.pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            opts = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=i)}
        r = self.recipe
        from prefopt.models.lora import sync_mode
        lora_rank = r.model.lora.r if sync_mode(r) == "adapter" else None
        return self._cls.options(**opts).remote(r.model.path, self.cfg, seed=r.train.seed + i,
                                                trust_remote_code=r.model.trust_remote_code, lora_rank=lora_rank)

    def __len__(self) -> int:
        return len(self.actors)

    def generate(self, prompt_ids: list[list[int]], sampling, seed: int, greedy: bool = False) -> list:
        """Prompts split over the engines in order; engine i samples with ``seed + i``."""
        return self.collect(self.submit(prompt_ids, sampling, seed, greedy))

    def submit(self, prompt_ids: list[list[int]], sampling, seed: int, greedy: bool = False) -> list:
        """``generate`` without waiting: the engines start now; ``collect`` the returned refs."""
        return [e.generate.remote(p, sampling, greedy=greedy, seed=seed + i)
                for i, (e, p) in enumerate(zip(self.actors, self.split(prompt_ids)))]

    def split(self, items: list) -> list[list]:
        """The non-empty shares of ``items`` the engines get, in engine order (as ``submit``)."""
        share = -(-len(items) // len(self.actors))
        return [part for part in (items[i * share:(i + 1) * share] for i in range(len(self.actors))) if part]

    def collect(self, refs: list) -> list:
        from prefopt.cluster import remote_get
        return [item for part in remote_get(refs, self.timeout, "rollout.generate") for item in part]

    def replace_dead(self) -> int:
        """Start a fresh actor for every engine that no longer answers; returns how many."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError
        replaced = 0
        for i, actor in enumerate(self.actors):
            try:
                ray.get(actor.pid.remote(), timeout=30)
            except (RayActorError, GetTimeoutError):
                ray.kill(actor)
                self.actors[i] = self._start(i)
                replaced += 1
        if replaced:
            from prefopt.cluster import remote_get
            remote_get([a.pid.remote() for a in self.actors], self.timeout, "restarted rollout engine")
        self.restarts += replaced
        return replaced

    def node_info(self) -> list[dict]:
        from prefopt.cluster import remote_get
        return remote_get([e.node_info.remote() for e in self.actors], self.timeout, "rollout.node_info")

    def kill(self) -> None:
        import ray
        for actor in self.actors:
            ray.kill(actor)
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
