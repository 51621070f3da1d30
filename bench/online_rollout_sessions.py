"""Part 1 of ``bench/online.py``, worker side: the rollout sessions (a) ``vllm.LLM.generate`` in a plain
process, (b) prefopt's ``RolloutWorker`` as a Ray actor, (c) HF ``generate`` in a Ray actor.

Each runs in its own subprocess (``online.py --worker raw-vllm|ray-vllm|ray-hf``), loads once, then
serves generate calls from the driver (``online_rollout.run_rollouts``) one by one.
"""
from __future__ import annotations

import json
import os
import sys
import time


def bench_prompts(count: int, tokenizer) -> list[list[int]]:
    """The first ``count`` prompts of prefopt's synthetic:pairs set (what tiny_grpo.yaml trains on)."""
    from prefopt.cache import cache_dir
    from prefopt.config_schema import DataConfig, SyntheticDataConfig
    from prefopt.data.prompts import load_prompts

    cfg = DataConfig(path="synthetic:pairs", synthetic=SyntheticDataConfig(num_rows=max(256, count), seed=0),
                     max_prompt_length=32)
    return [p["prompt_ids"] for p in load_prompts(cfg, tokenizer, cache_dir=cache_dir()).prompts[:count]]


WARMUP_TOKENS = 8     # the warm-up call: same prompts and n, fewer tokens (engine / allocator first-call costs)
SEED0 = 1000          # call i samples with seed SEED0 + i in (a) and (b): identical outputs, identical work


def _digest(ids: list[list[int]]) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]


def _rollout_cfg(spec: dict):
    from prefopt.config_schema import RolloutRoleConfig, SamplingConfig
    return RolloutRoleConfig(max_model_len=256, sampling=SamplingConfig(
        n=spec["n"], temperature=1.0, max_tokens=spec["max_tokens"], seed=0))


class HFGenerator:
    """Baseline (c): transformers ``generate`` in a Ray actor (do_sample, left padding, one batch)."""

    def __init__(self, model_path: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()

    def generate(self, prompt_ids: list[list[int]], n: int, max_tokens: int, seed: int) -> list[list[list[int]]]:
        torch = self.torch
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompt_ids)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                      top_k=0, top_p=1.0, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      num_return_sequences=n, pad_token_id=pad)
        gen = out[:, width:].tolist()
        return [gen[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def threads(self) -> int:
        return self.torch.get_num_threads()


def _timed_in_actor(self, method: str, *args, **kwargs):
    """Run ``self.<method>(*args, **kwargs)`` inside the actor; return ((wall s, CPU s), its full output).
    Called through ``actor.__ray_call__``, so the driver-side timing includes Ray and the transfer
    of the whole output, exactly as a direct ``actor.<method>.remote`` call would."""
    start, cpu = time.perf_counter(), time.process_time()
    out = getattr(self, method)(*args, **kwargs)
    return (time.perf_counter() - start, time.process_time() - cpu), out


# ============================================================================ rollout sessions
# Each of (a), (b), (c) is a long-lived subprocess (``--worker KIND``) that loads once, then serves
# generate calls on request (one JSON line per call on stdin, one "@@ {json}" line back), so that the
# driver can interleave the three call by call: each sees the same share of whatever else the
# machine is doing.

class RawVLLMSession:
    """(a): LLM.generate in this process, as the RolloutWorker builds it, no Ray."""

    def __init__(self, cfg: dict):
        import torch

        from prefopt.models.load import load_tokenizer
        from prefopt.roles.rollout import _engine_env

        self.spec = cfg["spec"]
        self.rcfg = _rollout_cfg(self.spec)
        _engine_env(self.rcfg)                  # same engine env as the actor (in-process engine, KV space, ...)
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self.SamplingParams = SamplingParams
        prompts = bench_prompts(self.spec["prompts"], load_tokenizer(cfg["model_dir"]))
        t0 = time.perf_counter()
        self.llm = LLM(model=cfg["model_dir"], dtype="float32", enforce_eager=self.rcfg.enforce_eager,
                       max_model_len=self.rcfg.max_model_len, seed=0,
                       gpu_memory_utilization=self.rcfg.gpu_memory_utilization)
        self.requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        self.info = {"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}

    def params(self, i: int, max_tokens: int | None, variant: str):
        s, P = self.rcfg.sampling, self.SamplingParams
        mt = max_tokens or s.max_tokens
        if variant == "bare":              # what a bare LLM.generate user gets: no per-request seed, no logprobs
            return P(n=s.n, temperature=s.temperature, max_tokens=mt)
        # exactly the RolloutWorker's SamplingParams (same seeds as (b): the same tokens get sampled)
        kw = dict(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=mt,
                  stop=list(s.stop) or None, min_tokens=s.min_tokens, ignore_eos=s.ignore_eos,
                  logprobs=0 if s.logprobs else None, detokenize=bool(s.stop))
        if variant == "detokenize":        # what the worker did before it left text to the loop: vLLM
            kw["detokenize"] = True        # detokenizes every sampled token and every logprob entry
        return P(**kw)

    def call(self, i: int, max_tokens: int | None, variant: str) -> dict:
        params = self.params(i, max_tokens, variant)
        if variant != "bare":              # as the RolloutWorker: the engine's generator seeded per call
            import torch
            torch.manual_seed(SEED0 + i)
        start, cpu = time.perf_counter(), time.process_time()
        outs = self.llm.generate(self.requests, params, use_tqdm=False)
        s, cpu = time.perf_counter() - start, time.process_time() - cpu
        ids = [list(c.token_ids) for o in outs for c in o.outputs]
        return {"s": s, "inner_s": None, "cpu_s": cpu, "tokens": sum(map(len, ids)), "digest": _digest(ids)}

    def close(self) -> None:
        pass


def _ray_start():
    from prefopt.cluster import init_ray
    from prefopt.config_schema import RayConfig
    init_ray(RayConfig(), num_cpus_needed=1)
    # HFGenerator and _timed_in_actor travel to the Ray actors by value (as they did when they lived in the
    # __main__ script), so the actor processes never need to import this module
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RayVLLMSession:
    """(b): prefopt's RolloutWorker as a Ray actor, created as OnlineRoles creates it."""

    def __init__(self, cfg: dict):
        import ray

        from prefopt.cluster import remote_get
        from prefopt.models.load import load_tokenizer
        from prefopt.roles.rollout import RolloutWorker

        self.ray, self.remote_get = ray, remote_get
        self.spec = cfg["spec"]
        self.rcfg = _rollout_cfg(self.spec)
        self.prompts = bench_prompts(self.spec["prompts"], load_tokenizer(cfg["model_dir"]))
        t0 = time.perf_counter()
        _ray_start()
        ray_s = time.perf_counter() - t0
        self.actor = ray.remote(num_cpus=self.rcfg.num_cpus, num_gpus=self.rcfg.num_gpus)(RolloutWorker).remote(
            cfg["model_dir"], self.rcfg, seed=0)
        remote_get(self.actor.pid.remote(), 600, "RolloutWorker start")
        threads = ray.get(self.actor.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()))
        self.info = {"load_s": time.perf_counter() - t0 - ray_s, "ray_init_s": ray_s, "threads": threads}

    def call(self, i: int, max_tokens: int | None, variant: str) -> dict:
        import dataclasses
        s = self.rcfg.sampling if max_tokens is None else dataclasses.replace(self.rcfg.sampling, max_tokens=max_tokens)
        start = time.perf_counter()
        (inner, cpu), out = self.remote_get(self.actor.__ray_call__.remote(
            _timed_in_actor, "generate", self.prompts, s, seed=SEED0 + i), 600, "generate")
        wall = time.perf_counter() - start
        ids = [g["response_ids"] for gens in out for g in gens]
        return {"s": wall, "inner_s": inner, "cpu_s": cpu, "tokens": sum(map(len, ids)), "digest": _digest(ids)}

    def close(self) -> None:
        from prefopt.cluster import shutdown_ray
        self.ray.kill(self.actor)
        shutdown_ray()


class RayHFSession(RayVLLMSession):
    """(c): HF generate in a Ray actor with the same resources as the RolloutWorker."""

    def __init__(self, cfg: dict):
        import ray

        from prefopt.cluster import remote_get
        from prefopt.models.load import load_tokenizer

        self.ray, self.remote_get = ray, remote_get
        self.spec = cfg["spec"]
        self.prompts = bench_prompts(self.spec["prompts"], load_tokenizer(cfg["model_dir"]))
        t0 = time.perf_counter()
        _ray_start()
        ray_s = time.perf_counter() - t0
        self.actor = ray.remote(num_cpus=1)(HFGenerator).remote(cfg["model_dir"])
        threads = remote_get(self.actor.threads.remote(), 600, "HFGenerator start")
        self.info = {"load_s": time.perf_counter() - t0 - ray_s, "ray_init_s": ray_s, "threads": threads}

    def call(self, i: int, max_tokens: int | None, variant: str) -> dict:
        start = time.perf_counter()
        (inner, cpu), out = self.remote_get(self.actor.__ray_call__.remote(
            _timed_in_actor, "generate", self.prompts, self.spec["n"], max_tokens or self.spec["max_tokens"],
            SEED0 + i), 600, "generate")
        wall = time.perf_counter() - start
        ids = [g for gens in out for g in gens]
        return {"s": wall, "inner_s": inner, "cpu_s": cpu, "tokens": sum(map(len, ids)), "digest": _digest(ids)}


SESSIONS = {"raw-vllm": RawVLLMSession, "ray-vllm": RayVLLMSession, "ray-hf": RayHFSession}


def serve_session(kind: str, cfg: dict) -> None:
    """Worker side of a rollout session: protocol lines on the original stdout, everything else
    (vLLM, Ray's actor logs) on stderr (the row's log file)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    session = SESSIONS[kind](cfg)
    proto.write("@@ " + json.dumps({"ready": True, **session.info}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        proto.write("@@ " + json.dumps(session.call(cmd["i"], cmd.get("max_tokens"), cmd.get("variant", "worker")))
                    + "\n")
    session.close()
    proto.write("@@ " + json.dumps({"closed": True}) + "\n")
