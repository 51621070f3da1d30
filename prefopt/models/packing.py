"""Padding-free ("packed") forwards: every non-pad token of a micro-batch in one row.

A padded micro-batch ``[N, L]`` spends compute on ``N * L - sum(lengths)`` pad tokens; with
variable-length preference data that is a quarter or more of the FLOPs (and memory) of the
forward and backward. :func:`pack` turns it into one row of ``S = sum(lengths)`` tokens with
``position_ids`` restarting at 0 for each sequence and the cumulative sequence lengths
``cu_seq_lens`` of the flash-attention "varlen" convention.

Attention must then not cross sequence boundaries:

* ``attn_implementation: flash_attention_2`` (GPU) reads ``cu_seq_lens_q/k`` natively;
* ``sdpa`` is swapped for :data:`VARLEN_SDPA` (registered here): exact causal SDPA over the
  pieces of the row that attend to each other (no S x S work), planned by cost once per forward
  (:func:`attention_plan`): a call per sequence; for a shared prompt, the prompt and first response
  causally, then each further response over [prompt, response]; or, for many short sequences, one
  call with a block-diagonal causal mask. It falls back to transformers' SDPA for padded batches;
* ``eager`` sees the packed layout in ``position_ids`` and builds a block-diagonal causal mask
  (transformers' packed-sequence detection).

Only the positions whose next token is scored are sent through the LM head (``logits_to_keep``),
so prompt and pad positions cost no ``[*, vocab]`` logits either.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property

import torch

VARLEN_SDPA = "prefopt_varlen_sdpa"
MASKED_MAX_TOKENS = 4096    # never build an S x S mask for a longer packed row
# The attention of a packed row is planned once per forward (every layer reuses the plan) as SDPA calls
# over consecutive pieces of the row, priced in (query x key x head-dim) units plus CALL_COST per call
# (split piece, SDPA, cat; forward and backward). Measured on CPU (torch 2.13, fp32, fwd + bwd): a call costs
# about as much as 5.6e5 units; a causal call costs about what the same masked call costs. Options:
# one masked call over the whole row (many short sequences: a tiny model's micro-batch), one call
# per sequence / group, or, for a group that shares its prompt, one causal call over the prompt and
# its first response plus one call per further response over [prompt, response] (a pair of
# 30 + 130 + 130 tokens: 46k instead of 84k scores per head).
CALL_COST = 560_000
_REGISTERED = False


@dataclass
class Packed:
    input_ids: torch.Tensor      # [1, S] the non-pad tokens of every row, row after row
    position_ids: torch.Tensor   # [1, S] 0..len-1 within each row
    cu_seq_lens: torch.Tensor    # [N + 1] int32 offsets of the rows in the packed row
    max_length: int              # longest row
    keep: torch.Tensor           # [K] packed positions whose next token is scored
    labels: torch.Tensor         # [K] the scored tokens
    mask: torch.Tensor           # [N, L-1] bool: where the K values go in the padded per-token view
    segments: "Segments | None" = None   # prompts shared by several rows (see pack)

    def model_kwargs(self) -> dict:
        """Keyword arguments of an HF causal LM forward over the packed row."""
        if self.segments is not None:      # only VARLEN_SDPA knows this layout
            return dict(input_ids=self.input_ids, position_ids=self.position_ids, prefopt_segments=self.segments)
        cu = self.cu_seq_lens
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, cu_seq_lens_q=cu,
                    cu_seq_lens_k=cu, max_length_q=self.max_length, max_length_k=self.max_length)

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """``[K, *D]`` values at the scored positions -> ``[N, L-1, *D]`` (0 elsewhere), differentiably."""
        out = values.new_zeros((*self.mask.shape, *values.shape[1:]))
        out[self.mask] = values
        return out


@dataclass
class Segments:
    """A packed row in which rows with the same prompt share one copy of it: per group of rows, the
    prompt (segment 0) then each row's response (segments 1, 2, ...); position ids continue from the
    prompt in every response. A response attends to the prompt and to itself (causally), never to
    the other responses of its group."""
    bounds: list                 # (start, end) of each group in the packed row
    shared: list                 # per group: more than one response (else plain causal attention)
    group: torch.Tensor          # [S] group index of each packed position
    segment: torch.Tensor        # [S] 0 = prompt, k = the group's k-th response

    def mask(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """``[n, n]`` bool attention mask of positions ``start:end`` (query x key)."""
        g, s = self.group[start:end], self.segment[start:end]
        n = g.shape[0]
        causal = torch.ones((n, n), dtype=torch.bool, device=g.device).tril()
        return causal & (g[:, None] == g[None, :]) & ((s[None, :] == 0) | (s[None, :] == s[:, None]))

    # built once per forward and shared by every layer
    @cached_property
    def full_mask(self) -> torch.Tensor:
        return self.mask()

    def plan(self, heads_x_dim: int) -> "AttentionPlan | None":
        """:func:`attention_plan` of this layout, built once per forward (every layer asks)."""
        cache = self.__dict__.setdefault("_plans", {})
        if heads_x_dim not in cache:
            cache[heads_x_dim] = attention_plan(self, heads_x_dim, int(self.group.shape[0]))
        return cache[heads_x_dim]


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, *,
         share_prompts: bool = False) -> Packed:
    """Pack a padded batch (right or left padding) whose scored tokens are ``loss_mask``.

    Token ``t`` of row ``i`` is scored with the logits at ``t - 1`` (as in the padded view), so the
    kept packed positions are those of the tokens just before the scored ones. ``share_prompts``:
    rows whose tokens before their first scored token are identical (the chosen and rejected of a
    pair, a list's responses, a rollout group) share one copy of that prompt (:class:`Segments`).
    """
    present = attention_mask.to(torch.bool)
    lengths = present.sum(-1)
    if (lengths == 0).any():
        raise ValueError("cannot pack a batch with an empty row")
    mask = loss_mask[:, 1:].to(torch.bool)
    if (mask & ~present[:, :-1]).any():
        raise ValueError("a scored token follows a pad token; pack() needs each scored token's predecessor")
    if share_prompts:
        shared = _pack_shared_prompts(input_ids, present, loss_mask.to(torch.bool), mask)
        if shared is not None:
            return shared
    flat_index = present.flatten().cumsum(0).view(present.shape) - 1   # packed position of each token
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    return Packed(input_ids=input_ids[present].unsqueeze(0),
                  position_ids=(present.cumsum(-1) - 1)[present].unsqueeze(0),
                  cu_seq_lens=cu, max_length=int(lengths.max()),
                  keep=flat_index[:, :-1][mask], labels=input_ids[:, 1:][mask], mask=mask)


def _pack_shared_prompts(input_ids, present, loss_mask, mask) -> Packed | None:
    """:func:`pack` with shared prompts; None when no two rows share one.

    The layout is built on Python lists (one ``tolist`` per input, one tensor per output): per-row
    tensor slicing costs more than the forward of a small model.
    """
    device = input_ids.device
    ids, keep_row, scored = input_ids.tolist(), present.tolist(), loss_mask.tolist()
    rows, starts = [], []                         # row tokens; prompt length = index of the first scored token
    for row_ids, row_present, row_scored in zip(ids, keep_row, scored):
        at = [t for t, p in enumerate(row_present) if p]
        rows.append([row_ids[t] for t in at])
        starts.append(next((k for k, t in enumerate(at) if row_scored[t]), len(at)))
    groups: dict[tuple, list[int]] = {}
    for i, (row, p) in enumerate(zip(rows, starts)):
        groups.setdefault((p, tuple(row[:p])), []).append(i)
    if all(len(members) == 1 for members in groups.values()):
        return None
    tokens, positions, group_ids, segment_ids, bounds, shared = [], [], [], [], [], []
    row_positions = [None] * len(rows)            # packed position of each of row i's tokens
    for g, ((p, prompt), members) in enumerate(groups.items()):
        start = len(tokens)
        tokens += prompt
        positions += range(p)
        segment_ids += [0] * p
        for k, i in enumerate(members, start=1):
            response = rows[i][p:]
            row_positions[i] = list(range(start, start + p)) + list(range(len(tokens), len(tokens) + len(response)))
            tokens += response
            positions += range(p, p + len(response))
            segment_ids += [k] * len(response)
        group_ids += [g] * (len(tokens) - start)
        bounds.append((start, len(tokens)))
        shared.append(len(members) > 1)
    index = []
    for positions_i, row_present in zip(row_positions, keep_row):
        slots = iter(positions_i)
        index.append([next(slots) if p else -1 for p in row_present])
    index = torch.tensor(index, dtype=torch.long, device=device)
    lengths = [b - a for a, b in bounds]
    cu = torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    return Packed(input_ids=torch.tensor([tokens], dtype=input_ids.dtype, device=device),
                  position_ids=torch.tensor([positions], dtype=torch.long, device=device),
                  cu_seq_lens=cu, max_length=max(lengths), keep=index[:, :-1][mask],
                  labels=input_ids[:, 1:][mask], mask=mask,
                  segments=Segments(bounds=bounds, shared=shared,
                                    group=torch.tensor(group_ids, dtype=torch.long, device=device),
                                    segment=torch.tensor(segment_ids, dtype=torch.long, device=device)))


def packed_forward(model, packed: Packed, **kwargs):
    """The model's forward over the packed row (HF output); checks the attention can read the layout."""
    if packed.segments is not None:
        module = getattr(model, "module", model)
        if getattr(module.config, "_attn_implementation", None) != VARLEN_SDPA:
            raise ValueError("shared-prompt packing needs the model loaded with padding_free=True and "
                             "attn_implementation 'sdpa' (its attention is prefopt's per-sequence SDPA)")
    return model(**packed.model_kwargs(), **kwargs)


def packed_logits(model, packed: Packed) -> torch.Tensor:
    """``[K, V]`` logits at the kept positions of one packed forward."""
    if _accepts_logits_to_keep(model):
        return packed_forward(model, packed, logits_to_keep=packed.keep, use_cache=False).logits[0]
    return packed_forward(model, packed, use_cache=False).logits[0, packed.keep]


def _accepts_logits_to_keep(model) -> bool:
    module = getattr(model, "module", model)          # a DeepSpeed engine wraps the HF model
    cached = getattr(module, "_prefopt_logits_to_keep", None)
    if cached is None:   # a peft (LoRA) model passes the argument on to the model it wraps
        target = module.get_base_model() if hasattr(module, "get_base_model") else module
        cached = "logits_to_keep" in inspect.signature(target.forward).parameters
        module._prefopt_logits_to_keep = cached
    return cached


# ---------------------------------------------------------------------------- attention

def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling=None, is_causal=None, cu_seq_lens_q=None, prefopt_segments=None, **kwargs):
    """Causal SDPA over a packed row (``cu_seq_lens_q``, or the groups of a shared-prompt row,
    ``prefopt_segments``) in the calls of its :func:`attention_plan`, else transformers' SDPA.

    query ``[1, H, S, D]``, key/value ``[1, H_kv, S, D]`` -> ``([1, S, H, D], None)``.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if prefopt_segments is None and cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
    layout = prefopt_segments if prefopt_segments is not None else _rows_layout(cu_seq_lens_q)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    sdpa = torch.nn.functional.scaled_dot_product_attention
    plan = layout.plan(query.shape[1] * query.shape[3])
    if plan is None:
        out = sdpa(query, key, value, attn_mask=layout.full_mask, dropout_p=p, scale=scaling)
    else:
        # split (views; one cat in backward) rather than per-piece slicing (a zero-filled full-size
        # gradient per slice)
        qs, ks, vs = (x.split(plan.sizes, dim=2) for x in (query, key, value))
        parts = []
        for call in plan.calls:
            k, v = (_gather(xs, call.keys) for xs in (ks, vs))
            mask = {"is_causal": True} if call.mask is None else {"attn_mask": call.mask}
            parts.append(sdpa(qs[call.query], k, v, dropout_p=p, scale=scaling, **mask))
        out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def _gather(pieces: tuple, keys: tuple) -> torch.Tensor:
    """The keys (or values) of one call: ``(piece, length)`` parts, in order (length None: all)."""
    parts = [pieces[j] if n is None else pieces[j][:, :, :n] for j, n in keys]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


@dataclass
class AttentionCall:
    query: int                   # the piece whose queries this call computes
    keys: tuple                  # ((piece, length or None = all of it), ...): where its keys / values are
    mask: "torch.Tensor | None"  # [q, k] bool; None: causal within the query piece


@dataclass
class AttentionPlan:
    sizes: list                  # the packed row split into consecutive pieces
    calls: list                  # one AttentionCall per piece, in row order


def attention_plan(layout: "Segments", heads_x_dim: int, total: int,
                   call_cost: float | None = None) -> AttentionPlan | None:
    """The cheapest SDPA calls for a packed row (see :data:`CALL_COST`); None: one masked call
    over the whole row."""
    call_cost = CALL_COST if call_cost is None else call_cost
    sizes, calls, cost = [], [], 0.0
    masks = []                   # (call, mask builder): built only if this plan is used
    segment = layout.segment.tolist()
    for (a, b), shared in zip(layout.bounds, layout.shared):
        n = b - a
        if not shared:
            calls.append(AttentionCall(len(sizes), ((len(sizes), None),), None))
            sizes.append(n)
            cost += n * n * heads_x_dim + call_cost
            continue
        seg = segment[a:b]
        prompt = seg.index(1) if 1 in seg else n
        responses = [seg.count(k) for k in range(1, max(seg) + 1)]
        whole = n * n * heads_x_dim + call_cost
        first = prompt + responses[0]
        split = ((first * first + sum(r * (prompt + r) for r in responses[1:])) * heads_x_dim
                 + len(responses) * call_cost)
        if whole <= split:
            calls.append(AttentionCall(len(sizes), ((len(sizes), None),), None))
            masks.append((calls[-1], lambda a=a, b=b: layout.mask(a, b)))
            sizes.append(n)
            cost += whole
            continue
        # the prompt and its first response causally; each further response over [prompt, itself]
        # (the prompt's keys are the first `prompt` positions of the head piece)
        head = len(sizes)
        calls.append(AttentionCall(head, ((head, None),), None))
        sizes.append(first)
        for r in (r for r in responses[1:] if r):
            calls.append(AttentionCall(len(sizes), ((head, prompt), (len(sizes), None)), None))
            masks.append((calls[-1], lambda r=r, prompt=prompt: torch.ones(
                (r, prompt + r), dtype=torch.bool, device=layout.group.device).tril(diagonal=prompt)))
            sizes.append(r)
        cost += split
    if total <= MASKED_MAX_TOKENS and total * total * heads_x_dim + call_cost <= cost:
        return None
    for call, build in masks:
        call.mask = build()
    return AttentionPlan(sizes=sizes, calls=calls)


def rows_segments(cu_seq_lens: torch.Tensor) -> Segments:
    """The plain packed layout as :class:`Segments`: every row its own group, no shared prompt."""
    bounds = cu_seq_lens.tolist()
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    group = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seq_lens.device), lengths)
    return Segments(bounds=list(zip(bounds[:-1], bounds[1:])), shared=[False] * len(lengths), group=group,
                    segment=torch.zeros_like(group))


def block_causal_mask(cu_seq_lens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total, total]`` bool: position q attends to k iff both are in one sequence and k <= q."""
    mask = rows_segments(cu_seq_lens).full_mask
    if mask.shape[0] != total:
        raise ValueError(f"cu_seq_lens covers {mask.shape[0]} positions, not {total}")
    return mask


_rows_cache: tuple = (None, None)


def _rows_layout(cu_seq_lens: torch.Tensor) -> Segments:
    """The layout of the forward in progress: every layer gets the same ``cu_seq_lens`` tensor."""
    global _rows_cache
    seen, layout = _rows_cache
    if seen is not cu_seq_lens:
        layout = rows_segments(cu_seq_lens)
        _rows_cache = (cu_seq_lens, layout)
    return layout


def packing_mode(model_cfg) -> str | None:
    """The forwards' layout from a recipe's ``model`` section: None (padded), ``"rows"`` (packed) or
    ``"shared"`` (packed, shared prompts: needs prefopt's SDPA, so ``attn_implementation: sdpa``)."""
    if not model_cfg.padding_free:
        return None
    return "shared" if model_cfg.share_prompts and model_cfg.attn_implementation == "sdpa" else "rows"


def register_varlen_sdpa() -> str:
    """Register :func:`varlen_sdpa_attention` (and SDPA's mask builder) under :data:`VARLEN_SDPA`."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)

        def mask(*, attention_mask=None, **kwargs):   # a packed forward needs none (no S x S mask built)
            return None if attention_mask is None else sdpa_mask(attention_mask=attention_mask, **kwargs)
        ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, mask)
        _REGISTERED = True
    return VARLEN_SDPA
