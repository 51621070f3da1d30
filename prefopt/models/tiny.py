"""Tiny Llama-family models and a byte-level BPE tokenizer, built offline (no hub).

``builtin:<name>`` model paths in recipes resolve here. The tokenizer is trained on the
synthetic-data corpus, so every synthetic word is one or two tokens; weights are random
(seeded), so builds are reproducible. Builds are cached under ``prefopt.cache.cache_dir()`` and
written atomically (a temp directory renamed into place).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from prefopt.cache import cache_dir

# name -> LlamaConfig overrides. vocab_size is the tokenizer's.
BUILTIN_MODELS: dict[str, dict] = {
    # head_dim 32: the smallest head size vLLM's CPU attention supports
    "tiny-llama": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2),
    # random-weight models big enough that compute dominates (benchmarks)
    "llama-30m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8),
    # a sequence-classification reward model (one score), random weights
    "tiny-reward": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, head="score"),
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12),
    "llama-300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16),
}
VOCAB_SIZE = 512
MAX_POSITIONS = 1024
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BUILTIN_PREFIX = "builtin:"


def build_tokenizer(out_dir: str | Path):
    """Train a byte-level BPE tokenizer on the synthetic corpus and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from prefopt.data.synthetic import corpus

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=MAX_POSITIONS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the builtin model ``name`` (random weights, seeded) with its tokenizer into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    if name not in BUILTIN_MODELS:
        from prefopt.errors import ConfigError, did_you_mean
        raise ConfigError(f"unknown builtin model '{name}'{did_you_mean(name, BUILTIN_MODELS)}; "
                          f"available: {', '.join(BUILTIN_MODELS)}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    spec = dict(BUILTIN_MODELS[name])
    head = spec.pop("head", "lm")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         torch_dtype="float32", num_labels=1, **spec)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config) if head == "score" else LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def builtin_model_path(name: str, seed: int = 0) -> Path:
    """The cached directory of builtin model ``name``, built on first use."""
    if name not in BUILTIN_MODELS:
        build_model(name, "", seed)  # raises the ConfigError naming the valid builtins
    spec = json.dumps([BUILTIN_MODELS[name], VOCAB_SIZE, MAX_POSITIONS, CHAT_TEMPLATE], sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:8]   # a changed definition never reuses a stale build
    path = cache_dir() / "models" / f"{name}-s{seed}-{digest}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
    from prefopt import console
    console.status(f"building the builtin model {name} (first use on this machine)")
    # saving imports DeepSpeed (transformers' integration), which warns that it found no GPU; this
    # process never runs DeepSpeed, so its accelerator is CPU without asking
    saved = os.environ.setdefault("DS_ACCELERATOR", "cpu") if "DS_ACCELERATOR" not in os.environ else None
    try:
        build_model(name, tmp, seed)
        try:
            os.rename(tmp, path)
        except OSError:  # another process built it first
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if saved is not None:
            os.environ.pop("DS_ACCELERATOR", None)
    return path


def resolve_model_path(path: str) -> str:
    """Map ``builtin:<name>`` to its cached directory; other paths are returned unchanged, except that
    a local-looking path (absolute, ``./``, ``~``) that does not exist is a clear error."""
    if path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_path(path[len(BUILTIN_PREFIX):]))
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        from prefopt.errors import ConfigError
        raise ConfigError(f"model path '{path}' does not exist (a local directory was expected; "
                          f"hub names look like 'org/name')")
    return str(Path(path).expanduser()) if path.startswith("~") else path
