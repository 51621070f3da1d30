"""Padding-free forwards (prefopt.models.packing) equal the padded forward, gradients included."""
import pytest
import torch

from prefopt.models.load import load_causal_lm
from prefopt.models.logprobs import forward_logps
from prefopt.models.packing import pack
from prefopt.models.tiny import builtin_model_path


def _batch(lengths, prompt_lengths, *, left_pad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(lengths)
    ids = torch.zeros((n, width), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss = torch.zeros((n, width), dtype=torch.bool)
    for i, (length, p) in enumerate(zip(lengths, prompt_lengths)):
        start = width - length if left_pad else 0
        ids[i, start:start + length] = torch.randint(3, 500, (length,), generator=g)
        attention[i, start:start + length] = 1
        loss[i, start + p:start + length] = True
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def test_pack_layout_by_hand():
    batch = _batch([3, 5], [1, 2])
    packed = pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert packed.input_ids.shape == (1, 8)
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert packed.cu_seq_lens.tolist() == [0, 3, 8]
    assert packed.max_length == 5
    # row 0 scores tokens 1, 2 (logits at 0, 1); row 1 scores tokens 2..4 (logits at packed 4, 5, 6)
    assert packed.keep.tolist() == [0, 1, 4, 5, 6]
    ids = batch["input_ids"]
    assert packed.labels.tolist() == [ids[0, 1].item(), ids[0, 2].item(), ids[1, 2].item(),
                                      ids[1, 3].item(), ids[1, 4].item()]
    back = packed.unpack(torch.arange(1.0, 6.0))
    assert back.tolist() == [[1, 2, 0, 0], [0, 3, 4, 5]]


def test_pack_rejects_empty_row():
    batch = _batch([3, 2], [1, 1])
    batch["attention_mask"][1] = 0
    batch["loss_mask"][1] = False
    with pytest.raises(ValueError, match="empty row"):
        pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])


@pytest.fixture(scope="module")
def models(cache):
    path = str(builtin_model_path("tiny-llama"))
    torch.manual_seed(0)
    return {"padded": load_causal_lm(path), "varlen_sdpa": load_causal_lm(path, padding_free=True),
            "eager": load_causal_lm(path, attn_implementation="eager", padding_free=True)}


@pytest.mark.parametrize("impl", ["varlen_sdpa", "eager"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_packed_forward_equals_padded(models, impl, left_pad):
    """Per-token log-probs, entropies and every parameter's gradient agree (float32)."""
    batch = _batch([17, 40, 9, 33, 26, 40], [5, 3, 4, 12, 1, 8], left_pad=left_pad)
    results = {}
    for name, padding_free in (("padded", False), (impl, True)):
        model = models[name]
        model.zero_grad()
        out = forward_logps(model, batch, temperature=0.7, with_entropy=True, packing="rows" if padding_free else None)
        (out.logps.sum() + out.entropy[out.token_mask].sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results[name] = (out, grads)
    (ref, ref_grads), (got, got_grads) = results["padded"], results[impl]
    assert torch.equal(got.token_mask, ref.token_mask)
    torch.testing.assert_close(got.token_logps, ref.token_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logps, ref.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.num_tokens, ref.num_tokens)
    torch.testing.assert_close(got.entropy[got.token_mask], ref.entropy[ref.token_mask], atol=1e-5, rtol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_varlen_attention_keeps_sequences_apart(models):
    """Changing one packed sequence leaves the others' log-probs exactly as they were."""
    batch = _batch([12, 20, 15], [2, 2, 2])
    model = models["varlen_sdpa"]
    with torch.no_grad():
        before = forward_logps(model, batch, packing="rows").token_logps
        batch["input_ids"][1, :20] = torch.randint(3, 500, (20,), generator=torch.Generator().manual_seed(9))
        after = forward_logps(model, batch, packing="rows").token_logps
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])


def test_padded_batches_still_work_with_varlen_model(models):
    """The swapped attention falls back to SDPA for padded input (e.g. HF generate)."""
    batch = _batch([10, 22], [3, 4])
    with torch.no_grad():
        a = forward_logps(models["varlen_sdpa"], batch, packing=None).token_logps
        b = forward_logps(models["padded"], batch, packing=None).token_logps
    torch.testing.assert_close(a, b)


def test_block_causal_mask_by_hand():
    from prefopt.models.packing import block_causal_mask
    mask = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    want = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert mask.int().tolist() == want


def test_long_packed_rows_attend_per_sequence(models, monkeypatch):
    """Both attention paths (one masked call / a loop over sequences) give the padded result."""
    import prefopt.models.packing as packing
    batch = _batch([30, 41, 25], [4, 6, 2])
    with torch.no_grad():
        ref = forward_logps(models["padded"], batch).token_logps
        for limit, cost in ((10_000, 1e15), (8, 0)):        # masked call / per-sequence loop
            monkeypatch.setattr(packing, "MASKED_MAX_TOKENS", limit)
            monkeypatch.setattr(packing, "CALL_COST", cost)
            got = forward_logps(models["varlen_sdpa"], batch, packing="rows").token_logps
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_packed_forward_with_gradient_checkpointing(cache):
    """model.gradient_checkpointing recomputes the packed forward in backward: same gradients."""
    path = str(builtin_model_path("tiny-llama"))
    plain, ckpt = load_causal_lm(path, padding_free=True), load_causal_lm(path, padding_free=True)
    ckpt.gradient_checkpointing_enable()
    plain.train(), ckpt.train()
    batch = _batch([30, 19, 27], [5, 3, 4])
    for model in (plain, ckpt):
        forward_logps(model, batch, packing="rows").logps.sum().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("heads", [1, 3])
def test_packed_critic_forward_equals_padded(cache, heads):
    """Values (one or several heads) and their gradients at the response positions agree."""
    from prefopt.models.load import load_value_model
    from prefopt.models.logprobs import forward_values
    path = str(builtin_model_path("tiny-llama"))
    torch.manual_seed(0)
    padded = load_value_model(path, num_heads=heads)
    packed = load_value_model(path, num_heads=heads, padding_free=True)
    packed.load_state_dict(padded.state_dict())          # the same fresh value head
    batch = _batch([21, 35, 12], [4, 9, 3])
    outs = {}
    for name, model, pf in (("padded", padded, False), ("packed", packed, True)):
        out = forward_values(model, batch, packing="rows" if pf else None)
        mask = out.token_mask if heads == 1 else out.token_mask.unsqueeze(-1).expand_as(out.values)
        out.values[mask].sum().backward()
        outs[name] = (out.values[mask], [p.grad for p in model.parameters()])
    torch.testing.assert_close(outs["packed"][0], outs["padded"][0], atol=1e-5, rtol=1e-5)
    for g, r in zip(outs["packed"][1], outs["padded"][1]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def _shared_batch(prompts, responses, *, left_pad=False):
    """Rows = prompt + response; ``responses[i]`` pairs with ``prompts[owner[i]]`` as given in tuples."""
    rows = [(prompts[j], r) for j, r in responses]
    width = max(len(p) + len(r) for p, r in rows)
    n = len(rows)
    ids = torch.zeros((n, width), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss = torch.zeros((n, width), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        length = len(p) + len(r)
        start = width - length if left_pad else 0
        ids[i, start:start + length] = torch.tensor(p + r)
        attention[i, start:start + length] = 1
        loss[i, start + len(p):start + length] = True
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def test_shared_prompt_layout_by_hand():
    batch = _shared_batch([[5, 6, 7], [8, 9]], [(0, [10, 11]), (1, [12]), (0, [13, 14, 15])])
    packed = pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], share_prompts=True)
    # group 0: prompt 5 6 7, then row 0's 10 11, then row 2's 13 14 15; group 1: 8 9 12
    assert packed.input_ids.tolist() == [[5, 6, 7, 10, 11, 13, 14, 15, 8, 9, 12]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2]]
    seg = packed.segments
    assert seg.bounds == [(0, 8), (8, 11)] and seg.shared == [True, False]
    assert seg.segment.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 1]
    # row 0 scores 10 (from 7, packed 2) and 11 (from 10, packed 3); row 1 scores 12 (from 9, packed 9);
    # row 2 scores 13 (from 7: the shared prompt's last token again), 14, 15 (from packed 5, 6)
    assert packed.keep.tolist() == [2, 3, 9, 2, 5, 6]
    assert packed.labels.tolist() == [10, 11, 12, 13, 14, 15]
    m = seg.mask()
    assert m[5].tolist() == [True, True, True, False, False, True] + [False] * 5   # 13 sees the prompt + itself
    assert not m[9, :8].any() and m[10, 8:].all()                                   # groups stay apart


def test_no_shared_prompt_falls_back_to_rows():
    batch = _shared_batch([[5, 6], [8, 9]], [(0, [10]), (1, [12])])
    packed = pack(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], share_prompts=True)
    assert packed.segments is None and packed.cu_seq_lens.tolist() == [0, 3, 6]


@pytest.mark.parametrize("limit,cost", [(10_000, 1e15), (8, 1e15), (8, 0)],
                         ids=["one-masked-call", "call-per-group", "call-per-response"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_shared_prompt_forward_equals_padded(models, monkeypatch, limit, cost, left_pad):
    """Pairs (chosen block then rejected block) and a rollout-like group of 3: log-probs, entropies
    and gradients equal the padded forward's, whichever SDPA calls the attention plan makes."""
    import prefopt.models.packing as packing
    monkeypatch.setattr(packing, "MASKED_MAX_TOKENS", limit)
    monkeypatch.setattr(packing, "CALL_COST", cost)
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rand(7), rand(12), rand(4)]
    responses = [(0, rand(9)), (1, rand(15)), (0, rand(5)), (1, rand(3)),        # pairs of prompts 0 and 1
                 (2, rand(11)), (2, rand(6)), (2, rand(13))]                    # a group of 3
    batch = _shared_batch(prompts, responses, left_pad=left_pad)
    results = {}
    for name, model, mode in (("padded", models["padded"], None), ("shared", models["varlen_sdpa"], "shared")):
        model.zero_grad()
        out = forward_logps(model, batch, temperature=0.9, with_entropy=True, packing=mode)
        (out.logps.sum() + 0.1 * out.entropy[out.token_mask].sum()).backward()
        results[name] = (out, [p.grad.clone() for p in model.parameters()])
    (ref, ref_grads), (got, got_grads) = results["padded"], results["shared"]
    torch.testing.assert_close(got.token_logps, ref.token_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.entropy[got.token_mask], ref.entropy[ref.token_mask], atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_shared_prompt_responses_do_not_see_each_other(models):
    g = torch.Generator().manual_seed(4)
    rand = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    prompt, chosen = rand(6), rand(8)
    with torch.no_grad():
        a = forward_logps(models["varlen_sdpa"], _shared_batch([prompt], [(0, chosen), (0, rand(9))]),
                          packing="shared").token_logps
        b = forward_logps(models["varlen_sdpa"], _shared_batch([prompt], [(0, chosen), (0, rand(4))]),
                          packing="shared").token_logps
    torch.testing.assert_close(a[0, :13], b[0, :13], atol=1e-6, rtol=0)


def test_shared_prompts_need_prefopt_sdpa(models):
    batch = _shared_batch([[5, 6, 7]], [(0, [10, 11]), (0, [12])])
    with pytest.raises(ValueError, match="shared-prompt packing needs"):
        forward_logps(models["eager"], batch, packing="shared")


def test_attention_plan_follows_the_cost_model():
    """Many short sequences: one masked call; a few long ones: a call per sequence; a long shared
    pair: the prompt + chosen causally, then rejected over [prompt, rejected]; a short one: one call."""
    from prefopt.models.packing import Segments, attention_plan, rows_segments
    many_short = rows_segments(torch.tensor([0] + [20 * (i + 1) for i in range(16)], dtype=torch.int32))
    few_long = rows_segments(torch.tensor([0, 110, 220, 330, 440], dtype=torch.int32))
    assert attention_plan(many_short, heads_x_dim=64, total=320) is None
    plan = attention_plan(few_long, heads_x_dim=512, total=440)
    assert plan.sizes == [110] * 4 and all(c.mask is None for c in plan.calls)
    assert attention_plan(many_short, heads_x_dim=64, total=10**6) is not None   # above MASKED_MAX_TOKENS

    def pair(prompt, chosen, rejected):
        segment = [0] * prompt + [1] * chosen + [2] * rejected
        n = len(segment)
        return Segments(bounds=[(0, n)], shared=[True], group=torch.zeros(n, dtype=torch.long),
                        segment=torch.tensor(segment))
    long_pair = pair(30, 130, 120)
    plan = attention_plan(long_pair, heads_x_dim=512, total=10**6)
    assert plan.sizes == [160, 120]
    head, rejected = plan.calls
    assert head.mask is None and head.keys == ((0, None),)
    assert rejected.keys == ((0, 30), (1, None))
    # rejected token t sees the prompt and rejected tokens 0..t: the [q, k] view of the full mask
    full = long_pair.mask()
    want = torch.cat([full[160:, :30], full[160:, 160:]], dim=1)
    assert torch.equal(rejected.mask, want)
    short_pair = pair(6, 4, 5)
    plan = attention_plan(short_pair, heads_x_dim=64, total=10**6)
    assert plan.sizes == [15] and torch.equal(plan.calls[0].mask, short_pair.mask())
