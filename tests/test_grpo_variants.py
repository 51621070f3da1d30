"""The GRPO family's loss options (DAPO, GRPO, Dr. GRPO, GSPO) and DAPO's overlong penalty:
each against its formula written out by hand, against TRL's loss math, and their recipe keys."""
import math

import pytest
import torch

from prefopt.config import load_recipe
from prefopt.errors import ConfigError
from prefopt.rl.advantages import masked_mean
from prefopt.rl.ppo import aggregate, kl_penalty, policy_loss
from prefopt.rl.signals import overlong_penalty

D = torch.float64
GRPO = "recipes/tiny_grpo.yaml"
LENGTHS = [7, 2, 5, 1, 7, 4, 6, 3]   # uneven valid lengths, T = 7


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(D)


def rollout_batch(seed, lengths=LENGTHS, T=7, spread=0.3, per_sequence_advantage=False):
    """Random (new log-probs with grad, old log-probs, advantages, mask) for ``len(lengths)`` rows."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    old = -torch.rand(B, T, generator=g, dtype=D) * 3
    new = (old + spread * torch.randn(B, T, generator=g, dtype=D)).requires_grad_()
    if per_sequence_advantage:
        A = torch.randn(B, 1, generator=g, dtype=D).expand(B, T).clone()
    else:
        A = torch.randn(B, T, generator=g, dtype=D)
    return new, old, A, prefix_mask(lengths, T)


def hand_aggregate(values, mask, loss_agg, norm_tokens=None):
    """The three aggregations as loops over rows and their valid tokens (plain floats)."""
    B = len(values)
    rows = [[v for v, m in zip(values[b], mask[b]) if m > 0] for b in range(B)]
    if loss_agg == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if loss_agg == "sequence_mean":
        return sum(sum(r) / len(r) if r else 0.0 for r in rows) / B
    return sum(sum(r) for r in rows) / (B * norm_tokens)


def hand_surrogate(new, old, A, mask, eps_low, eps_high, ratio_level):
    """Per-token max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) as nested lists, with r the token
    ratio or exp(mean over the row's valid tokens of the log-ratio)."""
    B, T = new.shape
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t] > 0]
        seq_log_ratio = sum(new[b, t].item() - old[b, t].item() for t in valid) / len(valid)
        for t in valid:
            r = math.exp(seq_log_ratio if ratio_level == "sequence" else new[b, t].item() - old[b, t].item())
            a = A[b, t].item()
            out[b][t] = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
    return out


def previous_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps):
    """The symmetric token-mean surrogate as it was before the GRPO-family options (verbatim)."""
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surr = -advantages * ratio
    surr_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(surr, surr_clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((surr_clipped > surr).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


# ---------------------------------------------------------------- aggregations

@pytest.mark.parametrize("loss_agg", ["token_mean", "sequence_mean", "constant"])
def test_aggregate_matches_hand_loops(loss_agg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 7, generator=g, dtype=D)
    mask = prefix_mask(LENGTHS, 7)
    mask[0, 3] = 0   # a hole: aggregation follows the mask, not a prefix length
    got = aggregate(x, mask, loss_agg, norm_tokens=16)
    assert got.item() == pytest.approx(hand_aggregate(x.tolist(), mask.tolist(), loss_agg, 16), rel=1e-12)


def test_aggregate_rejects_unknown_and_missing_norm():
    x, mask = torch.ones(2, 3, dtype=D), torch.ones(2, 3, dtype=D)
    with pytest.raises(ValueError, match="unknown loss_agg 'seq_mean'"):
        aggregate(x, mask, "seq_mean")
    with pytest.raises(ValueError, match="needs norm_tokens"):
        aggregate(x, mask, "constant")


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "sequence_mean", "constant"])
def test_policy_loss_matches_formula(loss_agg, ratio_level):
    new, old, A, mask = rollout_batch(1)
    loss, m = policy_loss(new, old, A, mask, clip_eps=0.2, clip_eps_high=0.28, loss_agg=loss_agg,
                          norm_tokens=16, ratio_level=ratio_level)
    per_token = hand_surrogate(new, old, A, mask, 0.2, 0.28, ratio_level)
    assert loss.item() == pytest.approx(hand_aggregate(per_token, mask.tolist(), loss_agg, 16), rel=1e-12)
    assert 0 < m["clip_frac"].item() < 1
    assert m["clip_frac"].item() == pytest.approx(m["clip_frac_low"].item() + m["clip_frac_high"].item(), abs=1e-15)


def test_token_mean_is_bit_identical_to_the_previous_loss():
    new, old, A, mask = rollout_batch(2, spread=0.5)
    loss, m = policy_loss(new, old, A, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, new)
    ref_loss, ref_m = previous_policy_loss(new, old, A, mask, clip_eps=0.2)
    (ref_grad,) = torch.autograd.grad(ref_loss, new)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    for k, v in ref_m.items():
        assert torch.equal(m[k], v), k
    explicit, _ = policy_loss(new, old, A, mask, clip_eps=0.2, clip_eps_high=0.2, loss_agg="token_mean",
                              ratio_level="token")
    assert torch.equal(explicit, ref_loss)


# ---------------------------------------------------------------- DAPO's decoupled clip

def test_clip_eps_high_is_asymmetric():
    old = torch.zeros(1, 4, dtype=D)
    # A > 0 at ratio 1.25 (between 1 + 0.2 and 1 + 0.28) and 1.3 (above 1.28); A < 0 at 0.75 (below 0.8)
    # and 0.85 (inside the range)
    new = torch.log(torch.tensor([[1.25, 1.3, 0.75, 0.85]], dtype=D)).requires_grad_()
    A = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=D)
    mask = torch.ones(1, 4, dtype=D)

    loss, m = policy_loss(new, old, A, mask, clip_eps=0.2, clip_eps_high=0.28)
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[0, 0] != 0           # inside [0.8, 1.28]: still learns
    assert grad[0, 1] == 0           # above 1 + eps_high: clipped
    assert grad[0, 2] == 0           # below 1 - eps_low: clipped, as with the symmetric range
    assert grad[0, 3] != 0
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8 + 0.85) / 4, rel=1e-12)
    assert m["clip_frac_high"].item() == 0.25 and m["clip_frac_low"].item() == 0.25

    symmetric, m_sym = policy_loss(new, old, A, mask, clip_eps=0.2)
    (grad_sym,) = torch.autograd.grad(symmetric, new)
    assert grad_sym[0, 0] == 0       # 1.25 > 1.2: clipped without the decoupled bound
    assert m_sym["clip_frac_high"].item() == 0.5


# ---------------------------------------------------------------- GSPO's sequence ratio

def test_sequence_ratio_value_and_gradient():
    lengths = [5, 3, 1]
    new, old, A, mask = rollout_batch(3, lengths=lengths, T=5, spread=0.02, per_sequence_advantage=True)
    loss, m = policy_loss(new, old, A, mask, clip_eps=0.2, loss_agg="sequence_mean", ratio_level="sequence")
    (grad,) = torch.autograd.grad(loss, new)
    B = len(lengths)
    s = [math.exp(sum(new[b, t].item() - old[b, t].item() for t in range(n)) / n) for b, n in enumerate(lengths)]
    assert all(abs(x - 1) < 0.2 for x in s)   # nothing clipped: loss = -(1/B) sum_b A_b s_b
    assert loss.item() == pytest.approx(-sum(A[b, 0].item() * s[b] for b in range(B)) / B, rel=1e-12)
    # d loss / d logp_bt = -(1/B) A_b s_b / |y_b| on valid tokens (through the sequence mean), 0 on padding
    for b, n in enumerate(lengths):
        for t in range(5):
            want = -A[b, 0].item() * s[b] / (B * n) if t < n else 0.0
            assert grad[b, t].item() == pytest.approx(want, rel=1e-10, abs=1e-15)
    tokens = sum(lengths)
    assert m["ratio_mean"].item() == pytest.approx(sum(s[b] * n for b, n in enumerate(lengths)) / tokens, rel=1e-12)


def test_sequence_ratio_clips_whole_sequences():
    old = torch.zeros(2, 3, dtype=D)
    # row 0: token ratios 2.0, 0.5, 1.0 -> s = 1 (inside); row 1: all 1.5 -> s = 1.5 > 1.2
    new = torch.log(torch.tensor([[2.0, 0.5, 1.0], [1.5, 1.5, 1.5]], dtype=D)).requires_grad_()
    A = torch.ones(2, 3, dtype=D)
    loss, m = policy_loss(new, old, A, torch.ones(2, 3, dtype=D), clip_eps=0.2, loss_agg="sequence_mean",
                          ratio_level="sequence")
    (grad,) = torch.autograd.grad(loss, new)
    assert loss.item() == pytest.approx((-1.0 - 1.2) / 2, rel=1e-12)
    assert (grad[0] != 0).all() and (grad[1] == 0).all()
    assert m["clip_frac"].item() == 0.5
    token, _ = policy_loss(new, old, A, torch.ones(2, 3, dtype=D), clip_eps=0.2, loss_agg="sequence_mean")
    assert token.item() != pytest.approx(loss.item())   # per token, row 0's ratio 2.0 clips too


# ---------------------------------------------------------------- TRL's loss math

def trl_grpo_loss(per_token_logps, old_per_token_logps, advantages, mask, *, loss_type, level,
                  epsilon_low, epsilon_high, max_completion_length, beta=0.0, ref_per_token_logps=None):
    """TRL 1.16 ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py, lines 3083-3174), one
    process, no gradient accumulation (``current_gradient_accumulation_steps`` = 1,
    ``steps_per_generation`` = 1, ``num_items_in_batch`` = the batch's token count), transcribed
    line by line for the clipped loss types; ``advantages`` is ``(B,)`` as TRL's."""
    advantages = advantages.unsqueeze(1)                                             # 3061-3062
    log_ratio = per_token_logps - old_per_token_logps                                # 3083
    if level == "token":                                                             # 3084-3088
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)                                       # 3095
    if beta != 0.0:                                                                  # 3098-3102
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                        - (ref_per_token_logps - per_token_logps) - 1)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)                  # 3113
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)            # 3118-3120
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl                        # 3150
    if loss_type == "grpo":                                                          # 3153-3157
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":                                                          # 3158-3162
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":                                                       # 3163-3167
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":                                                          # 3168-3174
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    raise ValueError(loss_type)


TRL_EQUIVALENTS = [("grpo", "sequence_mean"), ("bnpo", "token_mean"), ("dapo", "token_mean"),
                   ("dr_grpo", "constant")]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type, loss_agg", TRL_EQUIVALENTS)
def test_matches_trl_loss_math(loss_type, loss_agg, level):
    new, old, A, mask = rollout_batch(4, spread=0.3 if level == "token" else 0.1, per_sequence_advantage=True)
    ours, _ = policy_loss(new, old, A, mask, clip_eps=0.2, clip_eps_high=0.28, loss_agg=loss_agg,
                          norm_tokens=16, ratio_level=level)
    (grad,) = torch.autograd.grad(ours, new)
    trl = trl_grpo_loss(new, old, A[:, 0], mask, loss_type=loss_type, level=level, epsilon_low=0.2,
                        epsilon_high=0.28, max_completion_length=16)
    (trl_grad,) = torch.autograd.grad(trl, new)
    assert ours.item() == pytest.approx(trl.item(), rel=1e-12)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_type, loss_agg", TRL_EQUIVALENTS)
def test_ppo_objective_kl_term_matches_trl(loss_type, loss_agg):
    """With the KL as a loss term, TRL adds beta * k3 per token before aggregating: PPO.loss
    aggregates its KL term the same way."""
    from prefopt.objectives.base import PolicyOutput
    from prefopt.objectives.ppo import PPO, PPOParams
    new, old, A, mask = rollout_batch(5, per_sequence_advantage=True)
    ref = old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(9), dtype=D)
    policy = PolicyOutput(logps=new.sum(-1), num_tokens=mask.sum(-1), token_logps=new, token_mask=mask.bool())
    params = PPOParams(clip_eps=0.2, clip_eps_high=0.28, loss_agg=loss_agg, kl_coef=0.04, kl_in_reward=False,
                       norm_tokens=16 if loss_agg == "constant" else None)
    out = PPO(params).loss(policy, {"old_logps": old, "advantages": A, "ref_logps": ref})
    trl = trl_grpo_loss(new, old, A[:, 0], mask, loss_type=loss_type, level="token", epsilon_low=0.2,
                        epsilon_high=0.28, max_completion_length=16, beta=0.04, ref_per_token_logps=ref)
    assert out.loss.item() == pytest.approx(trl.item(), rel=1e-12)
    kl = kl_penalty(new.detach(), ref, kind="k3")
    assert out.metrics["policy/kl_loss"].item() == pytest.approx(masked_mean(kl, mask).item(), rel=1e-12)


def test_clip_fractions_match_trl_metrics():
    """TRL's clip_ratio/low_mean and high_mean (grpo_trainer.py lines 3274-3275) at token level."""
    new, old, A, mask = rollout_batch(6, spread=0.5)
    _, m = policy_loss(new, old, A, mask, clip_eps=0.2, clip_eps_high=0.28)
    coef_1 = torch.exp(new.detach() - old)
    low = ((coef_1 < 1 - 0.2) & (A < 0)).to(D)
    high = ((coef_1 > 1 + 0.28) & (A > 0)).to(D)
    assert m["clip_frac_low"].item() == pytest.approx(((low * mask).sum() / mask.sum()).item(), rel=1e-12)
    assert m["clip_frac_high"].item() == pytest.approx(((high * mask).sum() / mask.sum()).item(), rel=1e-12)
    assert m["clip_frac_low"].item() > 0 and m["clip_frac_high"].item() > 0


# ---------------------------------------------------------------- batch invariance

@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_batch_invariance(ratio_level):
    """sequence_mean and constant: a batch's loss is the mean of its rows' losses (so micro-batching
    does not change it); token_mean weighs each row by its share of the batch's tokens instead."""
    new, old, A, mask = rollout_batch(7, spread=0.1, per_sequence_advantage=True)

    def loss(loss_agg, rows):
        out, _ = policy_loss(new[rows], old[rows], A[rows], mask[rows], clip_eps=0.2, clip_eps_high=0.28,
                             loss_agg=loss_agg, norm_tokens=16, ratio_level=ratio_level)
        return out.item()

    B = len(LENGTHS)
    for loss_agg in ("sequence_mean", "constant"):
        singles = [loss(loss_agg, slice(b, b + 1)) for b in range(B)]
        assert loss(loss_agg, slice(0, B)) == pytest.approx(sum(singles) / B, rel=1e-12)
    singles = [loss("token_mean", slice(b, b + 1)) for b in range(B)]
    assert loss("token_mean", slice(0, B)) != pytest.approx(sum(singles) / B, rel=1e-3)
    weighted = sum(x * n for x, n in zip(singles, LENGTHS)) / sum(LENGTHS)   # the token-count weighting
    assert loss("token_mean", slice(0, B)) == pytest.approx(weighted, rel=1e-12)


# ---------------------------------------------------------------- DAPO's overlong penalty

def test_overlong_penalty_regimes_and_boundaries():
    # L_max 16, L_cache 4: 0 up to 12 tokens, then -1/4 per token, -1 at 16 and beyond
    lengths = [1, 11, 12, 13, 14, 15, 16, 17, 40]
    assert overlong_penalty(lengths, 16, 4) == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert overlong_penalty(lengths, 16, 4, factor=0.5) == [0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5, -0.5]
    assert overlong_penalty([1, 16], 16, 16) == [-1 / 16, -1.0]   # the whole range is the buffer
    for bad in (0, 17):
        with pytest.raises(ValueError, match="overlong buffer"):
            overlong_penalty([1], 16, bad)


def test_overlong_penalty_matches_trl():
    rewards = pytest.importorskip("trl.rewards")
    lengths = list(range(1, 30))
    for max_len, cache in [(16, 4), (20, 7), (10, 10)]:
        trl = rewards.get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=cache)
        assert overlong_penalty(lengths, max_len, cache) == pytest.approx(trl([[0] * n for n in lengths]), abs=1e-15)


class WordTokenizer:
    """batch_decode: token ids -> a string of one word per id (the interface ``score`` uses)."""

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(f"w{i}" for i in row) for row in ids]


def test_score_adds_overlong_penalty_to_the_shaped_reward():
    from prefopt.data.rollouts import RolloutSample
    from prefopt.loops.online import score
    from prefopt.objectives.ppo import PPOParams
    from prefopt.rl.signals import RewardNormalizer

    lengths = [4, 13, 16, 10]
    samples = [RolloutSample(prompt_ids=[1], response_ids=list(range(n))) for n in lengths]
    raw = [0.5, 1.0, 2.0, -1.0]

    def rewards(prompts, texts, rows):
        assert [len(t.split()) for t in texts] == lengths
        return list(raw), {"rule": list(raw)}

    params = PPOParams(reward_clip=[-0.5, 1.5], overlong_buffer=4, overlong_penalty=2.0, overlong_max_tokens=16)
    stats = score(samples, WordTokenizer(), rewards, None, params, RewardNormalizer())
    penalties = [0.0, -0.5, -2.0, 0.0]   # 2 * (12 - |y|) / 4 over 12 tokens
    clipped = [0.5, 1.0, 1.5, -0.5]
    assert [s.reward for s in samples] == pytest.approx([c + p for c, p in zip(clipped, penalties)])
    assert stats["reward/mean"] == pytest.approx(sum(raw) / 4)   # the sources' raw rewards
    assert stats["reward/overlong_penalty"] == pytest.approx(sum(penalties) / 4)

    defaulted = [RolloutSample(prompt_ids=[1], response_ids=list(range(n))) for n in lengths]
    params.overlong_max_tokens = None                     # L_max from the rollout's max_tokens
    score(defaulted, WordTokenizer(), rewards, None, params, RewardNormalizer(), max_tokens=16)
    assert [s.reward for s in defaulted] == [s.reward for s in samples]

    plain = [RolloutSample(prompt_ids=[1], response_ids=list(range(n))) for n in lengths]
    stats = score(plain, WordTokenizer(), rewards, None, PPOParams(), RewardNormalizer())
    assert [s.reward for s in plain] == raw and "reward/overlong_penalty" not in stats


# ---------------------------------------------------------------- the objective and its recipe keys

@pytest.mark.parametrize("loss_agg", ["token_mean", "sequence_mean", "constant"])
def test_ppo_objective_aggregates_every_term_alike(loss_agg):
    from prefopt.objectives.base import PolicyOutput
    from prefopt.objectives.ppo import PPO, PPOParams
    new, old, A, mask = rollout_batch(8)
    g = torch.Generator().manual_seed(10)
    ref, entropy = old + 0.1 * torch.randn(old.shape, generator=g, dtype=D), torch.rand(old.shape, generator=g, dtype=D)
    policy = PolicyOutput(logps=new.sum(-1), num_tokens=mask.sum(-1), token_logps=new, token_mask=mask.bool(),
                          entropy=entropy)
    params = PPOParams(clip_eps_high=0.28, loss_agg=loss_agg, kl_coef=0.1, kl_in_reward=False, entropy_coef=0.01,
                       norm_tokens=16 if loss_agg == "constant" else None, ratio_level="sequence")
    out = PPO(params).loss(policy, {"old_logps": old, "advantages": A, "ref_logps": ref})
    kl = (torch.exp(ref - new) - (ref - new) - 1).tolist()   # k3
    expected = (hand_aggregate(hand_surrogate(new, old, A, mask, 0.2, 0.28, "sequence"), mask.tolist(), loss_agg, 16)
                + 0.1 * hand_aggregate(kl, mask.tolist(), loss_agg, 16)
                - 0.01 * hand_aggregate(entropy.tolist(), mask.tolist(), loss_agg, 16))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["policy/entropy"].item() == pytest.approx(masked_mean(entropy, mask).item(), rel=1e-12)


def test_recipe_defaults_and_resolved_lengths():
    r = load_recipe(GRPO)
    o = r.objective
    assert (o.clip_eps_high, o.loss_agg, o.norm_tokens, o.ratio_level, o.overlong_buffer) == (None, "token_mean", None,
                                                                                           "token", None)
    max_tokens = r.roles.rollout.sampling.max_tokens
    # the defaults are resolved where they are used, on a copy: the recipe (and config.yaml) keeps None,
    # so a saved config rerun with another max_tokens follows it
    recipe = load_recipe(GRPO, ["objective.loss_agg=constant", "objective.overlong_buffer=4"])
    assert (recipe.objective.norm_tokens, recipe.objective.overlong_max_tokens) == (None, None)
    from prefopt.objectives.ppo import PPO
    assert PPO.from_recipe(recipe).params.norm_tokens == max_tokens and recipe.objective.norm_tokens is None
    longer = load_recipe(GRPO, ["objective.loss_agg=constant", "roles.rollout.sampling.max_tokens=32"])
    assert PPO.from_recipe(longer).params.norm_tokens == 32
    o = load_recipe(GRPO, ["objective.loss_agg=constant", "objective.norm_tokens=100"]).objective
    assert o.norm_tokens == 100
    dapo, gspo = load_recipe("recipes/tiny_dapo.yaml").objective, load_recipe("recipes/tiny_gspo.yaml").objective
    assert (dapo.clip_eps_high, dapo.overlong_buffer, dapo.overlong_max_tokens) == (0.28, 4, None)
    assert (gspo.ratio_level, gspo.loss_agg) == ("sequence", "sequence_mean")
    xi = load_recipe("recipes/tiny_constrained_xi.yaml", ["objective.loss_agg=constant"])
    from prefopt.objectives import get_objective
    assert get_objective("constrained_ppo").from_recipe(xi).params.norm_tokens == xi.roles.rollout.sampling.max_tokens


@pytest.mark.parametrize("overrides, key", [
    (["objective.loss_agg=seq_mean"], "objective.loss_agg"),
    (["objective.ratio_level=seq"], "objective.ratio_level"),
    (["objective.clip_eps_high=0"], "objective.clip_eps_high"),
    (["objective.clip_eps_high=-0.1"], "objective.clip_eps_high"),
    (["objective.norm_tokens=16"], "objective.norm_tokens"),                     # not loss_agg: constant
    (["objective.loss_agg=constant", "objective.norm_tokens=0"], "objective.norm_tokens"),
    (["objective.overlong_buffer=0"], "objective.overlong_buffer"),
    (["objective.overlong_buffer=17"], "objective.overlong_buffer"),           # > max_tokens 16
    (["objective.overlong_buffer=4", "objective.overlong_penalty=0"], "objective.overlong_penalty"),
    (["objective.overlong_max_tokens=16"], "objective.overlong_max_tokens"),   # without a buffer
    (["objective.overlong_buffer=8", "objective.overlong_max_tokens=4"], "objective.overlong_max_tokens"),
])
def test_bad_options_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(GRPO, overrides)


def test_constrained_ppo_validates_the_same_options():
    with pytest.raises(ConfigError, match=r"objective\.loss_agg"):
        load_recipe("recipes/tiny_constrained_xi.yaml", ["objective.loss_agg=seq_mean"])


def test_dr_grpo_advantage_is_the_group_mean_baseline_without_std():
    """Dr. GRPO: A_i = r_i - mean(group), broadcast over the response tokens (TRL scale_rewards="none")."""
    from prefopt.rl.advantages import ADVANTAGES
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    rewards = torch.zeros(4, 3, dtype=torch.float64)
    rewards[torch.arange(4), mask.sum(-1) - 1] = torch.tensor([1.0, 0.0, 0.2, 0.6], dtype=torch.float64)
    adv, returns = ADVANTAGES.get("dr_grpo")(token_rewards=rewards, mask=mask, group_size=2)
    expected = torch.tensor([0.5, -0.5, -0.2, 0.2], dtype=torch.float64)
    assert returns is None
    assert torch.allclose(adv, expected[:, None] * mask, atol=1e-12)
    grpo, _ = ADVANTAGES.get("grpo")(token_rewards=rewards, mask=mask, group_size=2)
    std = torch.tensor([0.5, 0.5, 0.2, 0.2], dtype=torch.float64) * 2 ** 0.5     # unbiased, 2 per group
    assert torch.allclose(grpo, (expected / (std + 1e-6))[:, None] * mask, atol=1e-9)
