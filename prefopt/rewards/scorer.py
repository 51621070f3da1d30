"""Score responses with trained reward models, in this process (the reward role's actors and
``prefopt score`` both use it).

Each model renders a sample with **its own** tokenizer and chat template, exactly as its training
rows were rendered (:mod:`prefopt.data.examples`): a prompt given as chat messages goes through the
model's chat template (generation prompt), the response is what the template writes for the
assistant's turn; a plain-text prompt is tokenized with special tokens and the response follows,
then eos. A process reward model reads a response given as steps, each followed by its delimiter
(:func:`prefopt.data.reward_rows.tokenize_steps`), and scores every step in one forward.

Samples are batched by tokens (``batch_tokens`` of padded rows, longest first).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

METADATA_KEY = "prefopt_reward"


def reward_metadata(path: str) -> dict:
    """What a reward model's ``config.json`` says about serving it: ``kind`` (outcome | attributes |
    process), ``heads`` (output names), ``step_delimiter`` (process models). Checkpoints made
    elsewhere get ``kind: outcome`` and their ``id2label`` names (one head: ``reward``)."""
    from prefopt.models.tiny import resolve_model_path
    local = Path(resolve_model_path(path)) / "config.json"
    if local.is_file():
        config = json.loads(local.read_text())
    else:                      # a hub name: its config.json (from the cache, or downloaded when allowed)
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(path).to_dict()
    meta = dict(config.get(METADATA_KEY) or {})
    labels = config.get("id2label") or {}
    heads = [labels[k] for k in sorted(labels, key=int)] if len(labels) > 1 else ["reward"]
    meta.setdefault("heads", heads)
    meta.setdefault("kind", "outcome")
    return meta


def render(tokenizer, prompt, response: str) -> list[int]:
    """Token ids of ``prompt`` (text or chat messages) + ``response``, rendered as training rows are."""
    if isinstance(prompt, list):
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        response_text = full[len(prompt_text):] if full.startswith(prompt_text) else response
        return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
                + tokenizer(response_text, add_special_tokens=False)["input_ids"])
    ids = tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def render_steps(tokenizer, prompt, steps: list[str], delimiter: str) -> tuple[list[int], list[int], int]:
    """``(ids, step_end_positions, prompt_length)`` of ``prompt`` + a response written as ``steps``."""
    from prefopt.data.reward_rows import tokenize_steps
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
    response, ends = tokenize_steps(tokenizer, steps, delimiter) if steps else ([], [])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(prompt_ids) + response + eos, [len(prompt_ids) + e for e in ends], len(prompt_ids)


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that rows x longest row <= ``batch_tokens`` (one row at least)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def _fit(ids: list[int], positions: list[int], limit: int, bos: int | None) -> tuple[list[int], list[int]]:
    """A row longer than the model's ``limit`` positions loses tokens from its start (after bos), as
    training truncates prompts: the response's end, where outcome scores are read, stays. Step ends cut
    off with them are read at the first kept token."""
    if len(ids) <= limit:
        return ids, positions
    keep_bos = bos is not None and ids and ids[0] == bos
    cut = len(ids) - limit
    kept = ([ids[0]] + ids[1 + cut:]) if keep_bos else ids[cut:]
    first = 1 if keep_bos else 0
    return kept, [max(first, p - cut) for p in positions]


@dataclass
class Member:
    path: str
    tokenizer: object
    model: object
    meta: dict


class RewardScorer:
    """One or more reward models (an ensemble's members) held in this process."""

    def __init__(self, paths: list[str], *, trust_remote_code: bool = False, batch_tokens: int = 8192,
                 device: str | None = None):
        import torch

        from prefopt.models.load import load_tokenizer
        from prefopt.models.reward import load_reward_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_tokens = batch_tokens
        self.members = []
        for path in paths:
            meta = reward_metadata(path)
            tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
            model = load_reward_model(path, num_labels=len(meta["heads"]), trust_remote_code=trust_remote_code,
                                      pad_token_id=tokenizer.pad_token_id).to(self.device).eval()
            self.members.append(Member(path, tokenizer, model, meta))

    def heads(self) -> list[list[str]]:
        return [m.meta["heads"] for m in self.members]

    def score(self, prompts: list, responses: list[str]) -> list[list[list[float]]]:
        """Per member, per sample, the heads' outputs at the response's last token: ``[M][N][H]``."""
        out = []
        for m in self.members:
            rows = [render(m.tokenizer, p, r) for p, r in zip(prompts, responses)]
            scores = self._forward(m, rows, [[len(ids) - 1] for ids in rows])
            out.append([s[0] for s in scores])
        return out

    def score_steps(self, prompts: list, steps: list[list[str]], delimiter: str | None = None
                    ) -> list[list[list[float]]]:
        """Per member, per sample, the first head at the end of every step, from one forward: ``[M][N][K_n]``.
        A model trained as a process reward model (``kind: process``) gives the probability that the
        step is correct (the sigmoid of its logit, what its cross-entropy was trained on)."""
        import math
        out = []
        for m in self.members:
            d = delimiter or m.meta.get("step_delimiter") or "\n"
            rendered = [render_steps(m.tokenizer, p, s, d) for p, s in zip(prompts, steps)]
            scores = self._forward(m, [ids for ids, _, _ in rendered], [ends for _, ends, _ in rendered])
            link = (lambda x: 1.0 / (1.0 + math.exp(-x))) if m.meta["kind"] == "process" else float
            out.append([[link(h[0]) for h in s] for s in scores])
        return out

    def _forward(self, member: Member, rows: list[list[int]], positions: list[list[int]]) -> list[list[list[float]]]:
        """The head's outputs at ``positions`` of each row: ``[N][K_n][H]``."""
        import torch

        from prefopt.models.reward import forward_scores

        limit = getattr(member.model.config, "max_position_embeddings", None)
        if limit is not None:
            rows, positions = zip(*[_fit(ids, pos, limit, member.tokenizer.bos_token_id)
                                    for ids, pos in zip(rows, positions)]) if rows else ((), ())
        out: list = [None] * len(rows)
        pad = member.tokenizer.pad_token_id
        with torch.no_grad():
            for batch in token_batches([len(r) for r in rows], self.batch_tokens):
                width = max(len(rows[i]) for i in batch)
                steps = max(1, max(len(positions[i]) for i in batch))
                ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in batch], device=self.device)
                mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in batch],
                                    device=self.device)
                where = torch.tensor([positions[i] + [-1] * (steps - len(positions[i])) for i in batch],
                                     device=self.device)
                scores = forward_scores(member.model, {"input_ids": ids, "attention_mask": mask,
                                                       "step_positions": where}).scores.double().cpu()
                for j, i in enumerate(batch):
                    out[i] = scores[j, :len(positions[i])].tolist()
        return out
