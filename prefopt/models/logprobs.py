"""Per-sequence log-probabilities of response tokens."""
from __future__ import annotations

import torch

from prefopt.objectives.base import PolicyOutput, ValueOutput


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under ``logits`` ([N, T, V] -> [N, T]), in float32 or wider.

    Uses gather - logsumexp, which never materialises a full [N, T, V] log-softmax copy.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> PolicyOutput:
    """Summed log-probs of the tokens where ``loss_mask`` is True, predicted from position t-1."""
    labels = input_ids[:, 1:]
    mask = loss_mask[:, 1:].to(torch.bool)
    per_token = token_logps(logits[:, :-1, :], labels.clamp(min=0))
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return PolicyOutput(logps=per_token.sum(-1), num_tokens=mask.sum(-1).to(per_token.dtype),
                        token_logps=per_token, token_mask=mask)


def forward_logps(model, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                  with_entropy: bool = False, packing: str | None = None) -> PolicyOutput:
    """One forward of every row in ``batch`` (chosen and rejected concatenated) -> PolicyOutput.

    ``packing`` (:func:`prefopt.models.packing.packing_mode`): ``"rows"`` = one packed row of the
    non-pad tokens, logits only where a response token is scored; ``"shared"`` = the same, with one
    copy of each prompt shared by its rows. The same PolicyOutput, without the pad (and repeated
    prompt) FLOPs.
    """
    if packing:
        return _packed_forward_logps(model, batch, temperature, with_entropy, share_prompts=packing == "shared")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    if temperature != 1.0:
        logits = logits / temperature
    out = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    if with_entropy:
        from prefopt.rl.ppo import entropy_from_logits
        out.entropy = entropy_from_logits(logits[:, :-1, :].float())
    return out


def _packed_forward_logps(model, batch, temperature: float, with_entropy: bool, share_prompts: bool) -> PolicyOutput:
    from prefopt.models.packing import pack, packed_logits
    packed = pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], share_prompts=share_prompts)
    logits = packed_logits(model, packed)
    if temperature != 1.0:
        logits = logits / temperature
    per_token = packed.unpack(token_logps(logits, packed.labels))
    mask = packed.mask
    out = PolicyOutput(logps=per_token.sum(-1), num_tokens=mask.sum(-1).to(per_token.dtype),
                       token_logps=per_token, token_mask=mask)
    if with_entropy:
        from prefopt.rl.ppo import entropy_from_logits
        out.entropy = packed.unpack(entropy_from_logits(logits.float()))
    return out


def forward_values(model, batch: dict[str, torch.Tensor], packing: str | None = None) -> ValueOutput:
    """Critic forward: a token-classification head gives V at every position: ``[N, L-1]`` values
    for a one-output head, ``[N, L-1, H]`` for an H-head critic (constrained PPO).

    ``packing``: as :func:`forward_logps`; values are then 0 outside the response positions (the
    only ones GAE and the value loss read).
    """
    if packing:
        from prefopt.models.packing import pack, packed_forward
        packed = pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                      share_prompts=packing == "shared")
        values = packed.unpack(packed_forward(model, packed).logits[0, packed.keep])
        if values.shape[-1] == 1:
            values = values[..., 0]
        return ValueOutput(values=values.float(), token_mask=packed.mask)
    values = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if values.shape[-1] == 1:
        values = values[..., 0]
    mask = batch["loss_mask"][:, 1:].to(torch.bool)
    return ValueOutput(values=values[:, :-1].float(), token_mask=mask)
