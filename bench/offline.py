#!/usr/bin/env python
"""Offline DPO throughput and peak memory: prefopt vs TRL's ``DPOTrainer``, same everything.

    python bench/offline.py            # full bench (tiny-llama, llama-30m, llama-30m long prompts), ~17 minutes on 2 idle CPU cores
    python bench/offline.py --quick    # smoke run: tiny model only, few steps (~2 minutes)
    python bench/offline.py --models tiny --out /tmp/b

Every configuration (one table row) runs in its own subprocess (``--worker trl|prefopt``) so
that its peak RSS is clean. All rows of one model share the model directory, the JSONL data
file, the global batch (pairs per optimizer step), micro-batch, lr, schedule, number of steps,
max_length, beta and precision (fp32). See bench/README.md for the definitions:

* pairs/s = (steps x global batch) / (training wall time + reference log-prob time), excluding
  process / Ray start, model loading, tokenization and evaluation. TRL: ``on_train_begin`` ->
  ``on_train_end`` of a TrainerCallback, plus the time of ``DPOTrainer._precompute_ref_logps``
  (in TRL 1.16 the precompute runs inside ``DPOTrainer.__init__``, so it is timed separately).
  prefopt: ``summary.json``'s ``train_time_s`` plus ``reference_time_s`` minus the held-out
  examples' share of the latter (the eval set is one micro-batch, given as ``data.eval_path``).
* peak MB = peak RSS (``ru_maxrss``) of the process that trained: TRL's worker process; for
  prefopt the learner actor (``summary.json`` ``peak_memory_mb``, max over learners). Both
  include that process's Python/torch baseline. For 2 learners the sampled *sum* over the
  learner processes is reported too.

Results go to ``$BENCH_OUT`` (default ``runs/bench/<timestamp>``): ``results.json``,
``results.md`` and one log per row under ``logs/``.
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
import threading
import time
from pathlib import Path

from offline_workers import CPUS, REPO, run_worker, write_row_config  # bench/ is on sys.path

from prefopt.cluster import MALLOC_ENV

# Per model: the workload shared by every row.
MODELS = {
    "tiny": dict(model="builtin:tiny-llama", label="tiny-llama (0.16M)", steps=64,
                 batch=16, micro=8, max_length=64, max_prompt_length=32, min_words=3, max_words=10,
                 lr=2.0e-3, beta=0.1),
    "30m": dict(model="builtin:llama-30m", label="llama-30m (30M)", steps=10,
                batch=8, micro=4, max_length=256, max_prompt_length=64, min_words=48, max_words=148,
                lr=1.0e-4, beta=0.1),
    # summarization-shaped data (prompts longer than responses, as TL;DR): the same model, long prompts
    "30m-long": dict(model="builtin:llama-30m", label="llama-30m, long prompts (30M)", steps=10,
                     batch=8, micro=4, max_length=512, max_prompt_length=320, min_words=24, max_words=96,
                     prompt_words=(100, 180), lr=1.0e-4, beta=0.1),
}
QUICK = {"tiny": dict(steps=16)}

TOKEN_BUDGETS = ["train.micro_batch_tokens={train_tokens}", "train.inference_micro_batch_tokens={inference_tokens}"]


def token_budgets(spec: dict) -> dict:
    """``{train_tokens}`` / ``{inference_tokens}`` of a row's overrides: TRL's padded micro-batch at
    max_length (micro x 2 rows x max_length tokens), and 4x that for no-grad passes."""
    train = spec["micro"] * 2 * spec["max_length"]
    return {"train_tokens": train, "inference_tokens": 4 * train}

# Rows, in table order. kind: trl | prefopt. TRL's keys are DPOConfig overrides *on top of* what
# every TRL row sets (see trl_worker); absent keys keep TRL's defaults.
ROWS = [
    dict(id="trl-default", kind="trl", label="TRL defaults (grad ckpt on, ref model per step)",
         threads=CPUS, trl={}),
    dict(id="trl-precompute", kind="trl", label="TRL precompute_ref_log_probs (grad ckpt on)",
         threads=CPUS, trl={"precompute_ref_log_probs": True}, models=("tiny",)),
    dict(id="trl-fair", kind="trl", label="TRL precompute, no grad ckpt (fair)",
         threads=CPUS, trl={"precompute_ref_log_probs": True, "gradient_checkpointing": False}),
    dict(id="trl-fair-ref4x", kind="trl", label="TRL fair, reference batch 4x micro (precompute_ref_batch_size)",
         threads=CPUS, trl={"precompute_ref_log_probs": True, "gradient_checkpointing": False}, ref_batch_factor=4),
    # TRL with the glibc malloc settings prefopt gives its actors (prefopt.cluster.MALLOC_ENV): how
    # much of prefopt's lead is that allocator setting alone
    dict(id="trl-fair-malloc", kind="trl", label="TRL fair, with prefopt's malloc settings",
         threads=CPUS, trl={"precompute_ref_log_probs": True, "gradient_checkpointing": False}, env=MALLOC_ENV,
         models=("30m", "30m-long")),
    dict(id="trl-fair-1t", kind="trl", label="TRL precompute, no grad ckpt, 1 thread",
         threads=1, trl={"precompute_ref_log_probs": True, "gradient_checkpointing": False}),
    dict(id="prefopt-1l-padded", kind="prefopt", label="prefopt 1 learner, ZeRO-0, 1 thread, padded (model.padding_free=false)",
         threads=1, learners=1, zero=0, overrides=["model.padding_free=false"]),
    dict(id="prefopt-1l", kind="prefopt", label="prefopt 1 learner, ZeRO-0, 1 thread",
         threads=1, learners=1, zero=0),
    dict(id="prefopt-1l-2t", kind="prefopt", label=f"prefopt 1 learner, ZeRO-0, {CPUS} threads",
         threads=CPUS, learners=1, zero=0),
    dict(id="prefopt-1l-2t-ckpt", kind="prefopt", label=f"prefopt 1 learner, ZeRO-0, {CPUS} threads, grad ckpt on",
         threads=CPUS, learners=1, zero=0, overrides=["model.gradient_checkpointing=true"], models=("30m",)),
    dict(id="prefopt-1l-2t-rows", kind="prefopt", label=f"prefopt 1 learner, ZeRO-0, {CPUS} threads, prompts not shared",
         threads=CPUS, learners=1, zero=0, overrides=["model.share_prompts=false"], models=("30m-long",)),
    # token budgets instead of example counts: a training micro-batch holds up to what TRL's padded
    # micro-batch holds at max_length (micro x 2 x max_length tokens), a no-grad one 4x that
    dict(id="prefopt-1l-tok", kind="prefopt", label="prefopt 1 learner, ZeRO-0, 1 thread, token-budget micro-batches",
         threads=1, learners=1, zero=0, overrides=TOKEN_BUDGETS),
    dict(id="prefopt-1l-2t-tok", kind="prefopt",
         label=f"prefopt 1 learner, ZeRO-0, {CPUS} threads, token-budget micro-batches",
         threads=CPUS, learners=1, zero=0, overrides=TOKEN_BUDGETS),
    dict(id="prefopt-2l", kind="prefopt", label="prefopt 2 learners, ZeRO-2, 1 thread each",
         threads=1, learners=2, zero=2),
]
BASELINES = ("trl-default", "trl-fair")
# Rows with a "models" key run only for those models (to keep the full bench short).


# ============================================================================ data

def write_data(spec: dict, out_dir: Path, tokenizer) -> tuple[Path, Path, dict]:
    """Synthetic pairs (prefopt's generator, response length from the spec) as JSONL: a train
    file of exactly steps x batch rows (one epoch) and a one-micro-batch eval file."""
    import random

    from prefopt.data import synthetic

    rng = random.Random(0)
    n_train, n_eval = spec["steps"] * spec["batch"], spec["micro"]
    rows = []
    for _ in range(n_train + n_eval):
        lo, hi = spec["min_words"], spec["max_words"]
        # responses start with a space so that prompt+response (TRL) and the response alone (prefopt)
        # tokenize the same way at the boundary
        prompt = synthetic._prompt(rng)
        if "prompt_words" in spec:       # a long document before the question
            n = rng.randint(*spec["prompt_words"])
            prompt = "Summarize: " + " ".join(rng.choice(synthetic.NOUNS) for _ in range(n)) + ". " + prompt
        rows.append({"prompt": prompt,
                     "chosen": " " + synthetic._response(rng, 0.9, lo, hi),
                     "rejected": " " + synthetic._response(rng, 0.1, lo, hi)})
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evals = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, part in ((train, rows[:n_train]), (evals, rows[n_train:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    # token statistics; check nothing gets truncated by either framework
    lengths, resp, prompts = [], [], []
    for r in rows[:n_train]:
        p = len(tokenizer(r["prompt"])["input_ids"])
        prompts.append(p)
        for k in ("chosen", "rejected"):
            n = len(tokenizer(r[k], add_special_tokens=False)["input_ids"]) + 1  # + eos
            resp.append(n)
            lengths.append(p + n)
            if p > spec["max_prompt_length"] or p + n > spec["max_length"]:
                raise SystemExit(f"bench data: a row would be truncated ({p} + {n} tokens)")
    stats = {"train_rows": n_train, "eval_rows": n_eval,
             "prompt_tokens": [min(prompts), statistics.mean(prompts), max(prompts)],
             "response_tokens": [min(resp), statistics.mean(resp), max(resp)],
             "sequence_tokens": [min(lengths), statistics.mean(lengths), max(lengths)]}
    return train, evals, stats


# ============================================================================ workers

# ============================================================================ orchestration

class ForeignLoad(threading.Thread):
    """CPU used by processes outside this bench's process tree (the machine may be shared):
    average cores busy with them while a row runs, sampled once a second."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stop = interval, [], threading.Event()

    @staticmethod
    def snapshot() -> tuple[float, dict]:
        import psutil
        me = psutil.Process()
        ours = {me.pid} | {c.pid for c in me.children(recursive=True)}
        cpu = {}
        for p in psutil.process_iter():
            if p.pid in ours:
                continue
            try:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return time.perf_counter(), cpu

    @classmethod
    def cores_busy(cls, a, b) -> float:
        (t0, c0), (t1, c1) = a, b
        used = sum(max(0.0, v - c0.get(pid, 0.0)) for pid, v in c1.items())
        return used / max(t1 - t0, 1e-6)

    def run(self):
        prev = self.snapshot()
        while not self.stop.wait(self.interval):
            cur = self.snapshot()
            self.samples.append(self.cores_busy(prev, cur))
            prev = cur

    @property
    def mean(self) -> float:
        return statistics.mean(self.samples) if self.samples else 0.0


def wait_for_quiet(max_wait: float, threshold: float = 0.25, quiet_for: int = 2) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores for
    ``quiet_for`` consecutive seconds. Returns the load seen in the last second."""
    deadline, streak, busy = time.perf_counter() + max_wait, 0, 0.0
    prev = ForeignLoad.snapshot()
    while time.perf_counter() < deadline:
        time.sleep(1.0)
        cur = ForeignLoad.snapshot()
        busy, prev = ForeignLoad.cores_busy(prev, cur), cur
        streak = streak + 1 if busy < threshold else 0
        if streak >= quiet_for:
            break
    return busy


def versions() -> dict:
    from importlib.metadata import version
    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "ray"):
        try:
            v[pkg] = version(pkg)
        except Exception:
            v[pkg] = None
    return v


def run_row(row: dict, spec: dict, model_dir: str, data: tuple[Path, Path], out: Path, key: str,
            timeout: float, wait_quiet: float = 0.0, rnd: int = 0) -> dict:
    name = f"{key}-{row['id']}" + (f"-r{rnd}" if rnd else "")
    tmp = tempfile.mkdtemp(prefix=f"bench-{name}-")
    cfg = {"id": name, "spec": spec, "model_dir": model_dir, "train_path": str(data[0]),
           "eval_path": str(data[1]), "tmp": tmp, "threads": row["threads"],
           "trl": row.get("trl", {}), "ref_batch_factor": row.get("ref_batch_factor"), "learners": row.get("learners"), "zero": row.get("zero"),
           "overrides": [o.format(**token_budgets(spec)) for o in row.get("overrides", [])],
           "result": str(out / "raw" / f"{name}.json")}
    cfg_path = write_row_config(out, name, cfg)
    load_before = wait_for_quiet(wait_quiet) if wait_quiet > 0 else None
    env = dict(os.environ)
    # the TRL process runs torch in-process with `threads` intra-op threads; prefopt's driver needs
    # none (its actors get theirs from prefopt's worker env / ray.env)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(row["threads"] if row["kind"] == "trl" else 1)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["TQDM_DISABLE"] = "1"
    env.update(row.get("env", {}))   # a row's own extra variables
    monitor = ForeignLoad()
    monitor.start()
    start = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", row["kind"],
                               "--config", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=str(REPO), timeout=timeout)
    wall = time.perf_counter() - start
    monitor.stop.set()
    monitor.join()
    if proc.returncode != 0:
        tail = (out / "logs" / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"bench row {name} failed (exit {proc.returncode}); log tail:\n{tail}")
    res = json.loads(Path(cfg["result"]).read_text())
    shutil.rmtree(tmp, ignore_errors=True)   # TRL output_dir / prefopt run dir (metrics were copied)
    res.update(process_wall_s=wall, pairs_per_s=res["pairs"] / (res["train_s"] + res["reference_s"]),
               other_load_cores=monitor.mean, other_load_max=max(monitor.samples, default=0.0), other_load_before=load_before)
    return res


def fmt_table(results: list[dict]) -> str:
    head = ("| model | framework / config | threads | steps x batch | pairs/s | train s | ref s "
            "| median step s | peak MB | x TRL defaults | x TRL fair | mem / TRL fair | other load |")
    lines = [head, "|" + "---|" * 13]
    for r in results:
        base = {b: next((x for x in results if x["model"] == r["model"] and x["row"] == b), None)
                for b in BASELINES}
        ratio = {b: (f"{r['pairs_per_s'] / base[b]['pairs_per_s']:.2f}" if base[b] else "-") for b in BASELINES}
        mem = f"{r['peak_mb'] / base['trl-fair']['peak_mb']:.2f}" if base["trl-fair"] else "-"
        peak = f"{r['peak_mb']:.0f}"
        if r.get("peak_sum_mb"):
            peak += f" (sum {r['peak_sum_mb']:.0f})"
        threads = f"{r['threads']}" if r["kind"] == "trl" or r.get("learners", 1) == 1 \
            else f"{r['learners']}x{r['threads']}"
        lines.append(f"| {r['model_label']} | {r['label']} | {threads} | {r['steps_done']} x {r['batch']} "
                     f"| {r['pairs_per_s']:.1f} | {r['train_s']:.2f} | {r['reference_s']:.2f} | {r['step_s_median']:.3f} | {peak} "
                     f"| {ratio['trl-default']} | {ratio['trl-fair']} | {mem} | {r['other_load_cores']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, few steps (smoke run)")
    ap.add_argument("--models", default=None, help="comma-separated subset of: " + ",".join(MODELS))
    ap.add_argument("--rows", default=None, help="comma-separated subset of row ids: "
                    + ",".join(r["id"] for r in ROWS))
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT"), help="output folder "
                    "(default $BENCH_OUT or runs/bench/<timestamp>)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per row")
    ap.add_argument("--wait-quiet", type=float, default=10, help="before each row, wait up to this many "
                    "seconds for other processes to leave the CPUs idle (the machine may be shared); 0: don't")
    ap.add_argument("--repeat", type=int, default=1, help="run each row N times, keep the fastest "
                    "(all runs are in results.json)")
    ap.add_argument("--table-from", nargs="+", metavar="DIR", help="no runs: print the table of earlier "
                    "results (DIR/results.json); for a row present in several, the fastest run is kept")
    ap.add_argument("--worker", choices=("trl", "prefopt"), help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return run_worker(a.worker, a.config)
    if a.table_from:
        return merge_tables(a.table_from)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prefopt.models.load import load_tokenizer
    from prefopt.models.tiny import resolve_model_path

    keys = a.models.split(",") if a.models else (["tiny"] if a.quick else list(MODELS))
    rows = [r for r in ROWS if not a.rows or r["id"] in a.rows.split(",")]
    out = Path(a.out) if a.out else REPO / "runs" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"versions": versions(), "cpus": CPUS, "machine": platform.machine(),
            "processor": _cpu_name(), "quick": a.quick, "models": {}}
    results = []
    t0 = time.perf_counter()
    for key in keys:
        spec = dict(MODELS[key], **(QUICK.get(key, {}) if a.quick else {}))
        model_dir = resolve_model_path(spec["model"])
        data = write_data(spec, out / "data" / key, load_tokenizer(model_dir))
        meta["models"][key] = {"spec": spec, "model_dir": model_dir, "data": data[2]}
        print(f"== {spec['label']}: {spec['steps']} steps x {spec['batch']} pairs (micro {spec['micro']}), "
              f"max_length {spec['max_length']}, sequence tokens min/mean/max "
              f"{data[2]['sequence_tokens'][0]}/{data[2]['sequence_tokens'][1]:.0f}/{data[2]['sequence_tokens'][2]}",
              flush=True)
        todo = [row for row in rows if key in row.get("models", (key,))]
        runs: dict[str, list[dict]] = {row["id"]: [] for row in todo}
        # repeats run in interleaved rounds, so that every row sees a similar share of whatever else
        # the machine is doing; the fastest run of each row is kept
        for rnd in range(max(1, a.repeat)):
            for row in todo:
                res = run_row(row, spec, model_dir, data[:2], out, key, a.timeout, a.wait_quiet, rnd)
                runs[row["id"]].append(res)
                print(f"  {row['label']:<50} {res['pairs_per_s']:8.1f} pairs/s  peak {res['peak_mb']:6.0f} MB  "
                      f"(train {res['train_s']:.2f}s + ref {res['reference_s']:.2f}s, median step "
                      f"{res['step_s_median']:.3f}s; process {res['process_wall_s']:.0f}s; "
                      f"other processes {res['other_load_cores']:.2f} cores)", flush=True)
        for row in todo:
            best = dict(max(runs[row["id"]], key=lambda r: r["pairs_per_s"]))
            best.update(model=key, model_label=spec["label"], row=row["id"], label=row["label"],
                        kind=row["kind"], learners=row.get("learners"), batch=spec["batch"],
                        all_pairs_per_s=[r["pairs_per_s"] for r in runs[row["id"]]],
                        all_other_load=[r["other_load_cores"] for r in runs[row["id"]]])
            results.append(best)
    meta["total_s"] = time.perf_counter() - t0
    table = fmt_table(results)
    print("\n" + table)
    print("\npairs/s = steps x batch / (train s + ref s); median step s = median optimizer-step wall time "
          "(robust to bursts of other load); peak MB = peak RSS of the training process (prefopt: the "
          "learner actor; sum = sampled total over learners); other load = cores used by processes outside "
          "this bench while the row ran (the machine may be shared).")
    print(f"\n{len(results)} rows in {meta['total_s']:.0f}s; results in {out}")
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    (out / "results.md").write_text(table + "\n")


def merge_tables(dirs: list[str]) -> None:
    """Best run per (model, row) over several bench outputs of the same configuration."""
    best: dict[tuple, dict] = {}
    order: list[tuple] = []
    for d in dirs:
        for r in json.loads((Path(d) / "results.json").read_text())["results"]:
            k = (r["model"], r["row"])
            if k not in best:
                order.append(k)
                best[k] = r
                continue
            runs = best[k]["all_pairs_per_s"] + r["all_pairs_per_s"]
            loads = best[k]["all_other_load"] + r["all_other_load"]
            if r["pairs_per_s"] > best[k]["pairs_per_s"]:
                best[k] = dict(r)
            best[k].update(all_pairs_per_s=runs, all_other_load=loads)
    model_order = list(MODELS)
    row_order = [r["id"] for r in ROWS]
    order.sort(key=lambda k: (model_order.index(k[0]), row_order.index(k[1])))
    results = [best[k] for k in order]
    print(fmt_table(results))
    print("\nruns per row (pairs/s @ other load):")
    for r in results:
        runs = ", ".join(f"{p:.1f}@{l:.2f}" for p, l in zip(r["all_pairs_per_s"], r["all_other_load"]))
        print(f"  {r['model']:>4} {r['row']:<15} {runs}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
