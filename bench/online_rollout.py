"""Part 1 of ``bench/online.py``, driver side: the rollout workloads, the interleaved generate calls to
the three live sessions (a), (b), (c) (``online_rollout_sessions``) and the rollout table.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from offline import ForeignLoad, wait_for_quiet  # bench/offline.py helpers
from online_common import Served, _load
from online_rollout_sessions import WARMUP_TOKENS

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
