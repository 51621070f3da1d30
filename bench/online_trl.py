"""Part 3 of ``bench/online.py``: TRL's ``GRPOTrainer`` on the loop row's workload (worker
``online.py --worker trl``) and the samples/s table, prefopt loop vs TRL.
"""
from __future__ import annotations

import statistics
import time

from online_common import BUSY, REPO, _load

# Part 3: TRL GRPOTrainer on the workload of the loop row of the same model (recipe + overrides), with
# 1 thread like each prefopt actor (--trl-threads). Rounds run interleaved, the fastest is kept.
TRL = {"tiny": dict(cycles=20, rounds=2), "100m": dict(cycles=3, rounds=1)}
TRL_QUICK = {"tiny": dict(cycles=6, rounds=1)}
TRL_DEFAULT_MODELS = ("tiny",)      # llama-100m on request (--trl-models tiny,100m): ~1.5 minutes more


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
