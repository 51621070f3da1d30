"""Part 3 of ``bench/online.py``: TRL's ``GRPOTrainer`` on the loop row's workload (worker
``online.py --worker trl``) and the samples/s table, prefopt loop vs TRL; also TRL's ``OnlineDPOTrainer``
(``trl.experimental.online_dpo``) on an online-DPO recipe's workload (the ``20m`` part, ``online_20m.py``).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from online_common import BUSY, REPO, _load

# Part 3: TRL GRPOTrainer on the workload of the loop row of the same model (recipe + overrides), with
# 1 thread like each prefopt actor (--trl-threads). Rounds run interleaved, the fastest is kept.
# "recipe": a recipe of the 20m assets (online_20m.py) instead of recipes/tiny_grpo.yaml;
# "trainer": grpo (GRPOTrainer) | online_dpo (OnlineDPOTrainer).
TRL = {"tiny": dict(cycles=20, rounds=2), "100m": dict(cycles=3, rounds=1),
       "20m": dict(cycles=10, rounds=1, recipe="grpo.yaml"),
       "online-dpo-20m": dict(cycles=10, rounds=1, recipe="online_dpo.yaml", trainer="online_dpo")}
TRL_QUICK = {"tiny": dict(cycles=6, rounds=1)}
TRL_DEFAULT_MODELS = ("tiny",)      # llama-100m on request (--trl-models tiny,100m): ~1.5 minutes more


class StepTimer:
    """Seconds spent in some calls (wrapped methods), snapshot at every optimizer step's end: the
    per-cycle split of a TRL run (generate = the policy's HF ``generate``, reference = the reference
    model's forwards, reward = the reward model's forwards)."""

    def __init__(self):
        self.total = {}
        self.snaps = []

    def wrap(self, obj, attr: str, key: str) -> None:
        fn = getattr(obj, attr)
        self.total.setdefault(key, 0.0)

        def timed(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.total[key] += time.perf_counter() - t
        setattr(obj, attr, timed)

    def snap(self) -> None:
        self.snaps.append(dict(self.total))

    def per_cycle(self, steps_per_cycle: int, skip: int = 1) -> dict[str, float]:
        """Mean seconds per cycle of each key, cycles ``skip``.. (snapshots every optimizer step)."""
        ends = [self.snaps[(k + 1) * steps_per_cycle - 1] for k in range(len(self.snaps) // steps_per_cycle)]
        starts = [{k: 0.0 for k in self.total}] + ends[:-1]
        return {key: statistics.mean(e[key] - s[key] for s, e in zip(starts[skip:], ends[skip:]))
                for key in self.total} if len(ends) > skip else {}


def _recipe(cfg: dict):
    from prefopt.config import load_recipe
    return load_recipe(Path(cfg["recipe"]) if cfg.get("recipe") else REPO / "recipes" / "tiny_grpo.yaml",
                       cfg["overrides"])


def trl_worker(cfg: dict) -> dict:
    """Part 3: TRL GRPOTrainer on the loop row's workload (tiny_grpo.yaml, or the row's recipe, + the
    same overrides); ``cfg["trainer"] == "online_dpo"``: OnlineDPOTrainer (``trl_online_dpo``)."""
    if cfg.get("trainer", "grpo") == "online_dpo":
        return trl_online_dpo(cfg)
    import torch
    torch.set_num_threads(cfg["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from prefopt.cache import cache_dir
    from prefopt.data.prompts import load_prompts
    from prefopt.models.tiny import resolve_model_path
    from prefopt.rewards.builtin import good_word_fraction

    recipe = _recipe(cfg)
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
        report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        # prefopt's min_tokens (EOS masked until then): equal lengths in both (the 20m rows)
        generation_kwargs={"min_new_tokens": ro.sampling.min_tokens} if ro.sampling.min_tokens else None)
    fields = GRPOConfig.__dataclass_fields__
    trl_defaults = {k: fields[k].default for k in ("bf16", "gradient_checkpointing", "use_vllm", "loss_type",
                                                   "beta", "scale_rewards", "num_generations", "max_completion_length")}
    stamps = {"begin": None, "ends": []}
    calls = StepTimer()

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            stamps["ends"].append(time.perf_counter())
            calls.snap()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = GRPOTrainer(model=model, reward_funcs=good_words, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    calls.wrap(trainer.accelerator.unwrap_model(trainer.model), "generate", "generate")
    if getattr(trainer, "ref_model", None) is not None:
        calls.wrap(trainer.ref_model, "forward", "reference")
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    ends = [stamps["begin"]] + stamps["ends"]
    cycle_walls = [ends[(k + 1) * steps_per_cycle] - ends[k * steps_per_cycle] for k in range(cycles)]
    timed = cycle_walls[1:]
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    lens = [h["completions/mean_length"] for h in logs]
    rewards = [h["reward"] for h in logs if "reward" in h]
    split = calls.per_cycle(steps_per_cycle)
    return {
        "trainer": "GRPOTrainer", "split_s": split,
        "gen_tokens_per_s": (samples * statistics.mean(lens[1:]) / split["generate"]
                             if split.get("generate") and len(lens) > 1 else None),
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


def trl_online_dpo(cfg: dict) -> dict:
    """TRL ``OnlineDPOTrainer`` on an online-DPO recipe's workload (objective dpo with roles.rollout): the
    same policy folder, prompts (the JSONL rows; TRL tokenizes with ``add_special_tokens=False``, so the
    prompt text gets the tokenizer's bos written out: the same prompt ids as prefopt's, checked), 2
    completions per prompt (TRL's fixed number; the recipe's ``sampling.n`` must be 2), completion length
    (``max_new_tokens``, ``min_new_tokens`` = the recipe's min_tokens), temperature / top_p / top_k 0,
    ``per_device_train_batch_size`` = prompts per iteration = pairs per optimizer step (``batch_size``),
    beta, lr (constant), fp32, no gradient checkpointing (TRL's default is on), HF ``generate``; the reward
    is the recipe's reward model (its one model source) as ``reward_funcs``, with the policy's tokenizer.
    One optimizer step = one generation of prompts x 2 = one prefopt iteration."""
    import torch
    torch.set_num_threads(cfg["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from prefopt.cache import cache_dir
    from prefopt.data.prompts import load_prompts
    from prefopt.models.tiny import resolve_model_path

    recipe = _recipe(cfg)
    t, ro, obj = recipe.train, recipe.roles.rollout, recipe.objective
    sources = recipe.roles.reward.sources
    if ro.sampling.n != 2 or len(sources) != 1 or not sources[0].model or t.batch_size != t.prompts_per_iteration:
        raise SystemExit("trl online_dpo row: needs sampling.n 2, one reward-model source and batch_size = "
                         "prompts_per_iteration (TRL: 2 completions per prompt, one step per generation)")
    model_dir = resolve_model_path(recipe.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = load_prompts(recipe.data, tokenizer, cache_dir=cache_dir()).prompts
    texts = [tokenizer.bos_token + p["prompt_text"] for p in prompts]
    same_ids = all(tokenizer(x, add_special_tokens=False)["input_ids"] == p["prompt_ids"]
                   for x, p in zip(texts, prompts))
    dataset = Dataset.from_list([{"prompt": x} for x in texts])
    samples, cycles = t.prompts_per_iteration * 2, cfg["cycles"]
    args = OnlineDPOConfig(
        output_dir=cfg["tmp"], max_new_tokens=ro.sampling.max_tokens, temperature=ro.sampling.temperature,
        top_p=ro.sampling.top_p, top_k=0, beta=obj.beta, loss_type="sigmoid",
        generation_kwargs={"min_new_tokens": ro.sampling.min_tokens} if ro.sampling.min_tokens else None,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=1, max_steps=cycles,
        learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1],
        adam_epsilon=t.adam_eps, bf16=False, gradient_checkpointing=False, use_vllm=False, seed=t.seed,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    import dataclasses
    fields = OnlineDPOConfig.__dataclass_fields__
    trl_defaults = {k: (fields[k].default_factory() if fields[k].default is dataclasses.MISSING else fields[k].default)
                    for k in ("bf16", "gradient_checkpointing", "use_vllm", "beta", "loss_type", "temperature",
                              "max_new_tokens", "learning_rate")}
    stamps = {"begin": None, "ends": []}
    calls = StepTimer()

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            stamps["ends"].append(time.perf_counter())
            calls.snap()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(sources[0].model), dtype=torch.float32, num_labels=1)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward_model, args=args, train_dataset=dataset,
                               processing_class=tokenizer, reward_processing_classes=tokenizer, callbacks=[Timer()])
    calls.wrap(trainer.accelerator.unwrap_model(trainer.model), "generate", "generate")
    calls.wrap(trainer.ref_model, "forward", "reference")
    calls.wrap(trainer.reward_funcs[0], "forward", "reward")
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    ends = [stamps["begin"]] + stamps["ends"]
    walls = [b - a for a, b in zip(ends, ends[1:])]
    timed = walls[1:]
    split = calls.per_cycle(1)
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    eos = [h["val/contain_eos_token"] for h in logs if "val/contain_eos_token" in h]
    length = ro.sampling.max_tokens if ro.sampling.min_tokens >= ro.sampling.max_tokens else None
    return {
        "trainer": "OnlineDPOTrainer", "split_s": split,
        "gen_tokens_per_s": samples * length / split["generate"] if length and split.get("generate") else None,
        "threads": torch.get_num_threads(), "cycles": cycles, "timed_cycles": len(timed), "steps_per_cycle": 1,
        "samples_per_cycle": samples, "cycle_s": statistics.mean(timed), "cycle_s_all": walls,
        "samples_per_s": samples / statistics.mean(timed), "samples_per_s_median": samples / statistics.median(timed),
        "response_length": length,    # min_new_tokens = max_new_tokens: every completion has this length
        "contain_eos": statistics.mean(eos) if eos else None,
        "score_first": logs[0]["objective/scores"] if logs else None,
        "score_last": logs[-1]["objective/scores"] if logs else None,
        "startup_s": stamps["begin"] - t0, "total_s": total, "same_prompt_ids": same_ids,
        "effective": {k: getattr(args, k) for k in (
            "max_new_tokens", "generation_kwargs", "per_device_train_batch_size", "gradient_accumulation_steps",
            "learning_rate", "beta", "loss_type", "temperature", "top_k", "top_p", "bf16", "gradient_checkpointing",
            "use_vllm", "max_length", "max_grad_norm", "disable_dropout")},
        "trl_defaults": {k: str(v) for k, v in trl_defaults.items()},
        "ref_model_loaded": getattr(trainer, "ref_model", None) is not None,
    }


def trl_table(prefopt: dict | None, trl: list[dict]) -> str:
    lines = ["| framework | threads | samples / iteration (cycle) | timed | s / iteration | samples/s "
             "| mean response tokens | prefopt / this | other load |", "|" + "---|" * 9]
    rows = ([dict(prefopt, label="prefopt loop (vLLM actor + learner + reference actors)", threads_label="1 per actor",
                  per=prefopt["iteration_s"], timed=prefopt["timed_iterations"])] if prefopt else [])
    rows += [dict(r, label=f"TRL {r.get('trainer', 'GRPOTrainer')} (HF generate)", threads_label=str(r["threads"]), per=r["cycle_s"],
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
