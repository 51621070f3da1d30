#!/usr/bin/env python
"""Online RLHF throughput: rollout tokens/s, one PPO iteration's time split, samples/s vs TRL GRPO.

    python bench/online.py             # full bench (~10 minutes on 2 CPU cores)
    python bench/online.py --quick     # smoke run: tiny model only, few calls / iterations (~3 minutes, mostly start-up)
    python bench/online.py --parts rollout --models tiny,100m --out /tmp/b
    python bench/online.py --parts trl --trl-models 100m        # TRL vs prefopt on llama-100m (~3 minutes)
    python bench/online.py --parts 20m --rounds 3               # ~20M model: GRPO and online DPO vs TRL (~25 min)

Three parts (and a fourth, ``20m``, on request: ``online_20m.py``'s docstring); every configuration (one table row) runs in its own subprocess
(``--worker KIND --config FILE``), so that no row inherits another's threads, Ray cluster or caches:

1. **rollout** — tokens/s of sampling the same prompts (the first 32 of prefopt's ``synthetic:pairs``
   prompts), same ``n``, ``max_tokens`` and temperature 1, three ways:
   (a) ``vllm.LLM.generate`` in a plain process (no Ray), with the RolloutWorker's engine arguments,
   engine environment (``_engine_env``: in-process engine, KV space, TORCHDYNAMO_DISABLE) and
   exactly its ``SamplingParams`` (``logprobs=0``, the engine generator seeded per call) with the same seeds as (b), so
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
2. **loop** — ``prefopt.train`` on ``recipes/tiny_grpo.yaml`` (and llama-100m with
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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench/: offline.py and the online_*.py parts
from offline import _cpu_name  # noqa: E402
from online_common import BUSY, CPUS, REPO, _env_for_workers, run_row, versions  # noqa: E402
from online_loop import LOOP, LOOP_QUICK, loop_table, loop_worker  # noqa: E402
from online_rollout import (ROLLOUT, ROLLOUT_QUICK, ROLLOUT_ROWS, rollout_table,  # noqa: E402
                            run_rollouts, same_samples)
from online_rollout_sessions import SESSIONS, serve_session  # noqa: E402
from online_trl import TRL, TRL_DEFAULT_MODELS, TRL_QUICK, trl_table, trl_worker  # noqa: E402
import online_20m  # noqa: E402

WORKERS = {"loop": loop_worker, "trl": trl_worker}


def run_worker(kind: str, config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    if kind in SESSIONS:
        return serve_session(kind, cfg)
    out = WORKERS[kind](cfg)
    Path(cfg["result"]).write_text(json.dumps(out, indent=1, default=str))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, few calls / iterations (smoke run)")
    ap.add_argument("--parts", default="rollout,loop,trl", help="comma-separated subset of: rollout,loop,trl,20m "
                    "(20m: a ~20M-parameter model, prefopt GRPO and online DPO vs TRL; not in the default run)")
    ap.add_argument("--models", default=None, help="models for rollout and loop parts: tiny,100m (loop also: "
                    + ",".join(k for k in LOOP if LOOP[k].get("recipe")) + ")")
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
    ap.add_argument("--rows", default=None, help="20m part: comma-separated row ids (default all: "
                    + ",".join(online_20m.ROWS) + "); TRL rows also run with each --trl-threads count")
    ap.add_argument("--rounds", type=int, default=2, help="20m part: interleaved rounds of its rows (default 2)")
    ap.add_argument("--iterations", type=int, default=None, help="20m part: iterations (TRL: generation cycles) "
                    f"per row (default {online_20m.ITERATIONS}; the first is excluded)")
    ap.add_argument("--render", metavar="RESULTS_JSON", nargs="+", help="print the tables of an earlier run and "
                    "exit; several files: the first's tables, with the 20m part's runs of all of them pooled (each "
                    "row's fastest run over all rounds of all files)")
    ap.add_argument("--worker", choices=sorted({**WORKERS, **SESSIONS}), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return run_worker(a.worker, a.config)
    if a.render:
        ds = [json.loads(Path(f).read_text()) for f in a.render]
        d = ds[0]
        return print(render(d["meta"], d["rollout"], d["loop"], d["trl"],
                            online_20m.pool([x.get("p20m") for x in ds])))
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
    rollout, loop, trl, p20m = {}, {}, {}, None

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
            if spec.get("recipe"):
                spec["assets"] = str(online_20m.build_assets())
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
            if spec.get("recipe"):
                spec["assets"] = str(online_20m.build_assets())
            if key not in loop:       # the prefopt side of the comparison
                lspec = dict(LOOP[key], iterations=spec["cycles"], assets=spec.get("assets"))
                r = run_row(f"loop-{key}", "loop", {"spec": lspec}, out, a)
                loop[key] = r
                note(f"loop-{key}", r, f"{r['samples_per_s']:7.1f} samples/s")
            runs = {th: [] for th in spec["threads"]}
            for rnd in range(spec["rounds"]):
                for th in spec["threads"]:
                    name = f"trl-{key}-{th}t" + (f"-r{rnd}" if spec["rounds"] > 1 else "")
                    r = run_row(name, "trl", {"threads": th, "cycles": spec["cycles"],
                                              "trainer": spec.get("trainer", "grpo"),
                                              "recipe": (str(Path(spec["assets"]) / spec["recipe"])
                                                         if spec.get("recipe") else None),
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
    if "20m" in parts:
        p20m = online_20m.run_part(a, out, note)
    meta["total_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = os.getloadavg()
    for key, rows in rollout.items():
        meta[f"rollout-{key}-a-b-same-tokens"] = same_samples(rows["raw"], rows["ray-vllm"])
    text = render(meta, rollout, loop, trl, p20m)
    print("\n" + text)
    print(f"\n{meta['total_s']:.0f}s in all; results in {out}")
    (out / "results.json").write_text(json.dumps({"meta": meta, "rollout": rollout, "loop": loop, "trl": trl,
                                                  "p20m": p20m}, indent=1, default=str))
    (out / "results.md").write_text(text + "\n")


def render(meta: dict, rollout: dict, loop: dict, trl: dict, p20m: dict | None = None) -> str:
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
        tables.append(f"samples/s, prefopt loop vs TRL {rows[0].get('trainer', 'GRPOTrainer')} ({LOOP[key]['label']} "
                      "workload; first iteration / cycle excluded; TRL: fastest of its rounds)\n\n"
                      + trl_table(loop.get(key), rows))
    if p20m:
        tables.append(online_20m.table(p20m))
    tables.append(f"Targets: (b)/(a) >= 0.95; prefopt samples/s >= 2x TRL GRPOTrainer. other load = cores used by "
                  f"processes outside this bench while a row ran (⚠: >= {BUSY} cores, numbers likely depressed).")
    return "\n\n".join(tables)


if __name__ == "__main__":
    main()
