"""Workers of ``bench/reward_model.py`` (``reward_model.py --worker trl|prefopt|prm --config F``): one
table row (or the whole PRM comparison) each, in its own process so that its peak RSS and its thread
count are its own. See reward_model.py for the definitions.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from offline_workers import CPUS, REPO, _rss_mb, trl_timer  # bench/ is on sys.path


# ============================================================================ training: TRL

def trl_worker(cfg: dict) -> dict:
    import torch
    torch.set_num_threads(cfg["threads"])
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    baseline_mb = _rss_mb()

    spec = cfg["spec"]
    rows = [json.loads(line) for line in Path(cfg["train_path"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)   # in memory: no datasets cache reused across runs
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg["model_dir"], num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
    kwargs = dict(  # the shared workload, fp32, TRL's defaults that differ from prefopt's turned off
        output_dir=cfg["tmp"], per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["batch"] // spec["micro"], max_steps=spec["steps"],
        num_train_epochs=1, learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0,
        max_length=spec["max_length"], bf16=False, gradient_checkpointing=False,
        center_rewards_coefficient=None, dataloader_num_workers=0, seed=0,
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True)
    fields = RewardConfig.__dataclass_fields__
    defaults = {k: fields[k].default for k in (
        "bf16", "gradient_checkpointing", "learning_rate", "max_length", "logging_steps",
        "center_rewards_coefficient", "disable_dropout", "pad_to_multiple_of")}
    args = RewardConfig(**kwargs)
    timer = trl_timer()
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=dataset,
                            callbacks=[timer])
    # what TRL's padded micro-batches hold (rows x padded width), counted in its own collator
    shapes = []
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    trainer.data_collator = counting
    init_mb = _rss_mb()
    out = trainer.train()
    padded = [r * w for r, w in shapes]
    real = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset)
    return {
        "pairs": spec["steps"] * spec["batch"], "train_s": timer.end - timer.begin,
        "peak_mb": _rss_mb(), "baseline_mb": baseline_mb, "after_init_mb": init_mb,
        "threads": torch.get_num_threads(),
        "step_s_median": statistics.median(timer.steps) if timer.steps else None, "step_s": timer.steps,
        "steps_done": out.global_step, "mean_train_loss": out.training_loss,
        "train_rows_after_filter": len(trainer.train_dataset), "train_tokens": real,
        "micro_batches": len(shapes), "padded_tokens_per_micro": [min(padded), statistics.mean(padded), max(padded)]
        if padded else None,
        "effective": {k: getattr(args, k) for k in (
            "bf16", "gradient_checkpointing", "per_device_train_batch_size", "gradient_accumulation_steps",
            "max_length", "learning_rate", "lr_scheduler_type", "optim", "weight_decay", "max_grad_norm",
            "center_rewards_coefficient", "disable_dropout", "logging_strategy", "dataloader_num_workers")},
        "trl_defaults": defaults,
    }


# ============================================================================ training: prefopt

def prefopt_worker(cfg: dict) -> dict:
    from prefopt.config import load_recipe
    from prefopt.train import train

    spec, t = cfg["spec"], cfg["threads"]
    overrides = [
        f"name=bench-{cfg['id']}", f"model.path={cfg['model_dir']}", "objective.name=reward_model",
        f"data.path={cfg['train_path']}", f"data.eval_path={cfg['eval_path']}", "data.eval_fraction=0",
        f"data.max_length={spec['max_length']}", f"data.max_prompt_length={spec['max_prompt_length']}",
        "roles.learner.num_actors=1", "roles.learner.zero_stage=0", f"roles.learner.num_cpus={t}",
        f"train.batch_size={spec['batch']}", f"train.micro_batch_size={spec['micro']}", "train.epochs=1",
        f"train.max_steps={spec['steps']}", f"train.lr={spec['lr']}", "train.lr_scheduler=linear",
        "train.warmup_ratio=0", "train.eval_every=0", "train.precision=fp32", "train.seed=0",
        f"output.root={cfg['tmp']}", "output.save_model=false", "output.loggers=[]",
        "output.progress_bar=false", f"ray.num_cpus={max(CPUS, t)}",
    ] + cfg.get("overrides", [])
    if t != 1:  # prefopt pins every actor to 1 BLAS/OpenMP thread unless ray.env says otherwise
        overrides += [f"ray.env.OMP_NUM_THREADS={t}", f"ray.env.MKL_NUM_THREADS={t}"]
    recipe = load_recipe(REPO / "recipes" / "tiny_rm.yaml", overrides)
    result = train(recipe, quiet=True)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    keep = Path(cfg["result"]).with_suffix("")
    (Path(f"{keep}.summary.json")).write_text(json.dumps(summary, indent=1))
    (Path(f"{keep}.metrics.jsonl")).write_text((result.run_dir / "metrics.jsonl").read_text())
    steps = [h["step_time_s"] for h in result.train_history]
    return {
        "pairs": summary["steps"] * spec["batch"], "train_s": summary["train_time_s"],
        "reference_time_s": summary["reference_time_s"], "peak_mb": summary["peak_memory_mb"],
        "threads": t, "driver_peak_mb": _rss_mb(),
        "step_s_median": statistics.median(steps), "step_s": steps, "steps_done": summary["steps"],
        "train_examples": summary["train_examples"], "eval_examples": summary["eval_examples"],
        "skipped_rows": summary["skipped_rows"], "final_train_loss": summary["final_train_loss"],
        "eval_accuracy_start": summary["eval_accuracy_start"], "eval_accuracy_final": summary["eval_accuracy_final"],
        "micro_batches_per_step": [h.get("micro_batches") for h in result.train_history],
        "train_tokens": sum(h["tokens_per_s"] * h["step_time_s"] for h in result.train_history),
        "padding_free": recipe.model.padding_free, "micro_batch_tokens": recipe.train.micro_batch_tokens,
        "overrides": overrides,
    }


# ============================================================================ PRM scoring

def build_prm_dir(model: str, out_dir: Path) -> str:
    """A one-head reward model from a causal LM (seeded fresh score head), with ``prefopt_reward:
    {kind: outcome}`` in its config so that the scorer returns raw logits (no sigmoid)."""
    import torch

    from prefopt.models.load import load_tokenizer
    from prefopt.models.reward import load_reward_model
    from prefopt.models.tiny import resolve_model_path
    from prefopt.rewards.scorer import METADATA_KEY

    path = resolve_model_path(model)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(path)
    rm = load_reward_model(path, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    rm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config[METADATA_KEY] = {"kind": "outcome", "heads": ["reward"]}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return str(out_dir)


def prm_samples(n: int, k: int, words: tuple[int, int], seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """``n`` prompts and responses of ``k`` steps, each step ``words`` synthetic words with a leading
    space (so that the steps, tokenized one by one, and their concatenation give the same tokens)."""
    from prefopt.data import synthetic

    rng = random.Random(seed)
    prompts, steps = [], []
    for _ in range(n):
        prompts.append(synthetic._prompt(rng))
        p_good = rng.random()
        steps.append([" " + " ".join(rng.choice(synthetic.GOOD_WORDS if rng.random() < p_good else synthetic.BAD_WORDS)
                                     for _ in range(rng.randint(*words))) for _ in range(k)])
    return prompts, steps


def prm_worker(cfg: dict) -> dict:
    import copy
    import dataclasses

    import torch
    torch.set_num_threads(cfg["threads"])
    from prefopt.rewards.scorer import RewardScorer, render, render_steps

    spec, delim = cfg["prm"], "."
    path = build_prm_dir(spec["model"], Path(cfg["tmp"]) / "prm")
    prompts, steps = prm_samples(spec["responses"], spec["steps"], tuple(spec["words"]))
    scorer = RewardScorer([path], batch_tokens=spec["batch_tokens"], device="cpu")
    # the old per-prefix path scored "prompt + step_1. ... step_k." as its own text and read its last
    # token (the k-th delimiter), with no eos after it: the same scorer and model, its tokenizer
    # without eos, so that RewardScorer.score reads the delimiter as score_steps does
    member = scorer.members[0]
    no_eos = copy.deepcopy(member.tokenizer)
    no_eos.eos_token = None
    per_prefix = copy.copy(scorer)
    per_prefix.members = [dataclasses.replace(member, tokenizer=no_eos)]
    flat_prompts = [p for p, s in zip(prompts, steps) for _ in s]
    prefixes = ["".join(x + delim for x in s[:k + 1]) for s in steps for k in range(len(s))]

    # the two paths read the same tokens at the same positions
    mismatches, one_tokens, prefix_tokens = 0, 0, 0
    for i, (p, s) in enumerate(zip(prompts, steps)):
        ids, ends, _ = render_steps(member.tokenizer, p, s, delim)
        one_tokens += len(ids)
        for k, end in enumerate(ends):
            pre = render(no_eos, p, prefixes[i * len(s) + k])
            prefix_tokens += len(pre)
            mismatches += pre != ids[:end + 1]

    def one_forward():
        return scorer.score_steps(prompts, steps, delim)[0]

    def each_prefix():
        flat = [h[0] for h in per_prefix.score(flat_prompts, prefixes)[0]]
        return [flat[i * spec["steps"]:(i + 1) * spec["steps"]] for i in range(len(steps))]

    runs = {"one_forward": [], "per_prefix": []}
    outs = {"one_forward": one_forward(), "per_prefix": each_prefix()}   # warm-up, untimed
    for _ in range(max(1, cfg["repeat"])):   # interleaved rounds; the fastest of each is kept
        for name, fn in (("one_forward", one_forward), ("per_prefix", each_prefix)):
            start = time.perf_counter()
            outs[name] = fn()
            runs[name].append(time.perf_counter() - start)
    diff = max(abs(a - b) for x, y in zip(outs["one_forward"], outs["per_prefix"]) for a, b in zip(x, y))
    n = len(prompts)
    return {
        "model": spec["model"], "responses": n, "steps": spec["steps"], "batch_tokens": spec["batch_tokens"],
        "threads": torch.get_num_threads(), "token_mismatches": mismatches, "max_abs_diff": diff,
        "same_scores": diff <= 1e-4 and mismatches == 0,
        "rows": {"one_forward": n, "per_prefix": len(prefixes)},
        "tokens": {"one_forward": one_tokens, "per_prefix": prefix_tokens},
        "s": runs, "ms_per_response": {k: 1e3 * min(v) / n for k, v in runs.items()},
        "ms_per_response_median": {k: 1e3 * statistics.median(v) / n for k, v in runs.items()},
        "speedup": min(runs["per_prefix"]) / min(runs["one_forward"]),
        "peak_mb": _rss_mb(),
    }


def run_worker(kind: str, config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    out = {"trl": trl_worker, "prefopt": prefopt_worker, "prm": prm_worker}[kind](cfg)
    Path(cfg["result"]).write_text(json.dumps(out, indent=1, default=str))
