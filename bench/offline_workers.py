"""Workers of ``bench/offline.py`` (``offline.py --worker trl|prefopt --config F``): one table row
each, in its own process so that its peak RSS is clean. See offline.py for the definitions.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPUS = os.cpu_count() or 1


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trl_timer():
    """A TRL ``TrainerCallback`` recording the training wall time (``begin``/``end``) and each step's time."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin = self.end = self.step_start = None
            self.steps = []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.step_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self.step_start)

        def on_train_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    return Timer()


def write_row_config(out: Path, name: str, cfg: dict) -> Path:
    """``out/raw/<name>.config.json`` (with the ``raw/`` and ``logs/`` folders of a bench run)."""
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / "raw" / f"{name}.config.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def trl_worker(cfg: dict) -> dict:
    import torch
    torch.set_num_threads(cfg["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    baseline_mb = _rss_mb()
    # TRL 1.16 precomputes reference log-probs inside DPOTrainer.__init__: time that method.
    pre = {"s": 0.0, "calls": 0}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            pre["s"] += time.perf_counter() - start
            pre["calls"] += 1

    DPOTrainer._precompute_ref_logps = timed

    rows = [json.loads(line) for line in Path(cfg["train_path"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)   # in memory: no datasets cache reused across runs
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    spec = cfg["spec"]
    kwargs = dict(  # what every TRL row sets: the shared workload, fp32, no I/O side effects
        output_dir=cfg["tmp"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["batch"] // spec["micro"], max_steps=spec["steps"],
        num_train_epochs=1, learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0,
        beta=spec["beta"], max_length=spec["max_length"], bf16=False, seed=0,
        report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True)
    kwargs.update(cfg["trl"])
    if cfg.get("ref_batch_factor"):   # as prefopt's no-grad token budget: 4x a training micro-batch
        kwargs["precompute_ref_batch_size"] = cfg["ref_batch_factor"] * spec["micro"]
    # TRL's own defaults, as declared (bf16=None means "True unless fp16"); on a CPU-only machine
    # DPOConfig() with them raises ("doesn't support bf16/gpu"), so every row sets bf16=False.
    fields = DPOConfig.__dataclass_fields__
    defaults = {k: fields[k].default for k in (
        "bf16", "gradient_checkpointing", "precompute_ref_log_probs", "learning_rate", "max_length",
        "logging_steps", "per_device_train_batch_size")}
    try:
        DPOConfig(output_dir=cfg["tmp"])
        defaults["defaults_construct"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, not handled
        defaults["defaults_construct"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    args = DPOConfig(**kwargs)
    timer = trl_timer()
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=dataset,
                         callbacks=[timer])
    init_mb = _rss_mb()
    out = trainer.train()
    n_tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
                   for r in trainer.train_dataset)
    train_s = timer.end - timer.begin
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "pairs": spec["steps"] * spec["batch"], "train_s": train_s, "reference_s": pre["s"],
        "precompute_calls": pre["calls"], "peak_mb": _rss_mb(), "baseline_mb": baseline_mb,
        "after_init_mb": init_mb, "threads": torch.get_num_threads(),
        "step_s_median": statistics.median(timer.steps) if timer.steps else None,
        "step_s": timer.steps, "steps_done": out.global_step, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "train_tokens": n_tokens,
        "effective": {k: getattr(args, k) for k in (
            "bf16", "gradient_checkpointing", "precompute_ref_log_probs", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_length", "learning_rate", "beta", "logging_steps", "optim")},
        "trl_defaults": defaults,
        "ref_model_kept": trainer.ref_model is not None,
    }


class _LearnerRSS(threading.Thread):
    """Samples the summed RSS of the Ray learner actor processes (for >1 learner)."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval, self.peak_sum_mb, self.pids, self.stop = interval, 0.0, set(), threading.Event()

    def run(self):
        import psutil
        me = psutil.Process()
        while not self.stop.is_set():
            total, pids = 0, set()
            for p in me.children(recursive=True):   # only this run's Ray (the machine may be shared)
                try:
                    cmd = " ".join(p.cmdline() or [])
                    if cmd.startswith("ray::LearnerWorker"):
                        total += p.memory_info().rss
                        pids.add(p.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.pids |= pids
            self.peak_sum_mb = max(self.peak_sum_mb, total / 2**20)
            self.stop.wait(self.interval)


def prefopt_worker(cfg: dict) -> dict:
    from prefopt.config import load_recipe
    from prefopt.train import train

    spec, t = cfg["spec"], cfg["threads"]
    overrides = [
        f"name=bench-{cfg['id']}", f"model.path={cfg['model_dir']}",
        f"data.path={cfg['train_path']}", f"data.eval_path={cfg['eval_path']}", "data.eval_fraction=0",
        f"data.max_length={spec['max_length']}", f"data.max_prompt_length={spec['max_prompt_length']}",
        f"objective.beta={spec['beta']}",
        f"roles.learner.num_actors={cfg['learners']}", f"roles.learner.zero_stage={cfg['zero']}",
        f"roles.learner.num_cpus={t}",
        f"train.batch_size={spec['batch']}", f"train.micro_batch_size={spec['micro']}", "train.epochs=1",
        f"train.max_steps={spec['steps']}", f"train.lr={spec['lr']}", "train.lr_scheduler=linear",
        "train.warmup_ratio=0", "train.eval_every=0", "train.precision=fp32", "train.seed=0",
        f"output.root={cfg['tmp']}", "output.save_model=false", "output.loggers=[]",
        "output.progress_bar=false", f"ray.num_cpus={max(CPUS, t * cfg['learners'])}",
    ]
    overrides += cfg.get("overrides", [])
    if t != 1:  # prefopt pins every actor to 1 BLAS/OpenMP thread unless ray.env says otherwise
        overrides += [f"ray.env.OMP_NUM_THREADS={t}", f"ray.env.MKL_NUM_THREADS={t}"]
    recipe = load_recipe(REPO / "recipes" / "tiny_dpo.yaml", overrides)
    sampler = _LearnerRSS(interval=0.5)   # only for >1 learner; cheap, but it shares the CPUs
    if cfg["learners"] > 1:
        sampler.start()
    result = train(recipe, quiet=True)
    if cfg["learners"] > 1:
        sampler.stop.set()
        sampler.join()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    keep = Path(cfg["result"]).with_suffix("")
    shutil.copy(result.run_dir / "summary.json", f"{keep}.summary.json")
    shutil.copy(result.run_dir / "metrics.jsonl", f"{keep}.metrics.jsonl")
    n_train, n_eval = summary["train_examples"], summary["eval_examples"]
    # reference_time_s covers train + eval examples; keep the training examples' share
    reference_s = summary["reference_time_s"] * n_train / (n_train + n_eval)
    steps = [h["step_time_s"] for h in result.train_history]
    tokens = sum(h["tokens_per_s"] * h["step_time_s"] for h in result.train_history)
    return {
        "pairs": summary["steps"] * spec["batch"], "train_s": summary["train_time_s"],
        "reference_s": reference_s, "reference_s_incl_eval": summary["reference_time_s"],
        "peak_mb": summary["peak_memory_mb"], "peak_sum_mb": sampler.peak_sum_mb if cfg["learners"] > 1 else None,
        "learner_pids": sorted(sampler.pids), "threads": t, "driver_peak_mb": _rss_mb(),
        "step_s_median": statistics.median(steps), "step_s": steps,
        "steps_done": summary["steps"], "train_examples": n_train, "eval_examples": n_eval,
        "first_loss": result.train_history[0]["loss"], "last_loss": result.train_history[-1]["loss"],
        "train_tokens": tokens, "summary_examples_per_s": summary["examples_per_s"],
        "metrics_lines": len(metrics),
    }


def run_worker(kind: str, config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    out = (trl_worker if kind == "trl" else prefopt_worker)(cfg)
    Path(cfg["result"]).write_text(json.dumps(out, indent=1, default=str))
