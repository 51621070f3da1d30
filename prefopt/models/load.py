"""Load any HF causal LM and its tokenizer by path, with prefopt's secure defaults.

``trust_remote_code`` is off unless the recipe sets it; weights load from safetensors only
(``use_safetensors=True``), so a checkpoint that ships only pickled ``.bin`` weights is refused
rather than unpickled.
"""
from __future__ import annotations

import torch

from prefopt.models.tiny import resolve_model_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Pad positions are masked out of attention and loss, so eos is a safe pad token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _attention(attn_implementation: str, padding_free: bool) -> str:
    """Packed forwards swap ``sdpa`` for the per-sequence SDPA of :mod:`prefopt.models.packing`."""
    if padding_free and attn_implementation == "sdpa":
        from prefopt.models.packing import register_varlen_sdpa
        return register_varlen_sdpa()
    return attn_implementation


def load_causal_lm(path: str, *, precision: str = "fp32", trust_remote_code: bool = False,
                   attn_implementation: str = "sdpa", padding_free: bool = False):
    """An HF causal LM by path (or ``builtin:`` name). ``padding_free`` swaps ``sdpa`` for the
    per-sequence SDPA of packed forwards (:mod:`prefopt.models.packing`)."""
    from transformers import AutoModelForCausalLM

    attn_implementation = _attention(attn_implementation, padding_free)

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(path), dtype=DTYPES[precision], trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation, use_safetensors=True)
    model.config.use_cache = False
    return model


def load_value_model(path: str, *, precision: str = "fp32", trust_remote_code: bool = False,
                     attn_implementation: str = "sdpa", num_heads: int = 1, padding_free: bool = False):
    """A critic: the checkpoint's backbone with a fresh token head of ``num_heads`` outputs (V per
    position; one head per reward channel in constrained PPO)."""
    from transformers import AutoModelForTokenClassification

    attn_implementation = _attention(attn_implementation, padding_free)

    model = AutoModelForTokenClassification.from_pretrained(
        resolve_model_path(path), num_labels=num_heads, dtype=DTYPES[precision],
        trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
        use_safetensors=True)
    model.config.use_cache = False
    return model
