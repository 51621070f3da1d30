"""Reward models: any HF causal-LM checkpoint with a linear score head (``*ForSequenceClassification``).

One head of H outputs (H = 1 for a Bradley–Terry model, one per attribute for a regression model)
is read at chosen token positions of one forward:

* outcome models read it at each row's last token (what ``AutoModelForSequenceClassification``
  returns for the same text, when the pad token differs from the last token);
* process models read it at the last token of every step, so a response's K step scores cost one
  forward instead of K forwards of its prefixes (the same numbers: attention is causal).

The head is applied only at those positions, on the backbone's last hidden states.
"""
from __future__ import annotations

import torch

from prefopt.models.load import DTYPES, _attention
from prefopt.models.tiny import resolve_model_path
from prefopt.objectives.base import ScoreOutput


def load_reward_model(path: str, *, num_labels: int = 1, labels: list[str] | None = None,
                      precision: str = "fp32", trust_remote_code: bool = False, attn_implementation: str = "sdpa",
                      padding_free: bool = False, pad_token_id: int | None = None):
    """``AutoModelForSequenceClassification`` from ``path`` (a causal LM gets a fresh, seeded head;
    a reward model keeps its own). ``labels`` name the outputs (``config.id2label``)."""
    import logging

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs = {"num_labels": num_labels}
    if labels:
        kwargs.update(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)   # "newly initialized: score.weight" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(path), dtype=DTYPES[precision], trust_remote_code=trust_remote_code,
            attn_implementation=_attention(attn_implementation, padding_free), use_safetensors=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    return model


def reward_parts(model):
    """``(backbone, head)`` of a ``*ForSequenceClassification`` model (or a DeepSpeed engine around one)."""
    module = getattr(model, "module", model)
    if hasattr(module, "get_base_model"):      # a peft (LoRA) model: its adapters live inside the base model
        module = module.get_base_model()
    backbone = getattr(module, getattr(module, "base_model_prefix", "model"), None)
    head = getattr(module, "score", None)
    if backbone is None or not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(module).__name__} has no backbone + 'score' head; reward models must be "
                         f"decoder *ForSequenceClassification models (Llama, Mistral, Qwen, Gemma, ...)")
    return backbone, head


def score_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions [N, K], mask [N, K])``: the step ends when the batch has them, else each row's
    last token (right padding)."""
    if "step_positions" in batch:
        positions = batch["step_positions"]
        return positions.clamp(min=0), positions >= 0
    last = batch["attention_mask"].sum(-1, keepdim=True) - 1
    return last, torch.ones_like(last, dtype=torch.bool)


def forward_scores(model, batch: dict[str, torch.Tensor], packing: str | None = None) -> ScoreOutput:
    """One forward of every row -> the head's outputs at :func:`score_positions` ``[N, K, H]``.

    ``packing``: any packed layout runs as one row of the non-pad tokens (prompts are not shared:
    a reward model reads every row's own last token)."""
    backbone, head = reward_parts(model)
    positions, mask = score_positions(batch)
    if packing:
        from prefopt.models.packing import pack
        packed = pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], share_prompts=False)
        hidden = backbone(**packed.model_kwargs(), use_cache=False).last_hidden_state[0]       # [S, D]
        starts = packed.cu_seq_lens[:-1].to(positions.device).long().unsqueeze(-1)
        picked = hidden[(starts + positions).reshape(-1)].reshape(*positions.shape, -1)
    else:
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          use_cache=False).last_hidden_state                                    # [N, L, D]
        picked = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return ScoreOutput(scores=head(picked).float(), mask=mask)
