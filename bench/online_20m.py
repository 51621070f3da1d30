"""Part ``20m`` of ``bench/online.py``: a ~20M-parameter model, prefopt vs TRL on two online workloads.

    python bench/online.py --parts 20m --rounds 3          # all rows, 3 interleaved rounds (~25 min idle)
    python bench/online.py --parts 20m --rows 20m,trl-20m  # GRPO only

Assets (built once, cached under ``prefopt.cache.cache_dir()/bench/``, rebuilt when their definition
changes): a byte-level BPE tokenizer of 8,192 tokens trained offline (prefopt's tiny-tokenizer recipe,
``prefopt.models.tiny.build_tokenizer``, on a larger synthetic corpus: ``prefopt.data.synthetic.corpus()``
plus 20,000 lines of compounds of the synthetic words, enough for 8,192 real merges, no padding),
a Llama policy (hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 8,192, untied head: 21.0M
parameters, random seeded weights), a tiny sequence-classification reward model with the same
tokenizer (hidden 64, 2 layers, one score; the online-DPO workloads), 256 prompts of 16-48 words of
the synthetic vocabulary (``NOUNS`` / ``GOOD_WORDS`` / ``BAD_WORDS``) in a JSONL file, and the two
prefopt recipes (``grpo.yaml``: base ``recipes/tiny_grpo.yaml``; ``online_dpo.yaml``: base
``recipes/tiny_online_dpo.yaml``). prefopt (``model.path``) and TRL load the same folders and prompt file.

Workloads (an iteration = 16 samples x 64 new tokens, EOS masked in both frameworks: prefopt
``min_tokens = max_tokens = 64`` + ``ignore_eos``; TRL ``generation_kwargs.min_new_tokens = 64``):

* ``20m`` GRPO: 4 prompts x 4 samples, one optimizer step of 16 samples per iteration (micro-batch 16),
  ``ppo_epochs`` / ``num_iterations`` 1, lr 1e-5 constant, kl_coef = TRL ``beta`` = 0.01 (both load a
  reference model; TRL 1.16's default beta is 0.0), clip 0.2, reward ``good_word_fraction``.
  prefopt rows: ``20m`` (the recipe, synchronous, old log-probs from the learner),
  ``20m-rollout`` (engine log-probs as old log-probs: with one on-policy step per iteration TRL
  skips that pass too), ``20m-async`` (+ ``train.async_rollouts``). TRL: ``GRPOTrainer``
  (``num_generations`` 4, ``generation_batch_size`` 16, ``per_device_train_batch_size`` 16,
  ``gradient_accumulation_steps`` 1, HF ``generate``).
* ``online-dpo-20m``: 8 prompts x 2 samples ranked by the reward model, one DPO step on the 8 pairs
  per iteration, beta 0.1, lr 1e-5 constant. prefopt rows ``online-dpo-20m`` (objective dpo with
  ``roles.rollout``, reward source ``{model: <reward>}``) and ``online-dpo-20m-async``; TRL:
  ``trl.experimental.online_dpo.OnlineDPOTrainer`` (2 completions per prompt, ``reward_funcs`` = the
  same reward model, ``per_device_train_batch_size`` 8, HF ``generate``).

samples/s = samples per iteration / mean iteration wall time, iteration (TRL: generation cycle) 1
excluded, in both. Rows run one per subprocess in interleaved rounds (``--rounds``); the table keeps
each row's fastest round and lists all.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import statistics
import tempfile
from pathlib import Path

from online_common import BUSY, REPO

VOCAB = 8192
POLICY = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8)
REWARD = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2)
PROMPTS, PROMPT_WORDS = 256, (16, 48)
COMPOUND_LINES = 20000
NEW_TOKENS, SAMPLES = 64, 16
LR = 1.0e-5
VERSION = 1          # bump when the asset builder changes

GRPO_RECIPE = {
    "base": str(REPO / "recipes" / "tiny_grpo.yaml"),
    "name": "bench-20m-grpo",
    "description": "bench/online.py 20m: GRPO, 4 prompts x 4 samples x 64 tokens per iteration",
    "model": {"path": "{assets}/policy"},
    "data": {"path": "{assets}/prompts.jsonl", "max_prompt_length": 64},
    "objective": {"kl_coef": 0.01, "clip_eps": 0.2, "ppo_epochs": 1},
    "roles": {"rollout": {"max_model_len": 256,
                          "sampling": {"n": 4, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
                                       "ignore_eos": True}}},
    "train": {"prompts_per_iteration": 4, "batch_size": 16, "micro_batch_size": 16, "lr": LR},
    "expect": {},
}
ODPO_RECIPE = {
    "base": str(REPO / "recipes" / "tiny_online_dpo.yaml"),
    "name": "bench-20m-online-dpo",
    "description": "bench/online.py 20m: online DPO, 8 prompts x 2 samples x 64 tokens, reward model",
    "model": {"path": "{assets}/policy"},
    "data": {"path": "{assets}/prompts.jsonl", "max_prompt_length": 64},
    "objective": {"beta": 0.1},
    "roles": {"rollout": {"max_model_len": 256,
                          "sampling": {"n": 2, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
                                       "ignore_eos": True}},
              "reward": {"sources": [{"model": "{assets}/reward"}]}},
    "train": {"prompts_per_iteration": 8, "batch_size": 8, "micro_batch_size": 8, "lr": LR,
              "dynamic_sampling": False},
    "expect": {},
}
RECIPES = {"grpo.yaml": GRPO_RECIPE, "online_dpo.yaml": ODPO_RECIPE}

ITERATIONS = 10
# row id -> what runs it: a prefopt loop row (bench/online_loop.py LOOP key) or a TRL row
ROWS = {
    "20m": dict(kind="loop", workload="20m"),
    "20m-rollout": dict(kind="loop", workload="20m"),
    "20m-async": dict(kind="loop", workload="20m"),
    "trl-20m": dict(kind="trl", workload="20m", trl="20m"),
    "online-dpo-20m": dict(kind="loop", workload="online-dpo-20m"),
    "online-dpo-20m-async": dict(kind="loop", workload="online-dpo-20m"),
    "trl-online-dpo-20m": dict(kind="trl", workload="online-dpo-20m", trl="online-dpo-20m"),
}
WORKLOADS = {
    "20m": "GRPO, llama-20m: 4 prompts x 4 samples x 64 tokens per iteration, 1 step of 16",
    "online-dpo-20m": "online DPO, llama-20m + reward model: 8 prompts x 2 samples x 64 tokens, 1 step of 8 pairs",
}
TARGETS = {"20m": 2.0, "online-dpo-20m": 1.5}


def _digest() -> str:
    spec = json.dumps([VERSION, VOCAB, POLICY, REWARD, PROMPTS, PROMPT_WORDS, COMPOUND_LINES, RECIPES],
                      sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:8]


def assets_dir() -> Path:
    from prefopt.cache import cache_dir
    return cache_dir() / "bench" / f"online-20m-{_digest()}"


def _corpus() -> list[str]:
    """prefopt's tokenizer corpus plus lines of compounds of the synthetic words ("riverkind", ...): the
    synthetic vocabulary alone gives a few hundred merges, the compounds give BPE 8k real ones."""
    from prefopt.data.synthetic import BAD_WORDS, GOOD_WORDS, NOUNS, corpus
    words = GOOD_WORDS + BAD_WORDS + NOUNS
    rng = random.Random(20)
    lines = list(corpus())
    for _ in range(COMPOUND_LINES):
        lines.append(" ".join("".join(rng.sample(words, rng.randint(1, 3))) for _ in range(rng.randint(4, 12))))
    return lines


def _tokenizer(out: Path):
    """prefopt.models.tiny.build_tokenizer with vocab 8192 and the larger corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from prefopt.models.tiny import CHAT_TEMPLATE, MAX_POSITIONS
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=MAX_POSITIONS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def _model(out: Path, tokenizer, spec: dict, head: str, seed: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from prefopt.models.tiny import MAX_POSITIONS
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
                         num_labels=1, **spec)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config) if head == "score" else LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def _prompts() -> list[dict]:
    from prefopt.data.synthetic import BAD_WORDS, GOOD_WORDS, NOUNS
    rng = random.Random(0)
    words = NOUNS + GOOD_WORDS + BAD_WORDS
    rows = []
    for _ in range(PROMPTS):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(*PROMPT_WORDS)))
        rows.append({"prompt": text[0].upper() + text[1:] + "."})
    return rows


def build_assets() -> Path:
    """The cached asset folder (built on first use, atomically)."""
    import yaml
    path = assets_dir()
    if (path / "info.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".online-20m-", dir=path.parent))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        tokenizer = _tokenizer(tmp / "tokenizer")
        policy = _model(tmp / "policy", tokenizer, POLICY, "lm", seed=0)
        reward = _model(tmp / "reward", tokenizer, REWARD, "score", seed=1)
        rows = _prompts()
        with open(tmp / "prompts.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        lengths = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
        for name, recipe in RECIPES.items():
            text = json.dumps(recipe).replace("{assets}", str(path))
            (tmp / name).write_text(yaml.safe_dump(json.loads(text), sort_keys=False))
        info = {"vocab": len(tokenizer), "policy_params": policy, "reward_params": reward,
                "prompt_tokens": {"min": min(lengths), "mean": statistics.mean(lengths), "max": max(lengths)},
                "prompts": len(rows), "words": list(PROMPT_WORDS), "corpus_lines": len(_corpus())}
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, path)
        except OSError:     # built by another process meanwhile
            if not (path / "info.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def assets_info() -> dict:
    path = build_assets()
    return dict(json.loads((path / "info.json").read_text()), path=str(path))


def run_part(a, out: Path, note) -> dict:
    """All selected rows, ``a.rounds`` interleaved rounds; returns {"rows": {id: [runs]}, ...}."""
    from online_common import run_row
    from online_loop import LOOP
    from online_trl import TRL
    info = assets_info()
    print(f"== 20m: assets {info['path']}: vocab {info['vocab']}, policy {info['policy_params'] / 1e6:.1f}M "
          f"params, reward model {info['reward_params'] / 1e6:.2f}M, prompts {info['prompt_tokens']['min']}-"
          f"{info['prompt_tokens']['max']} tokens (mean {info['prompt_tokens']['mean']:.1f})", flush=True)
    ids = a.rows.split(",") if a.rows else list(ROWS)
    unknown = [i for i in ids if i not in ROWS]
    if unknown:
        raise SystemExit(f"unknown --rows {unknown}; known: {', '.join(ROWS)}")
    threads = [int(x) for x in a.trl_threads.split(",")]
    iters = a.iterations or ITERATIONS
    runs: dict[str, list] = {}
    for rnd in range(a.rounds):
        print(f"-- round {rnd + 1}/{a.rounds}", flush=True)
        for rid in ids:
            row = ROWS[rid]
            if row["kind"] == "loop":
                spec = dict(LOOP[rid], iterations=iters, assets=info["path"])
                name = f"{rid}-r{rnd}"
                r = run_row(name, "loop", {"spec": spec}, out, a)
                runs.setdefault(rid, []).append(r)
                note(name, r, f"{r['samples_per_s']:6.2f} samples/s, {r['iteration_s']:.3f} s/iteration, gen "
                              f"{r['gen_tokens_per_s']:,.0f} tokens/s " + " ".join(
                                  f"{k} {v:.2f}" for k, v in r["split_s"].items()))
                continue
            tspec = TRL[row["trl"]]
            for th in threads:
                key = rid if th == 1 else f"{rid}-{th}t"
                name = f"{key}-r{rnd}"
                r = run_row(name, "trl", {"threads": th, "cycles": iters, "trainer": tspec.get("trainer", "grpo"),
                                          "recipe": str(Path(info["path"]) / tspec["recipe"]),
                                          "overrides": tspec.get("overrides", [])}, out, a)
                runs.setdefault(key, []).append(r)
                note(name, r, f"{r['samples_per_s']:6.2f} samples/s, {r['cycle_s']:.3f} s/cycle, {th} thread(s), "
                              f"mean response {r['response_length']:.1f} tokens"
                              + (f", generate {r['split_s']['generate']:.2f} s" if r.get("split_s") else ""))
    return {"assets": info, "iterations": iters, "rounds": a.rounds, "runs": runs}


def pool(parts: list[dict | None]) -> dict | None:
    """The 20m results of several runs as one (``--render a.json b.json``): every row's runs together."""
    parts = [p for p in parts if p]
    if len(parts) < 2:
        return parts[0] if parts else None
    runs: dict[str, list] = {}
    for p in parts:
        for k, rs in p["runs"].items():
            runs.setdefault(k, []).extend(rs)
    iters = sorted({p["iterations"] for p in parts})
    return dict(parts[0], runs=runs, rounds=" + ".join(str(p["rounds"]) for p in parts),
                iterations=iters[0] if len(iters) == 1 else "/".join(map(str, iters)))


def _best(rs: list[dict]) -> dict:
    best = dict(max(rs, key=lambda r: r["samples_per_s"]))
    best["all_samples_per_s"] = [r["samples_per_s"] for r in rs]
    best["all_other_load"] = [r["other_load_cores"] for r in rs]
    return best


def _row(key: str) -> tuple[str, int]:
    """A result key (a row id, TRL rows with "-<N>t" for N > 1 threads) -> (row id, threads)."""
    if key in ROWS:
        return key, 1
    rid, th = key.rsplit("-", 1)
    return rid, int(th[:-1])


def _label(key: str) -> str:
    from online_loop import LOOP
    rid, th = _row(key)
    if ROWS[rid]["kind"] == "loop":
        return "prefopt " + LOOP[rid]["label"].split(": ", 1)[-1] + " (1 thread per actor)"
    return ("TRL GRPOTrainer" if ROWS[rid]["workload"] == "20m" else "TRL OnlineDPOTrainer") + \
        f" (HF generate), {th} thread(s)"


def table(p: dict) -> str:
    """One table per workload: every row's fastest round (all rounds in brackets), its time split, and
    its ratio to each TRL row (1 thread, and 2 with ``--trl-threads 1,2``)."""
    out = []
    info = p["assets"]
    for wl, title in WORKLOADS.items():
        keys = [k for k in p["runs"] if ROWS[_row(k)[0]]["workload"] == wl]
        if not keys:
            continue
        best = {k: _best(p["runs"][k]) for k in keys}
        trl_keys = [k for k in keys if ROWS[_row(k)[0]]["kind"] == "trl"]
        lines = [f"{title} (vocab {info['vocab']}, {info['policy_params'] / 1e6:.1f}M parameters; "
                 f"{p['iterations']} iterations / cycles per run, the first excluded; fastest of {p['rounds']} "
                 "round(s), all rounds in brackets, in the order run)", "",
                 "| row | samples/s | s / iteration | generate s | reward s | reference s | learn s | sync s "
                 "| gen tokens/s | response tokens | " + " | ".join(f"x TRL {_row(t)[1]}t" for t in trl_keys)
                 + " | other load |", "|" + "---|" * (11 + len(trl_keys))]
        for k in keys:
            r = best[k]
            sp = r.get("split_s", {})
            per = r.get("iteration_s", r.get("cycle_s"))
            rounds = " / ".join(f"{x:.2f}" for x in r["all_samples_per_s"])
            ratios = " | ".join(("**%.2f**" % (r["samples_per_s"] / best[t]["samples_per_s"]) if k not in trl_keys
                                 else "%.2f" % (r["samples_per_s"] / best[t]["samples_per_s"])) for t in trl_keys)
            load = " / ".join(f"{x:.2f}" + (" ⚠" if x >= BUSY else "") for x in r["all_other_load"])
            if r["kind"] == "trl":      # TRL: learn = the rest of the cycle (policy forward/backward, optimizer)
                sp = dict(sp, learn=per - sum(sp.values()))
            cells = " | ".join(f"{sp[s]:.2f}" if s in sp else "" for s in
                               ("generate", "reward", "reference", "learn", "sync"))
            gen = f"{r['gen_tokens_per_s']:,.0f}" if r.get("gen_tokens_per_s") else ""
            lines.append(f"| {_label(k)} | **{r['samples_per_s']:.2f}** ({rounds}) | {per:.2f} | {cells} | {gen} "
                         f"| {r['response_length']:.1f} | {ratios} | {load} |")
        out.append("\n".join(lines) + f"\n\nTarget: prefopt >= {TARGETS[wl]}x TRL samples/s. prefopt's generate s "
                   "under async rollouts is the driver's wait for the prefetched batch; gen tokens/s = tokens / "
                   "the engine's own generation seconds (TRL: / the seconds in HF generate). TRL learn s = the "
                   "rest of its cycle (policy forward / backward, optimizer, loss, logging).")
    return "\n\n".join(out)
