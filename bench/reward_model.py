#!/usr/bin/env python
"""Reward-model benchmarks: Bradley–Terry training throughput (prefopt vs TRL's ``RewardTrainer``)
and process-reward-model scoring (one forward per response vs one forward per step prefix).

    python bench/reward_model.py                # full bench (llama-30m), on an idle machine
    python bench/reward_model.py --quick        # smoke run: tiny-llama, few steps (~2-3 minutes)
    python bench/reward_model.py --only prm --threads 1 --repeat 5 --out /tmp/b

1. **train**: ``objective.name: reward_model`` (recipes/tiny_rm.yaml, run by ``prefopt.train.train``
   on an embedded Ray cluster, 1 DeepSpeed learner, ZeRO-0) vs TRL's ``RewardTrainer`` on the same
   model directory (``builtin:llama-30m``; TRL loads it as ``AutoModelForSequenceClassification``,
   num_labels=1), the same JSONL file (``prefopt.data.synthetic.make_pairs``, responses with a leading
   space so that TRL's ``prompt + response + eos`` and prefopt's separately tokenized prompt / response
   give the same token ids, checked), the same global batch, micro-batch, lr (linear, no warmup),
   steps (one epoch), max_length, fp32, seed, and the same thread count (``--threads``). Every row
   runs in its own subprocess.

   * pairs/s = steps x global batch / training wall time. TRL: ``on_train_begin`` -> ``on_train_end``
     of a TrainerCallback; prefopt: ``summary.json`` ``train_time_s`` (the sum of the driver-side
     optimizer-step times, Ray round trips included). Excluded for both: process / Ray start, model
     loading, tokenization, trainer / DeepSpeed set-up, evaluation.
   * peak MB = peak RSS (``ru_maxrss``) of the process that trained: TRL's worker process; prefopt's
     learner actor (``summary.json`` ``peak_memory_mb``). Both include the Python/torch baseline.
   * rows: ``trl`` (``per_device_train_batch_size`` = micro, ``gradient_accumulation_steps`` =
     batch / micro, ``gradient_checkpointing=False``, ``bf16=False``, ``center_rewards_coefficient``
     None, no eval, ``logging_strategy="no"``, 0 dataloader workers); ``prefopt`` (same micro-batch
     size, padding-free packed forwards: the default ``model.padding_free``); ``prefopt-tokens``
     (``train.micro_batch_tokens`` = micro x 2 x max_length, what TRL's padded micro-batch holds at
     max_length, as bench/offline.py's token budgets).

2. **prm**: ``K`` = 8 step scores of each of 64 responses (steps of 3-6 synthetic words, each
   followed by "."), from a reward model built from the same causal LM (fresh seeded score head,
   ``prefopt_reward: {kind: outcome}`` so that scores are raw logits), in one process with
   ``--threads`` threads, same ``batch_tokens``:

   * one forward: ``RewardScorer.score_steps(prompts, steps, ".")``, the head read at every step end;
   * per prefix (the old path): ``RewardScorer.score`` of ``prompt + step_1. ... step_k.`` for every
     k (K rows per response), read at its last token, i.e. the k-th "." (the scorer's tokenizer
     without eos, as the old code scored the prefix text). The bench checks both render the same
     tokens and give the same scores (abs 1e-4).
   * ms / response = the fastest of ``--repeat`` interleaved timed calls (after one untimed warm-up)
     / 64, rendering and tokenization included; speed-up = per prefix / one forward.

Before each subprocess the bench waits (``--wait-quiet`` s at most) for other processes to leave the
CPUs idle, and records the cores they used meanwhile ("other load"). Results go to ``--out`` /
``$BENCH_OUT`` (default ``runs/bench/<timestamp>``): ``results.json``, ``results.md``, logs in
``logs/``, raw worker results (and prefopt's summary.json / metrics.jsonl) in ``raw/``, the JSONL in
``data/``.
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

from offline import ForeignLoad, _cpu_name, token_budgets, versions, wait_for_quiet  # bench/ is on sys.path
from offline_workers import CPUS, REPO, write_row_config

# the training workload shared by every row; quick: the tiny model, few steps
TRAIN = dict(model="builtin:llama-30m", label="llama-30m (30M)", steps=16, batch=32, micro=8,
             max_length=32, max_prompt_length=16, lr=1.0e-4)   # make_pairs sequences: 10-25 tokens
TRAIN_QUICK = dict(model="builtin:tiny-llama", label="tiny-llama (0.16M)", steps=8, batch=16, micro=8, lr=1.0e-3)
PRM = dict(model="builtin:llama-30m", responses=64, steps=8, words=[3, 6], batch_tokens=8192)
PRM_QUICK = dict(model="builtin:tiny-llama")

ROWS = [
    dict(id="trl", kind="trl", label="TRL RewardTrainer"),
    dict(id="prefopt", kind="prefopt", label="prefopt reward_model, 1 learner, padding-free"),
    dict(id="prefopt-tokens", kind="prefopt", label="prefopt reward_model, 1 learner, token-budget micro-batches",
         overrides=["train.micro_batch_tokens={train_tokens}"]),
]
BASELINE = "trl"


# ============================================================================ data

def write_pairs(spec: dict, out_dir: Path, tokenizer) -> tuple[Path, Path, dict]:
    """``make_pairs`` rows (responses with a leading space) as JSONL: a train file of exactly steps x
    batch rows (one epoch) and a one-micro-batch eval file; checks both frameworks' token ids."""
    from prefopt.data.synthetic import make_pairs

    n_train, n_eval = spec["steps"] * spec["batch"], spec["micro"]
    rows = [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
            for r in make_pairs(n_train + n_eval, seed=0)]
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evals = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, part in ((train, rows[:n_train]), (evals, rows[n_train:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    lengths, prompts, mismatches = [], [], 0
    for r in rows[:n_train]:
        p = tokenizer(r["prompt"])["input_ids"]
        prompts.append(len(p))
        for k in ("chosen", "rejected"):
            ours = p + tokenizer(r[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            trl = tokenizer(r["prompt"] + r[k] + tokenizer.eos_token)["input_ids"]   # RewardTrainer's rendering
            mismatches += ours != trl
            lengths.append(len(ours))
            if len(p) > spec["max_prompt_length"] or len(ours) > spec["max_length"]:
                raise SystemExit(f"bench data: a row would be truncated or filtered ({len(p)} / {len(ours)} tokens)")
    if mismatches:
        raise SystemExit(f"bench data: {mismatches} sequences tokenize differently in TRL and prefopt")
    stats = {"train_rows": n_train, "eval_rows": n_eval, "token_mismatches": mismatches,
             "prompt_tokens": [min(prompts), statistics.mean(prompts), max(prompts)],
             "sequence_tokens": [min(lengths), statistics.mean(lengths), max(lengths)]}
    return train, evals, stats


# ============================================================================ subprocesses

def run_sub(kind: str, name: str, cfg: dict, out: Path, threads: int, timeout: float, wait_quiet: float) -> dict:
    """``reward_model.py --worker kind`` in its own process; its result plus the load around it."""
    tmp = tempfile.mkdtemp(prefix=f"bench-rm-{name}-")
    cfg = dict(cfg, id=name, tmp=tmp, threads=threads, result=str(out / "raw" / f"{name}.json"))
    cfg_path = write_row_config(out, name, cfg)
    load_before = wait_for_quiet(wait_quiet) if wait_quiet > 0 else None
    env = dict(os.environ)
    # TRL and the PRM worker run torch in-process; prefopt's driver needs no threads (its learner gets
    # `threads` from roles.learner.num_cpus / ray.env)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(1 if kind == "prefopt" else threads)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(k, v)
    env["TQDM_DISABLE"] = "1"
    monitor = ForeignLoad()
    monitor.start()
    start = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--config",
                               str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                              timeout=timeout)
    wall = time.perf_counter() - start
    monitor.stop.set()
    monitor.join()
    shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        tail = (out / "logs" / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"bench {name} failed (exit {proc.returncode}); log tail:\n{tail}")
    res = json.loads(Path(cfg["result"]).read_text())
    res.update(process_wall_s=wall, other_load_cores=monitor.mean, other_load_max=max(monitor.samples, default=0.0),
               other_load_before=load_before)
    return res


def bench_train(spec: dict, out: Path, a) -> tuple[list[dict], dict]:
    from prefopt.models.load import load_tokenizer
    from prefopt.models.tiny import resolve_model_path

    model_dir = resolve_model_path(spec["model"])
    train, evals, stats = write_pairs(spec, out / "data", load_tokenizer(model_dir))
    print(f"== train: {spec['label']}, {spec['steps']} steps x {spec['batch']} pairs (micro {spec['micro']}), "
          f"max_length {spec['max_length']}, {a.threads} threads; sequence tokens min/mean/max "
          f"{stats['sequence_tokens'][0]}/{stats['sequence_tokens'][1]:.0f}/{stats['sequence_tokens'][2]}", flush=True)
    base = {"spec": spec, "model_dir": model_dir, "train_path": str(train), "eval_path": str(evals)}
    runs: dict[str, list[dict]] = {r["id"]: [] for r in ROWS}
    for rnd in range(max(1, a.repeat)):   # interleaved rounds; the fastest run of each row is kept
        for row in ROWS:
            cfg = dict(base, overrides=[o.format(**token_budgets(spec)) for o in row.get("overrides", [])])
            name = f"train-{row['id']}" + (f"-r{rnd}" if rnd else "")
            res = run_sub(row["kind"], name, cfg, out, a.threads, a.timeout, a.wait_quiet)
            res["pairs_per_s"] = res["pairs"] / res["train_s"]
            runs[row["id"]].append(res)
            print(f"  {row['label']:<62} {res['pairs_per_s']:8.1f} pairs/s  peak {res['peak_mb']:6.0f} MB  "
                  f"(train {res['train_s']:.2f}s, median step {res['step_s_median']:.3f}s; process "
                  f"{res['process_wall_s']:.0f}s; other processes {res['other_load_cores']:.2f} cores)", flush=True)
    results = []
    for row in ROWS:
        best = dict(max(runs[row["id"]], key=lambda r: r["pairs_per_s"]))
        best.update(row=row["id"], label=row["label"], kind=row["kind"],
                    all_pairs_per_s=[r["pairs_per_s"] for r in runs[row["id"]]],
                    all_other_load=[r["other_load_cores"] for r in runs[row["id"]]])
        results.append(best)
    return results, {"spec": spec, "model_dir": model_dir, "data": stats,
                     "token_budgets": token_budgets(spec)}


def train_table(results: list[dict]) -> str:
    base = next((r for r in results if r["row"] == BASELINE), None)
    lines = ["| row | pairs/s | x trl | peak MB | mem / trl | train s | median step s | other load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        x = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}" if base else "-"
        m = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
        lines.append(f"| {r['row']} | {r['pairs_per_s']:.1f} | {x} | {r['peak_mb']:.0f} | {m} | {r['train_s']:.2f} "
                     f"| {r['step_s_median']:.3f} | {r['other_load_cores']:.2f} |")
    return "\n".join(lines)


def budget_note(results: list[dict], info: dict) -> str:
    trl = next((r for r in results if r["row"] == BASELINE), None)
    if not trl or not trl.get("padded_tokens_per_micro"):
        return ""
    lo, mean, hi = trl["padded_tokens_per_micro"]
    return (f"\n\nTRL's padded micro-batches held {lo}/{mean:.0f}/{hi} tokens (min/mean/max); prefopt-tokens' "
            f"train.micro_batch_tokens = {info['token_budgets']['train_tokens']} (micro x 2 x max_length).")


def bench_prm(spec: dict, out: Path, a) -> dict:
    print(f"== prm: {spec['model']}, {spec['responses']} responses x {spec['steps']} steps of "
          f"{spec['words'][0]}-{spec['words'][1]} words, batch_tokens {spec['batch_tokens']}, {a.threads} threads, "
          f"{max(1, a.repeat)} timed rounds", flush=True)
    res = run_sub("prm", "prm", {"prm": spec, "repeat": a.repeat}, out, a.threads, a.timeout, a.wait_quiet)
    ok = "same scores" if res["same_scores"] else "SCORES DIFFER"
    print(f"  one forward {res['ms_per_response']['one_forward']:.2f} ms/response, per prefix "
          f"{res['ms_per_response']['per_prefix']:.2f} ms/response: {res['speedup']:.2f}x; {ok} (max abs diff "
          f"{res['max_abs_diff']:.2e}, token mismatches {res['token_mismatches']}); other processes "
          f"{res['other_load_cores']:.2f} cores", flush=True)
    return res


def prm_table(r: dict) -> str:
    lines = ["| path | rows | tokens | ms / response | median ms / response | speed-up | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for key, label in (("per_prefix", f"per prefix (K = {r['steps']} forwards)"), ("one_forward", "one forward")):
        speed = f"{r['speedup']:.2f}" if key == "one_forward" else "1.00"
        diff = f"{r['max_abs_diff']:.1e}" if key == "one_forward" else "-"
        lines.append(f"| {label} | {r['rows'][key]} | {r['tokens'][key]} | {r['ms_per_response'][key]:.2f} "
                     f"| {r['ms_per_response_median'][key]:.2f} | {speed} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama, few steps (smoke run, ~2-3 minutes)")
    ap.add_argument("--only", choices=("train", "prm"), help="run one of the two benchmarks")
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT"),
                    help="output folder (default $BENCH_OUT or runs/bench/<timestamp>)")
    ap.add_argument("--repeat", type=int, default=None, help="training: run each row N times in interleaved "
                    "rounds, keep the fastest; prm: N timed calls of each path (default 1 / 5; quick 1 / 3)")
    ap.add_argument("--threads", type=int, default=min(2, CPUS), help="intra-op threads of every training "
                    "process and of the PRM scorer (default 2)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    ap.add_argument("--wait-quiet", type=float, default=10, help="before each subprocess, wait up to this many "
                    "seconds for other processes to leave the CPUs idle; 0: don't")
    ap.add_argument("--worker", choices=("trl", "prefopt", "prm"), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        from reward_workers import run_worker
        return run_worker(a.worker, a.config)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = Path(a.out) if a.out else REPO / "runs" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"versions": versions(), "cpus": CPUS, "threads": a.threads, "machine": platform.machine(),
            "processor": _cpu_name(), "quick": a.quick}
    report, doc = [], {"meta": meta}
    t0 = time.perf_counter()
    if a.only in (None, "train"):
        spec = dict(TRAIN, **(TRAIN_QUICK if a.quick else {}))
        train_args = argparse.Namespace(**{**vars(a), "repeat": a.repeat or 1})
        results, meta["train"] = bench_train(spec, out, train_args)
        doc["train"] = results
        report.append(f"### Reward-model training: {spec['label']}, {spec['steps']} x {spec['batch']} pairs "
                      f"(micro {spec['micro']}), max_length {spec['max_length']}, {a.threads} threads\n\n"
                      + train_table(results) + budget_note(results, meta["train"]))
    if a.only in (None, "prm"):
        spec = dict(PRM, **(PRM_QUICK if a.quick else {}))
        prm_args = argparse.Namespace(**{**vars(a), "repeat": a.repeat or (3 if a.quick else 5)})
        doc["prm"] = bench_prm(spec, out, prm_args)
        report.append(f"### PRM scoring: {spec['model']}, {spec['responses']} responses x {spec['steps']} steps, "
                      f"{a.threads} threads\n\n" + prm_table(doc["prm"]))
    meta["total_s"] = time.perf_counter() - t0
    text = "\n\n".join(report)
    print("\n" + text)
    print("\npairs/s = steps x batch / training wall time (no start-up, loading, tokenization, evaluation); "
          "peak MB = peak RSS of the training process (prefopt: the learner actor); ms / response = fastest "
          "timed call / responses; other load = cores used by processes outside this bench (shared machine).")
    print(f"\ndone in {meta['total_s']:.0f}s; results in {out}")
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
