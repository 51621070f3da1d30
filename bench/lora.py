#!/usr/bin/env python
"""LoRA vs full fine-tuning on llama-100m or -300m (peak memory of learner + reference, throughput)
and the weight sync of LoRA GRPO (merged weights vs adapter only).

    python bench/lora.py                                  # the six rows below (~8 minutes on 2 idle CPU cores)
    python bench/lora.py --rows grpo-lora-merged,grpo-lora-adapter --iterations 6
    python bench/lora.py --rows dpo-full,dpo-full-ref-actor --steps 4 --out /tmp/b
    python bench/lora.py --model 300m --steps 3 --iterations 3   # llama-300m (~15 minutes)
    python bench/lora.py --render runs/bench-lora/<timestamp>/results.json

Every row is a real ``prefopt.train`` run on ``builtin:llama-100m`` (``--model 300m``:
``builtin:llama-300m``) in its own subprocess (``--worker CONFIG``; ``lora_workers.py``), 1 learner,
ZeRO-0, fp32, seed 0; the full and LoRA rows of an algorithm share data, steps / iterations, batch
sizes and lr. LoRA: ``model.lora={r: 16, alpha: 32}`` on q/k/v/o/gate/up/down (the default
targets). Rows (``--rows``):

* ``dpo-full``: ``recipes/tiny_dpo.yaml``, its reference as the recipe places it
  (``roles.reference.placement: learner``: the learner computes the reference log-probs of every
  example once, before its first update; no reference model is kept); ``dpo-full-ref-actor``: with
  ``roles.reference.placement=actor`` (a reference actor holds a frozen copy for the whole run);
  ``dpo-lora``: + LoRA (the learner's pass with the adapters disabled).
* ``grpo-full``: ``recipes/tiny_grpo.yaml`` (a reference actor, one vLLM engine); ``grpo-lora-merged`` /
  ``grpo-lora-adapter``: + LoRA, ``roles.reference.placement=learner`` (adapters disabled on the policy
  learner) and ``roles.rollout.lora_sync=merged`` / ``adapter``.

Measured:

* **peak MB**: each Ray actor's own peak RSS (``VmHWM`` of ``/proc/<pid>/status``), polled every 0.5 s
  by a thread of this process; the last value read per pid is kept. Actors are found among the row
  process's descendants by their Ray process title (``ray::LearnerWorker``, ``ray::ReferenceWorker``,
  ``ray::RolloutWorker``; polling from the moment Ray starts them, so an actor that exits early is
  still read while it lives) and checked against ``placement.json`` (which lists learners and engines,
  not reference actors). learner + reference = the sum of those processes' peaks (DPO and LoRA GRPO:
  the learner alone, which also computes the reference); the engine's is reported apart.
* **DPO pairs/s** = batch x timed steps / their ``step_time_s``; step 1 (warm-up) and the one
  reference pass (``reference s``) excluded. **GRPO samples/s** = samples per iteration / mean
  iteration wall time (metric-log stamps), iteration 1 excluded; the split is the loop's ``time/*``
  metrics; ``sync`` = ``time/sync``; gen tokens/s = generated tokens / the engine's own generation
  seconds (``engine_generate_s``). Responses are always ``max_tokens`` long (``ignore_eos``).
* **other load**: cores used by processes outside this bench while the row ran (the machine may be
  shared); before each row the bench waits up to ``--wait-quiet`` s for them to go idle.

Output: a Markdown table (stdout, ``results.md``), everything in ``results.json``, logs in ``logs/``,
the run folders in ``runs/``, the DPO data in ``data/``, under ``--out`` (default
``runs/bench-lora/<timestamp>``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/: offline.py, online_common.py
from offline import ForeignLoad, _cpu_name, wait_for_quiet  # noqa: E402
from online_common import BUSY, CPUS, REPO, _env_for_workers, _load, versions  # noqa: E402
from lora_workers import derive, worker  # noqa: E402

MODELS = {"100m": "builtin:llama-100m", "300m": "builtin:llama-300m"}      # --model
LORA = dict(r=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
LORA_KEY = f"model.lora={{r: {LORA['r']}, alpha: {LORA['alpha']}}}"
COMMON = ["output.progress_bar=false", "output.save_model=false", "output.loggers=[]",
          "output.keep_checkpoints=0", "output.checkpoint_every=0", "train.eval_every=0", "train.seed=0",
          "roles.learner.num_actors=1", "roles.learner.zero_stage=0"]
DPO = dict(steps=8, batch=8, micro=4, eval_rows=4, min_words=32, max_words=64, max_length=128,
           max_prompt_length=32, lr=1.0e-5)
GRPO = dict(iterations=5, prompts=8, n=4, max_tokens=48, batch=16, micro=8, lr=1.0e-4)
ROWS = {
    "dpo-full": dict(algo="dpo", ref="learner (before step 1)", overrides=[]),
    "dpo-lora": dict(algo="dpo", ref="learner, adapters off", overrides=[LORA_KEY]),
    "dpo-full-ref-actor": dict(algo="dpo", ref="actor", overrides=["roles.reference.placement=actor"]),
    "grpo-full": dict(algo="grpo", ref="actor", overrides=[]),
    "grpo-lora-merged": dict(algo="grpo", ref="learner, adapters off", overrides=[
        LORA_KEY, "roles.reference.placement=learner", "roles.rollout.lora_sync=merged"]),
    "grpo-lora-adapter": dict(algo="grpo", ref="learner, adapters off", overrides=[
        LORA_KEY, "roles.reference.placement=learner", "roles.rollout.lora_sync=adapter"]),
}
DEFAULT_ROWS = "dpo-full,dpo-full-ref-actor,dpo-lora,grpo-full,grpo-lora-merged,grpo-lora-adapter"
ROLE_OF = {"LearnerWorker": "policy", "ReferenceWorker": "reference", "RolloutWorker": "rollout"}


# ============================================================================ model, data
def model_info(model_dir: str) -> dict:
    """Parameter counts from the safetensors header and config (nothing loaded)."""
    import math
    import struct
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),   # (in, out); kv heads = heads
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    lora = cfg["num_hidden_layers"] * sum(LORA["r"] * (a + b) for a, b in (shapes[t] for t in LORA["targets"]))
    return {"parameters": total, "lora_parameters": lora, "config": {k: cfg[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}}


def write_dpo_data(out: Path, model_dir: str, steps: int) -> dict:
    """steps x batch train pairs (one epoch) and one micro-batch of held-out pairs, prefopt's synthetic
    generator with longer responses; token statistics (nothing may be truncated)."""
    import random

    from transformers import AutoTokenizer

    from prefopt.data import synthetic
    tok, rng, d = AutoTokenizer.from_pretrained(model_dir), random.Random(0), dict(DPO, steps=steps)
    rows = [{"prompt": synthetic._prompt(rng),
             "chosen": synthetic._response(rng, 0.9, d["min_words"], d["max_words"]),
             "rejected": synthetic._response(rng, 0.1, d["min_words"], d["max_words"])}
            for _ in range(d["steps"] * d["batch"] + d["eval_rows"])]
    (out / "data").mkdir(parents=True, exist_ok=True)
    n = d["steps"] * d["batch"]
    for name, part in (("train", rows[:n]), ("eval", rows[n:])):
        (out / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    seq = []
    for r in rows:
        p = len(tok(r["prompt"])["input_ids"])
        for k in ("chosen", "rejected"):
            seq.append(p + len(tok(r[k], add_special_tokens=False)["input_ids"]) + 1)
            if p > d["max_prompt_length"] or seq[-1] > d["max_length"]:
                raise SystemExit(f"bench data: a row would be truncated ({seq[-1]} tokens)")
    return {"train_rows": n, "eval_rows": d["eval_rows"], "sequence_tokens": [min(seq), sum(seq) / len(seq), max(seq)]}


def row_config(name: str, a, out: Path) -> dict:
    row, common = ROWS[name], [f"model.path={MODELS[a.model]}", *COMMON, *a.set]
    if row["algo"] == "dpo":
        d = dict(DPO, steps=a.steps or DPO["steps"])
        ov = [f"data.path={out / 'data' / 'train.jsonl'}", f"data.eval_path={out / 'data' / 'eval.jsonl'}",
              f"data.max_length={d['max_length']}", f"data.max_prompt_length={d['max_prompt_length']}",
              f"train.batch_size={d['batch']}", f"train.micro_batch_size={d['micro']}", "train.epochs=1",
              f"train.max_steps={d['steps']}", f"train.lr={d['lr']}"]
        return dict(row, recipe="tiny_dpo.yaml", batch=d["batch"], overrides=common + ov + row["overrides"])
    g = dict(GRPO, iterations=a.iterations or GRPO["iterations"])
    ov = [f"train.prompts_per_iteration={g['prompts']}", f"roles.rollout.sampling.n={g['n']}",
          f"roles.rollout.sampling.max_tokens={g['max_tokens']}", "roles.rollout.sampling.ignore_eos=true",
          f"train.batch_size={g['batch']}", f"train.micro_batch_size={g['micro']}", f"train.lr={g['lr']}",
          f"train.iterations={g['iterations']}", "train.sample_log_every=0"]
    return dict(row, recipe="tiny_grpo.yaml", samples=g["prompts"] * g["n"], overrides=common + ov + row["overrides"])


# ============================================================================ measuring
def _proc(pid: int) -> tuple[str, dict]:
    """(process title, {VmHWM, VmRSS, RssAnon, RssFile, RssShmem} in kB) of ``pid``."""
    title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
            status[line.split(":")[0]] = int(line.split()[1])
    return title, status


class MemoryMonitor(threading.Thread):
    """Every ``interval`` s: the Ray actors among ``root_pid``'s descendants, each one's VmHWM (the last
    read is kept: its own high-water mark) and the largest sampled sum of VmRSS over learner + reference."""

    def __init__(self, root_pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.stop = root_pid, interval, threading.Event()
        self.actors: dict[int, dict] = {}
        self.sum_rss_max_kb = 0
        self.driver_hwm_kb = 0

    def run(self):
        import psutil
        root = psutil.Process(self.root_pid)
        while not self.stop.is_set():
            try:
                kids = [p.pid for p in root.children(recursive=True)]
                self.driver_hwm_kb = _proc(self.root_pid)[1].get("VmHWM", self.driver_hwm_kb)
            except (psutil.NoSuchProcess, OSError):
                break
            rss = 0
            for pid in kids:
                try:
                    title, st = _proc(pid)
                except OSError:
                    continue           # gone meanwhile: its last read stays
                cls = title[5:].split(".")[0].split()[0] if title.startswith("ray::") else ""
                if cls not in ROLE_OF:
                    continue
                rec = self.actors.setdefault(pid, {"class": cls, "role": ROLE_OF[cls], "reads": 0})
                rec.update(hwm_kb=st.get("VmHWM", 0), reads=rec["reads"] + 1, last_title=title)
                for k in ("RssAnon", "RssFile", "RssShmem"):    # sampled maxima: what the peak is made of
                    rec[f"{k}_max_kb"] = max(rec.get(f"{k}_max_kb", 0), st.get(k, 0))
                if rec["role"] in ("policy", "reference"):
                    rss += st.get("VmRSS", 0)
            self.sum_rss_max_kb = max(self.sum_rss_max_kb, rss)
            self.stop.wait(self.interval)

    def summary(self, placement: list | None) -> dict:
        by_role: dict[str, float] = {}
        for rec in self.actors.values():
            by_role[rec["role"]] = by_role.get(rec["role"], 0.0) + rec["hwm_kb"] / 1024
        listed = {p["pid"]: p["role"] for p in placement or []}
        return {"actors": {str(k): v for k, v in self.actors.items()}, "peak_mb": by_role,
                "learner_reference_mb": by_role.get("policy", 0.0) + by_role.get("reference", 0.0),
                "learner_reference_sum_rss_max_mb": self.sum_rss_max_kb / 1024,
                "driver_peak_mb": self.driver_hwm_kb / 1024,
                # placement.json's pids (learners, engines) are the actors found here under the same role
                "placement_pids_found": all(self.actors.get(pid, {}).get("role") == role for pid, role in listed.items())}


def run_row(name: str, a, out: Path) -> dict:
    cfg = row_config(name, a, out)
    run_dir = out / "runs" / name
    cfg["overrides"] = cfg["overrides"] + [f"output.run_dir={run_dir}", f"name=bench-lora-{name}"]
    for sub in ("raw", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cfg_path, res_path, log_path = out / "raw" / f"{name}.config.json", out / "raw" / f"{name}.json", out / "logs" / f"{name}.log"
    cfg_path.write_text(json.dumps(dict(cfg, result=str(res_path)), indent=1))
    waited = time.perf_counter()
    load_before = wait_for_quiet(a.wait_quiet) if a.wait_quiet > 0 else None
    waited = time.perf_counter() - waited
    load, start = ForeignLoad(), time.perf_counter()
    load.start()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=_env_for_workers(), cwd=str(REPO))
        mem = MemoryMonitor(proc.pid)
        mem.start()
        try:
            rc = proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        finally:
            mem.stop.set()
            load.stop.set()
            mem.join()
            load.join()
    r = {"row": name, "config": cfg, "process_wall_s": time.perf_counter() - start, "waited_s": waited,
         "other_load_before": load_before, "other_load_cores": load.mean,
         "other_load_max": max(load.samples, default=0.0), "returncode": rc}
    placement = json.loads((run_dir / "placement.json").read_text()) if (run_dir / "placement.json").exists() else None
    r["memory"] = mem.summary(placement)
    if rc != 0 or not res_path.exists():
        text = log_path.read_text(errors="replace")
        cut = text.rfind("Traceback (most recent call last)")
        r["error"] = (text[cut:] if cut >= 0 else text)[-6000:]
        return r
    res = json.loads(res_path.read_text())
    r.update(derive(cfg, res), driver_prefopt=res["driver_prefopt"], actor_probe=res["actor_probe"],
             placement=res["placement"], summary=res["summary"], run_dir=res["run_dir"],
             learner_module_parameters=next((p.get("num_parameters") for p in res["placement"] if p["role"] == "policy"), None))
    return r


# ============================================================================ tables
def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None or v != v else fmt.format(v)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def render(meta: dict, rows: dict) -> str:
    m, info = lambda n, k: rows.get(n, {}).get(k), meta["model"]
    mem = lambda n: rows.get(n, {}).get("memory", {})                      # noqa: E731
    lr_mem = lambda n: mem(n).get("learner_reference_mb") if "error" not in rows.get(n, {}) else None   # noqa: E731
    lines = [f"{info.get('name', 'llama-100m')}: {info['parameters'] / 1e6:.1f}M parameters ({info['config']}); "
             + (f"every row with {', '.join(meta['overrides'])}; " if meta.get("overrides") else "")
             + 
             f"LoRA r={LORA['r']}, "
             f"alpha={LORA['alpha']} on {'/'.join(t.split('_')[0] for t in LORA['targets'])}: "
             f"{info['lora_parameters'] / 1e6:.2f}M trainable ({100 * info['lora_parameters'] / info['parameters']:.1f}%).", ""]
    dpo = [n for n in rows if ROWS[n]["algo"] == "dpo"]
    grpo = [n for n in rows if ROWS[n]["algo"] == "grpo"]
    fail = lambda n: "failed (below)" if "error" in rows[n] else None    # noqa: E731
    if dpo:
        lines += [f"DPO: {meta['dpo']['steps']} steps x {DPO['batch']} pairs (micro {DPO['micro']}), sequences "
                  f"{meta['dpo_data']['sequence_tokens'][0]}-{meta['dpo_data']['sequence_tokens'][2]} tokens "
                  f"(mean {meta['dpo_data']['sequence_tokens'][1]:.0f}); step 1 excluded.", "",
                  "| row | reference | learner MB | reference MB | learner + reference MB | x full | pairs/s | x full "
                  "| median step s | reference pass s | other load |", "|" + "---|" * 11]
        for n in dpo:
            r, pm = rows[n], mem(n).get("peak_mb", {})
            lines.append(f"| {n} | {ROWS[n]['ref']} | {_f(pm.get('policy'), '{:.0f}')} | {_f(pm.get('reference'), '{:.0f}')} "
                         f"| **{_f(lr_mem(n), '{:.0f}')}** | {_f(_ratio(lr_mem(n), lr_mem('dpo-full')))} "
                         f"| {fail(n) or _f(m(n, 'pairs_per_s'), '**{:.2f}**')} | {_f(_ratio(m(n, 'pairs_per_s'), m('dpo-full', 'pairs_per_s')))} "
                         f"| {_f(m(n, 'median_step_s'))} | {_f(m(n, 'reference_pass_s'), '{:.1f}')} | {_load(r)} |")
        lines.append("")
    if grpo:
        lines += [f"GRPO: {meta['grpo']['iterations']} iterations x {GRPO['prompts']} prompts x {GRPO['n']} samples x "
                  f"{GRPO['max_tokens']} tokens, {GRPO['batch']}-sample optimizer steps (micro {GRPO['micro']}); "
                  "iteration 1 excluded; split = mean s per iteration.", "",
                  "| row | reference | learner MB | reference MB | learner + reference MB | x full | engine MB | samples/s "
                  "| x full | iteration s | generate | reference | old logps | learn | sync | gen tokens/s | engine vs learner "
                  "max logp diff | kl | other load |", "|" + "---|" * 19]
        for n in grpo:
            r, pm, sp = rows[n], mem(n).get("peak_mb", {}), rows[n].get("split_s", {})
            if sp:     # the reference pass: on reference actors (reference) or on the policy learner (ref_logps)
                sp = dict(sp, reference=sum(v for k, v in sp.items() if k in ("reference", "ref_logps") and v == v))
            cells = " | ".join(_f(sp.get(k), "{:.2f}") for k in ("generate", "reference", "old_logps", "learn", "sync"))
            lines.append(f"| {n} | {ROWS[n]['ref']} | {_f(pm.get('policy'), '{:.0f}')} | {_f(pm.get('reference'), '{:.0f}')} "
                         f"| **{_f(lr_mem(n), '{:.0f}')}** | {_f(_ratio(lr_mem(n), lr_mem('grpo-full')))} "
                         f"| {_f(pm.get('rollout'), '{:.0f}')} | {fail(n) or _f(m(n, 'samples_per_s'), '**{:.2f}**')} "
                         f"| {_f(_ratio(m(n, 'samples_per_s'), m('grpo-full', 'samples_per_s')))} | {_f(m(n, 'iteration_s'))} "
                         f"| {cells} | {_f(m(n, 'gen_tokens_per_s'), '{:.0f}')} | {_f(m(n, 'logp_abs_diff_max'), '{:.1e}')} "
                         f"| {_f(m(n, 'kl_last'), '{:.1e}')} | {_load(r)} |")
        lines.append("")
    sync = lambda n: (rows.get(n, {}).get("split_s") or {}).get("sync")   # noqa: E731
    gen = lambda n: (rows.get(n, {}).get("split_s") or {}).get("generate")   # noqa: E731
    both = lambda n: None if sync(n) is None or gen(n) is None else sync(n) + gen(n)   # noqa: E731
    ratios = [
        ("DPO peak memory, learner + reference: LoRA / full", _ratio(lr_mem("dpo-lora"), lr_mem("dpo-full")), "≤ 0.5"),
        ("DPO peak memory: LoRA / full with a reference actor", _ratio(lr_mem("dpo-lora"), lr_mem("dpo-full-ref-actor")), "≤ 0.5"),
        ("GRPO peak memory, learner + reference: LoRA merged / full", _ratio(lr_mem("grpo-lora-merged"), lr_mem("grpo-full")), "≤ 0.5"),
        ("GRPO peak memory, learner + reference: LoRA adapter / full", _ratio(lr_mem("grpo-lora-adapter"), lr_mem("grpo-full")), "≤ 0.5"),
        ("DPO pairs/s: LoRA / full", _ratio(m("dpo-lora", "pairs_per_s"), m("dpo-full", "pairs_per_s")), ""),
        ("GRPO samples/s: LoRA merged / full", _ratio(m("grpo-lora-merged", "samples_per_s"), m("grpo-full", "samples_per_s")), ""),
        ("GRPO samples/s: LoRA adapter / full", _ratio(m("grpo-lora-adapter", "samples_per_s"), m("grpo-full", "samples_per_s")), ""),
        ("sync s per iteration: adapter / merged", _ratio(sync("grpo-lora-adapter"), sync("grpo-lora-merged")), ""),
        ("engine gen tokens/s: adapter / merged", _ratio(m("grpo-lora-adapter", "gen_tokens_per_s"), m("grpo-lora-merged", "gen_tokens_per_s")), ""),
        ("generate + sync s per iteration: adapter / merged", _ratio(both("grpo-lora-adapter"), both("grpo-lora-merged")), "< 1: adapter wins"),
        ("iteration s: adapter / merged", _ratio(m("grpo-lora-adapter", "iteration_s"), m("grpo-lora-merged", "iteration_s")), "< 1: adapter wins"),
    ]
    lines += ["| ratio | value | target |", "|---|---|---|"]
    lines += [f"| {k} | **{_f(v, '{:.3f}')}** | {t} |" for k, v, t in ratios if v is not None]
    lines += ["", f"MB: each actor's own peak RSS (VmHWM), learner + reference summed (results.json: per actor also the "
              "sampled maxima of RssAnon / RssFile / RssShmem); other load = cores used by processes outside this "
              f"bench while the row ran (⚠: >= {BUSY})."]
    for n, r in rows.items():
        if "error" in r:
            lines += ["", f"Row {n} failed (exit {r['returncode']}); the traceback, as logged:", "", "```",
                      r["error"].strip()[-4000:], "```"]
    return "\n".join(lines)


# ============================================================================ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="100m", choices=MODELS, help="100m: builtin:llama-100m (default), "
                    "300m: builtin:llama-300m")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated subset of {', '.join(ROWS)} (default {DEFAULT_ROWS})")
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT"), help="output folder (default runs/bench-lora/<timestamp>)")
    ap.add_argument("--wait-quiet", type=float, default=10.0, help="before each row, wait up to this many s for other "
                    "processes to leave the CPUs idle (0: don't)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per row")
    ap.add_argument("--steps", type=int, default=None, help=f"DPO optimizer steps (default {DPO['steps']}; the first excluded)")
    ap.add_argument("--iterations", type=int, default=None, help=f"GRPO iterations (default {GRPO['iterations']}; the first excluded)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every row, e.g. model.gradient_checkpointing=true (repeatable)")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="print the table of an earlier run and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        cfg = json.loads(Path(a.worker).read_text())
        return Path(cfg["result"]).write_text(json.dumps(worker(cfg), indent=1, default=str))
    if a.render:
        d = json.loads(Path(a.render).read_text())
        return print(render(d["meta"], d["rows"]))
    names = a.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    for k, v in _env_for_workers().items():      # the driver builds the model and the data
        os.environ.setdefault(k, v)
    from prefopt.models.tiny import resolve_model_path
    out = Path(a.out) if a.out else REPO / "runs" / "bench-lora" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    model, model_dir = MODELS[a.model], resolve_model_path(MODELS[a.model])
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "versions": versions(), "cpus": CPUS, "machine": platform.machine(), "processor": _cpu_name(),
            "loadavg_start": os.getloadavg(), "dpo": dict(DPO, steps=a.steps or DPO["steps"]),
            "model": dict(model_info(model_dir), name=model.split(":")[-1], path=model, option=a.model),
            "overrides": a.set,
            "grpo": dict(GRPO, iterations=a.iterations or GRPO["iterations"]), "lora": LORA}
    if any(ROWS[n]["algo"] == "dpo" for n in names):
        meta["dpo_data"] = write_dpo_data(out, model_dir, meta["dpo"]["steps"])
    info = meta["model"]
    print(f"machine: {CPUS} CPUs ({meta['processor']}), load average {meta['loadavg_start'][0]:.2f}; model {model}: "
          f"{info['parameters']:,} parameters, LoRA r={LORA['r']}: {info['lora_parameters']:,} trainable", flush=True)
    t0, rows = time.perf_counter(), {}
    for n in names:
        r = rows[n] = run_row(n, a, out)
        pm = r["memory"]["peak_mb"]
        what = (f"FAILED (exit {r['returncode']}): {r['error'].strip().splitlines()[-1][:300]}" if "error" in r else
                f"{r.get('pairs_per_s') or r.get('samples_per_s'):.2f} {'pairs' if 'pairs_per_s' in r else 'samples'}/s")
        print(f"  {n:<20} {what}; learner + reference {r['memory']['learner_reference_mb']:.0f} MB "
              f"({', '.join(f'{k} {v:.0f}' for k, v in pm.items())}); process {r['process_wall_s']:.0f}s, waited "
              f"{r['waited_s']:.0f}s, other load {r['other_load_cores']:.2f} cores (max {r['other_load_max']:.2f})", flush=True)
        if "driver_prefopt" in r:
            print(f"    prefopt: driver {r['driver_prefopt']}, Ray worker {r['actor_probe'].get('prefopt')}; "
                  f"placement.json pids found {r['memory']['placement_pids_found']}", flush=True)
    meta["total_s"], meta["loadavg_end"] = time.perf_counter() - t0, os.getloadavg()
    text = render(meta, rows)
    print("\n" + text + f"\n\n{meta['total_s']:.0f}s in all; results in {out}")
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    (out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
