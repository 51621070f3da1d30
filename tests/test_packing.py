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
        out = forward_logps(model, batch, temperature=0.7, with_entropy=True, padding_free=padding_free)
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
        before = forward_logps(model, batch, padding_free=True).token_logps
        batch["input_ids"][1, :20] = torch.randint(3, 500, (20,), generator=torch.Generator().manual_seed(9))
        after = forward_logps(model, batch, padding_free=True).token_logps
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])


def test_padded_batches_still_work_with_varlen_model(models):
    """The swapped attention falls back to SDPA for padded input (e.g. HF generate)."""
    batch = _batch([10, 22], [3, 4])
    with torch.no_grad():
        a = forward_logps(models["varlen_sdpa"], batch, padding_free=False).token_logps
        b = forward_logps(models["padded"], batch, padding_free=False).token_logps
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
        for limit in (10_000, 8):        # masked call / per-sequence loop
            monkeypatch.setattr(packing, "MASKED_MAX_TOKENS", limit)
            got = forward_logps(models["varlen_sdpa"], batch, padding_free=True).token_logps
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_packed_forward_with_gradient_checkpointing(cache):
    """model.gradient_checkpointing recomputes the packed forward in backward: same gradients."""
    path = str(builtin_model_path("tiny-llama"))
    plain, ckpt = load_causal_lm(path, padding_free=True), load_causal_lm(path, padding_free=True)
    ckpt.gradient_checkpointing_enable()
    plain.train(), ckpt.train()
    batch = _batch([30, 19, 27], [5, 3, 4])
    for model in (plain, ckpt):
        forward_logps(model, batch, padding_free=True).logps.sum().backward()
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
        out = forward_values(model, batch, padding_free=pf)
        mask = out.token_mask if heads == 1 else out.token_mask.unsqueeze(-1).expand_as(out.values)
        out.values[mask].sum().backward()
        outs[name] = (out.values[mask], [p.grad for p in model.parameters()])
    torch.testing.assert_close(outs["packed"][0], outs["padded"][0], atol=1e-5, rtol=1e-5)
    for g, r in zip(outs["packed"][1], outs["padded"][1]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
