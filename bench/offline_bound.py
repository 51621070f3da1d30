#!/usr/bin/env python
"""How fast could prefopt be against TRL on a bench workload, given this machine's GEMM speed?

    python bench/offline_bound.py                       # llama-30m workloads, 2 threads
    python bench/offline_bound.py --models 30m --threads 1
    python bench/offline_bound.py --results runs/bench/<dir>/results.json   # + measured ratios

Per workload of ``bench/offline.py`` (same model, data generator, batches), without training:

* tokens per optimizer step through the model: TRL's padded micro-batches, read from
  ``DPOTrainer``'s own train dataloader (no reference forward is run), and prefopt's packed rows
  (``packing.pack`` with the prompt shared by chosen and rejected, the step batches and
  micro-batches of the offline loop);
* GEMM FLOPs per step (forward + backward = 6 x linear parameters x tokens; TRL's LM head on
  every position, prefopt's only where a token is scored) and the GEMM throughput of the model's
  own shapes on this machine, in fp32 (the bench's precision), bf16 and fp16;
* so the GEMM time of a step for each: the floor of prefopt's step, and, with ``--results``,
  TRL's measured step minus its GEMM time = TRL's non-GEMM time per token. The ceiling printed is
  the step-time ratio prefopt reaches if its non-GEMM work per token equals TRL's (both run the
  same eager HF modules); above it needs prefopt's non-GEMM work per token below TRL's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline import MODELS, write_data  # noqa: E402  (bench/ on sys.path)


def gemm_gflops(m: int, k: int, n: int, dtype, threads: int, reps: int = 8) -> float:
    import torch
    torch.set_num_threads(threads)
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ w
    start = time.perf_counter()
    for _ in range(reps):
        a @ w
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def linear_params(model) -> tuple[int, int]:
    """(parameters of the decoder's linear layers, parameters of the LM head)."""
    import torch
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def trl_tokens(spec: dict, model_dir: str, train_path: Path) -> list[int]:
    """Tokens (incl. padding) of each optimizer step in TRL's DPOTrainer train dataloader."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=spec["micro"], seed=0,
                         gradient_accumulation_steps=spec["batch"] // spec["micro"], max_steps=spec["steps"],
                         max_length=spec["max_length"], bf16=False, report_to="none", save_strategy="no",
                         precompute_ref_log_probs=False, disable_tqdm=True)
        trainer = DPOTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(model_dir),
                             train_dataset=Dataset.from_list(rows))
        per_micro = [int(b["input_ids"].numel()) for b in trainer.get_train_dataloader()]
    accum = spec["batch"] // spec["micro"]
    return [sum(per_micro[i:i + accum]) for i in range(0, accum * spec["steps"], accum)]


def prefopt_tokens(spec: dict, model_dir: str, train_path: Path) -> tuple[list[int], list[int]]:
    """(packed tokens, scored tokens) of each optimizer step of the offline loop (1 learner)."""
    from prefopt.config import load_recipe
    from prefopt.data import load_preference_data
    from prefopt.data.collate import collate_examples
    from prefopt.data import batching
    from prefopt.models.load import load_tokenizer
    from prefopt.models.packing import pack
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny_dpo.yaml", [
        f"model.path={model_dir}", f"data.path={train_path}", "data.eval_fraction=0",
        f"data.max_length={spec['max_length']}", f"data.max_prompt_length={spec['max_prompt_length']}"])
    tokenizer = load_tokenizer(model_dir)
    data = load_preference_data(recipe.data, tokenizer, seed=0, cache_dir=None)
    packed, scored = [], []
    for idx in batching.step_batches(len(data.train), spec["batch"], seed=0, epochs=1, max_steps=spec["steps"]):
        examples = [data.train[i] for i in idx]
        total = kept = 0
        for micro in batching.split_for_learners(examples, 1, spec["micro"], sort_by_length=True)[0]:
            b = collate_examples(micro, pad_id=tokenizer.pad_token_id, kind="pairs")
            p = pack(b["input_ids"], b["attention_mask"], b["loss_mask"], share_prompts=True)
            total, kept = total + p.input_ids.shape[1], kept + p.keep.shape[0]
        packed.append(total)
        scored.append(kept)
    return packed, scored


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="30m,30m-long", help="comma-separated subset of: " + ",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", help="a bench results.json (same machine, same threads) for measured step times")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from prefopt.models.load import load_tokenizer
    from prefopt.models.tiny import resolve_model_path
    measured = {}
    if a.results:
        for r in json.loads(Path(a.results).read_text())["results"]:
            measured[(r.get("model"), r.get("row"))] = r
    for key in a.models.split(","):
        spec = MODELS[key]
        model_dir = resolve_model_path(spec["model"])
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        body, head = linear_params(model)
        hidden, inter = model.config.hidden_size, model.config.intermediate_size
        with tempfile.TemporaryDirectory() as tmp:
            train_path, _, _ = write_data(spec, Path(tmp), load_tokenizer(model_dir))
            trl = trl_tokens(spec, model_dir, train_path)
            packed, scored = prefopt_tokens(spec, model_dir, train_path)
        trl_mean, packed_mean = statistics.mean(trl), statistics.mean(packed)
        m = int(packed_mean) // spec["batch"] * spec["micro"]     # rows of one micro-batch's GEMMs
        shapes = [(m, hidden, inter), (m, inter, hidden), (m, hidden, hidden)]
        rates = {str(dt).removeprefix("torch."): statistics.mean(gemm_gflops(*s, dt, a.threads) for s in shapes)
                 for dt in (torch.float32, torch.bfloat16, torch.float16)}
        fp32 = rates["float32"] * 1e9
        trl_gemm = statistics.mean(6 * (body + head) * t / fp32 for t in trl)
        pre_gemm = statistics.mean((6 * body * t + 6 * head * s) / fp32 for t, s in zip(packed, scored))
        print(f"== {spec['label']} ({a.threads} threads)")
        print(f"tokens per step: TRL padded {trl_mean:.0f}, prefopt packed {packed_mean:.0f} "
              f"(ratio {sum(trl) / sum(packed):.2f}x); linear params {body / 1e6:.1f}M + LM head {head / 1e6:.2f}M")
        print("GEMM GFLOP/s at the model's shapes: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
        print(f"GEMM s per step at fp32: TRL {trl_gemm:.3f}, prefopt {pre_gemm:.3f}")
        t_row, p_row = measured.get((key, "trl-fair")), measured.get((key, "prefopt-1l-2t"))
        if t_row and p_row:
            trl_step, pre_step = t_row["train_s"] / len(trl), p_row["train_s"] / len(packed)
            trl_other = trl_step - trl_gemm
            per_token = trl_other / trl_mean
            ceiling = trl_step / (pre_gemm + per_token * packed_mean)
            print(f"measured step s: TRL fair {trl_step:.3f} (non-GEMM {trl_other:.3f}), prefopt {pre_step:.3f} "
                  f"(non-GEMM {pre_step - pre_gemm:.3f}); x TRL {trl_step / pre_step:.2f}")
            print(f"ceiling with prefopt's non-GEMM per token = TRL's: {ceiling:.2f}x; "
                  f"1.5x needs prefopt's non-GEMM per token at "
                  f"{(trl_step / 1.5 - pre_gemm) / packed_mean / per_token:.2f}x TRL's")


if __name__ == "__main__":
    main()
