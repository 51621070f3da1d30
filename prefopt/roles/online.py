"""The actors of an online run: policy (and critic) learner groups, rollout engines, reference
and reward-model actors; weight sync from the policy learners to the engines."""
from __future__ import annotations

import time

from prefopt.config_schema import Recipe


class OnlineRoles:
    def __init__(self, recipe: Recipe, pad_id: int, spec):
        """Create every actor of ``spec`` (a ``roles.spec.RoleSpec``; learners join their groups in
        ``setup``)."""
        import ray

        from prefopt.objectives.ppo import ValueObjective
        from prefopt.roles.group import LearnerGroup
        from prefopt.roles.reference import ReferenceWorker
        from prefopt.roles.engines import EngineGroup

        r, roles = recipe, recipe.roles
        self.timeout = r.ray.call_timeout_s
        ro = roles.rollout
        colocated = {"CPU": ro.num_cpus, "GPU": ro.num_gpus, **ro.resources} if ro.colocate_with_learners else None
        self.policy = LearnerGroup(r, roles.learner, colocated=colocated)
        self.critic = None
        if spec.critic is not None:
            from prefopt.objectives.constrained_ppo import value_heads
            self.critic = LearnerGroup(r, spec.critic, model_kind="critic", objective=ValueObjective(r.objective),
                                       value_heads=value_heads(r))
        from prefopt import console
        self.references = []
        self.reference_on_policy = spec.reference_on_policy   # LoRA: the policy learners, adapters off
        if spec.reference is not None:
            ref = spec.reference
            console.status(f"starting {ref.num_actors} reference actor{'s' if ref.num_actors > 1 else ''}")
            rcls = ray.remote(num_cpus=ref.num_cpus, num_gpus=ref.num_gpus)(ReferenceWorker)
            self.references = [rcls.remote(r, pad_id) for _ in range(ref.num_actors)]
        from prefopt.models.lora import sync_mode
        self.lora_sync = sync_mode(r)        # None | "merged" | "adapter" (LoRA: what the engines get)
        # an adapter is a few MB: it always travels through the object store
        self.transport = "object_store" if self.lora_sync == "adapter" else ro.weight_sync
        if self.transport != ro.weight_sync:
            import logging
            logging.getLogger("prefopt").info("roles.rollout.lora_sync=adapter: the adapter travels through the "
                                              "object store (roles.rollout.weight_sync=%s applies to full weights)",
                                              ro.weight_sync)
        console.status(f"starting {ro.engines} vLLM engine{'s' if ro.engines > 1 else ''}")
        self.engines = EngineGroup(r, learner_bundle=self.policy.bundle_strategy)
        self.max_engine_restarts, self.version = ro.max_restarts, 0
        self._pending_sync = None        # (version, refs) of a sync submitted without waiting
        from prefopt.rewards.sources import model_paths
        from prefopt.roles.reward_model import ImplicitPRMWorker, RewardModelWorker
        self.reward_models, self.process_model = {}, None
        trust = r.model.trust_remote_code
        proc = roles.reward.process
        if proc is not None and proc.model:
            if proc.reference:
                pcls = ray.remote(num_cpus=proc.num_cpus, num_gpus=proc.num_gpus)(ImplicitPRMWorker)
                self.process_model = pcls.remote(proc.model, proc.reference, beta=proc.beta, trust_remote_code=trust,
                                                 batch_tokens=proc.batch_tokens)
            else:
                pcls = ray.remote(num_cpus=proc.num_cpus, num_gpus=proc.num_gpus)(RewardModelWorker)
                self.process_model = pcls.remote([proc.model], trust_remote_code=trust, batch_tokens=proc.batch_tokens)
        for i, src in enumerate(roles.reward.sources):
            if not src.fn:
                mcls = ray.remote(num_cpus=src.num_cpus, num_gpus=src.num_gpus)(RewardModelWorker)
                self.reward_models[i] = mcls.remote(model_paths(src), trust_remote_code=trust,
                                                    batch_tokens=src.batch_tokens)

    def generate(self, prompt_ids: list[list[int]], sampling, seed: int, greedy: bool = False):
        self.finish_sync()
        return self._recovering(lambda: self.engines.generate(prompt_ids, sampling, seed, greedy), "generate")

    def submit_generate(self, prompt_ids: list[list[int]], sampling, seed: int):
        """Start sampling now (``train.async_rollouts``); ``collect_generate`` waits for the result.
        Weight syncs sent meanwhile queue behind it in each engine."""
        return prompt_ids, sampling, seed, self.engines.submit(prompt_ids, sampling, seed)

    def collect_generate(self, pending):
        from prefopt.cluster import ActorDiedError
        prompt_ids, sampling, seed, refs = pending
        try:
            return self.engines.collect(refs)
        except ActorDiedError:          # an engine died meanwhile: replace, re-sync, sample again
            return self.generate(prompt_ids, sampling, seed)

    def _recovering(self, call, what: str):
        """Run ``call``; if a rollout engine died meanwhile, replace it, push the current policy
        weights to the engines and run ``call`` again (up to ``roles.rollout.max_restarts`` in all)."""
        from prefopt.cluster import ActorDiedError
        while True:
            try:
                return call()
            except ActorDiedError as e:
                if self.engines.restarts >= self.max_engine_restarts:
                    raise
                if not self.engines.replace_dead():
                    raise                          # not an engine that died
                import logging
                logging.getLogger("prefopt").warning("rollout engine died during %s (%s); restarted it "
                                                     "(%d of %d restarts)", what, e, self.engines.restarts,
                                                     self.max_engine_restarts)
                if self.transport == "process_group":
                    self.open_sync_group()         # a fresh group with the new engine
                self._sync(self.version)

    def open_sync_group(self) -> None:
        """``process_group`` transport: learner rank 0 + every engine join a group of their own."""
        from prefopt.cluster import remote_get
        host, port = remote_get(self.policy.actors[0].address.remote(), self.timeout, "learner.address")
        size = 1 + len(self.engines)
        refs = [self.policy.actors[0].join_sync_group.remote(host, port, size, self.timeout)]
        refs += [e.join_sync_group.remote(host, port, i + 1, size, self.timeout) for i, e in enumerate(self.engines.actors)]
        self.sync_specs = remote_get(refs, self.timeout, "weight-sync group")[0]

    def sync_weights(self, version: int, wait: bool = True) -> float:
        """Policy learners -> every rollout engine (no disk). Returns seconds.

        ``wait=False`` (async rollouts, ``object_store`` transport): submit the export and the loads
        and return; Ray runs each actor's calls in submission order, so the learner exports before
        its next step and every engine loads before the generation submitted after this call. The
        result is checked by :meth:`finish_sync`, which every later engine or sync call runs first.
        """
        start = time.perf_counter()
        self.finish_sync()
        if wait or self.transport != "object_store":
            self._recovering(lambda: self._sync(version), "weight sync")
        else:
            self._pending_sync = (version, self._submit_object_store_sync(version))
        self.version = version
        return time.perf_counter() - start

    def finish_sync(self) -> None:
        """Wait for a sync submitted with ``wait=False``; if an engine died meanwhile, replace it and
        sync again."""
        from prefopt.cluster import ActorDiedError, remote_get
        pending, self._pending_sync = self._pending_sync, None
        if pending is None:
            return
        version, refs = pending
        try:
            remote_get(refs, self.timeout, "weight sync (object store)")
        except ActorDiedError:
            self._recovering(lambda: self._sync(version), "weight sync")

    def _submit_object_store_sync(self, version: int) -> list:
        if self.lora_sync == "adapter":
            refs = [a.export_adapter.remote() for a in self.policy.actors]
            return refs[1:] + [e.update_adapter.remote(refs[0], version) for e in self.engines.actors]
        refs = [a.export_weights_to_store.remote() for a in self.policy.actors]
        weights = refs[0]                        # rank 0 holds the full (gathered) tensors
        return refs[1:] + [e.load_weights_from_store.remote(weights, version) for e in self.engines.actors]

    def _sync(self, version: int) -> None:
        from prefopt.cluster import remote_get
        if self.transport == "process_group":
            refs = [a.sync_broadcast.remote() for a in self.policy.actors]
            refs += [e.receive_weights.remote(self.sync_specs, version) for e in self.engines.actors]
            remote_get(refs, self.timeout, "weight sync (process group)")
        else:
            remote_get(self._submit_object_store_sync(version), self.timeout, "weight sync (object store)")

    def shutdown(self) -> None:
        import ray
        self._pending_sync = None
        extra = list(self.reward_models.values()) + ([self.process_model] if self.process_model else [])
        for actor in self.references + extra:
            ray.kill(actor)
        self.engines.kill()
        self.policy.kill()
        if self.critic is not None:
            self.critic.kill()

    def setup(self, recipe: Recipe, *, total_steps: int, pad_id: int) -> list[dict]:
        """Join the learner groups, open the weight-sync group; returns every actor's placement."""
        t = recipe.train
        info = self.policy.setup(total_steps=total_steps, pad_id=pad_id,
                                 grad_accum=t.batch_size // (t.micro_batch_size * len(self.policy)))
        if self.critic is not None:
            info += self.critic.setup(total_steps=total_steps, pad_id=pad_id, lr=recipe.roles.critic.lr,
                                      grad_accum=t.batch_size // (t.micro_batch_size * len(self.critic)))
        if self.transport == "process_group":
            self.open_sync_group()
        if self.lora_sync == "adapter":      # the untrained adapter (the base model): vLLM refuses one it
            try:                             # cannot serve now, not after the first update
                self._sync(0)
            except Exception as e:
                raise RuntimeError(f"roles.rollout.lora_sync=adapter: the rollout engines could not load the "
                                   f"policy's LoRA adapter (set roles.rollout.lora_sync: merged): "
                                   f"{str(e).strip().splitlines()[-1]}") from e
        from prefopt.cluster import remote_get
        models = self.references + list(self.reward_models.values()) + ([self.process_model] if self.process_model else [])
        return info + self.engines.node_info() + remote_get([a.node_info.remote() for a in models], self.timeout,
                                                            "node_info")


def verify_sync(roles: OnlineRoles, prompt_ids: list[list[int]], sampling) -> dict[str, float]:
    """Engine vs learner after a sync: greedy outputs and the log-probs of the greedy tokens."""
    engine_out = [g[0] for g in roles.generate(prompt_ids, sampling, seed=0, greedy=True)]
    learner_out = roles.policy.call("greedy_generate", [(prompt_ids, sampling.max_tokens)] * len(roles.policy),
                                    what="learner greedy generate")[0]
    matches = [e["response_ids"] == l for e, l in zip(engine_out, learner_out)]
    from prefopt.data.rollouts import RolloutSample
    samples = [RolloutSample(prompt_ids=p, response_ids=e["response_ids"])
               for p, e in zip(prompt_ids, engine_out) if e["response_ids"]]
    learner_logps = [x for m in roles.policy.infer("compute_token_logps", samples, 8) for x in m]
    engine_logps = [e["logprobs"] for e in engine_out if e["response_ids"]]
    diff = max(abs(a - b) for le, ee in zip(learner_logps, engine_logps) for a, b in zip(le, ee))
    return {"greedy_match": sum(matches) / len(matches), "logp_max_abs_diff": diff}
