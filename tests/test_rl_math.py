"""Pure-tensor RL math: GAE, group baselines, PPO losses, KL estimators, Clip / Delta rewards."""
import math

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.rewards import (clip_process_rewards, delta_process_rewards, place_step_rewards,
                             refine_process_rewards)
from prefopt.rl.advantages import (ADVANTAGES, gae, grpo_advantages, masked_mean, masked_var,
                                   rloo_advantages, whiten)
from prefopt.rl.ppo import (entropy_from_logits, explained_variance, kl_penalty, policy_loss,
                            value_loss)

D = torch.float64


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(D)


# ---------------------------------------------------------------- GAE

def gae_loop(rewards, values, mask, gamma, lam):
    """Reference: plain Python over the valid positions of each row."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, dtype=D), torch.zeros(B, T, dtype=D)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        a_next, v_next = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            a = delta + gamma * lam * a_next
            adv[b, t], ret[b, t] = a, a + values[b, t].item()
            a_next, v_next = a, values[b, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (1.0, 0.95)])
def test_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 7, generator=g, dtype=D), torch.randn(3, 7, generator=g, dtype=D)
    mask = prefix_mask([7, 4, 1], 7)
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam)
    adv_ref, ret_ref = gae_loop(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    if gamma == 1.0 and lam == 1.0:   # returns = reward-to-go
        rtg = torch.flip(torch.cumsum(torch.flip(r * mask, [1]), 1), [1]) * mask
        torch.testing.assert_close(ret, rtg)


def test_gae_general_mask_skips_holes_and_has_no_grad():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(3, 7, generator=g, dtype=D)
    v = torch.randn(3, 7, generator=g, dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 0, 0, 0], [1] * 7], dtype=D)
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    adv_ref, ret_ref = gae_loop(r, v.detach(), mask, 0.9, 0.8)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- group baselines

def test_grpo_hand_computed():
    s = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 3.0, 3.0, 5.0], dtype=D)
    adv = grpo_advantages(s, 4, eps=0.0)
    # group 1: mean .5, unbiased std sqrt(1/3); group 2: mean 3.5, std 1
    sd1 = math.sqrt((4 * 0.25) / 3)
    exp = torch.tensor([.5 / sd1, -.5 / sd1, .5 / sd1, -.5 / sd1, -.5, -.5, -.5, 1.5], dtype=D)
    torch.testing.assert_close(adv, exp)
    torch.testing.assert_close(adv, (s.view(2, 4) - s.view(2, 4).mean(1, keepdim=True)).div(
        s.view(2, 4).std(1, keepdim=True)).view(-1))          # TRL: torch.std (unbiased)
    torch.testing.assert_close(grpo_advantages(s.view(2, 4), eps=0.0), exp.view(2, 4))
    torch.testing.assert_close(grpo_advantages(s, 4, std_normalize=False),
                               torch.tensor([.5, -.5, .5, -.5, -.5, -.5, -.5, 1.5], dtype=D))
    # constant group -> 0, not NaN
    assert (grpo_advantages(torch.ones(4, dtype=D), 4) == 0).all()


def test_grpo_group_ids_any_order():
    s = torch.tensor([1.0, 3.0, 0.0, 3.0, 1.0, 3.0, 0.0, 5.0], dtype=D)
    ids = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    adv = grpo_advantages(s, group_ids=ids)
    contiguous = grpo_advantages(torch.cat([s[ids == 0], s[ids == 1]]), 4)
    torch.testing.assert_close(adv[ids == 0], contiguous[:4])
    torch.testing.assert_close(adv[ids == 1], contiguous[4:])


def test_rloo_hand_computed():
    s = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0], dtype=D)
    adv = rloo_advantages(s, 3)
    exp = torch.tensor([1 - 4, 2 - 3.5, 6 - 1.5, 0 - 6, 4 - 4, 8 - 2], dtype=D)
    torch.testing.assert_close(adv, exp)
    torch.testing.assert_close(rloo_advantages(s.view(2, 3)), exp.view(2, 3))
    with pytest.raises(ValueError):
        rloo_advantages(s, 1)
    with pytest.raises(ValueError):
        rloo_advantages(s, 4)


def test_advantage_registry_common_signature():
    assert ADVANTAGES.names() == ["dr_grpo", "gae", "grpo", "rloo"]
    g = torch.Generator().manual_seed(2)
    B, T = 4, 5
    r, v = torch.randn(B, T, generator=g, dtype=D), torch.randn(B, T, generator=g, dtype=D)
    mask = prefix_mask([5, 3, 2, 4], T)
    scores = torch.tensor([1.0, 0.0, 2.0, 5.0], dtype=D)
    kw = dict(token_rewards=r, values=v, mask=mask, scores=scores, group_size=2, gamma=1.0, lam=0.95)
    adv, ret = ADVANTAGES.get("gae")(**kw)
    torch.testing.assert_close(adv, gae(r, v, mask, gamma=1.0, lam=0.95)[0])
    assert ret is not None
    for name, fn in [("grpo", lambda s: grpo_advantages(s, 2)), ("rloo", lambda s: rloo_advantages(s, 2)),
                     ("dr_grpo", lambda s: grpo_advantages(s, 2, std_normalize=False))]:
        adv, ret = ADVANTAGES.get(name)(**{**kw, "values": None})
        assert ret is None and adv.shape == (B, T)
        torch.testing.assert_close(adv, fn(scores)[:, None] * mask)
    # scores default to the masked sum of token rewards
    adv, _ = ADVANTAGES.get("rloo")(**{**kw, "scores": None})
    torch.testing.assert_close(adv, rloo_advantages((r * mask).sum(1), 2)[:, None] * mask)
    with pytest.raises(ConfigError):
        ADVANTAGES.get("gae")(**{**kw, "values": None})
    with pytest.raises(ConfigError, match="did you mean"):
        ADVANTAGES.get("grp")


# ---------------------------------------------------------------- masked stats, whitening

def test_whiten_masked_moments():
    g = torch.Generator().manual_seed(3)
    x = 5 + 3 * torch.randn(4, 9, generator=g, dtype=D)
    mask = prefix_mask([9, 5, 2, 7], 9)
    w = whiten(x, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-10
    assert abs(masked_var(w, mask).item() - 1) < 1e-6
    assert (w[mask == 0] == 0).all()
    vals = x[mask.bool()]
    assert math.isclose(masked_var(x, mask).item(), vals.var().item(), rel_tol=1e-12)
    assert math.isclose(masked_var(x, mask, unbiased=False).item(), vals.var(unbiased=False).item(),
                        rel_tol=1e-12)
    w2 = whiten(x, mask, shift_mean=False)
    assert math.isclose(masked_mean(w2, mask).item(), vals.mean().item(), rel_tol=1e-10)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), (x * mask).sum(1) / mask.sum(1))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------- PPO losses

def test_policy_loss_matches_elementwise():
    g = torch.Generator().manual_seed(4)
    B, T, eps = 3, 6, 0.2
    old = -torch.rand(B, T, generator=g, dtype=D) * 3
    new = (old + 0.5 * torch.randn(B, T, generator=g, dtype=D)).requires_grad_()
    A = torch.randn(B, T, generator=g, dtype=D)
    mask = prefix_mask([6, 3, 4], T)
    loss, m = policy_loss(new, old, A, mask, clip_eps=eps)
    tot, n, nclip, kl, rsum = 0.0, 0, 0, 0.0, 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            ratio = math.exp(new[b, t].item() - old[b, t].item())
            s1 = -A[b, t].item() * ratio
            s2 = -A[b, t].item() * min(max(ratio, 1 - eps), 1 + eps)
            tot += max(s1, s2); n += 1; nclip += s2 > s1
            kl += (ratio - 1) - math.log(ratio); rsum += ratio
    assert math.isclose(loss.item(), tot / n, rel_tol=1e-12)
    assert math.isclose(m["clip_frac"].item(), nclip / n, rel_tol=1e-12)
    assert 0 < nclip < n
    assert math.isclose(m["approx_kl"].item(), kl / n, rel_tol=1e-10)
    assert math.isclose(m["ratio_mean"].item(), rsum / n, rel_tol=1e-12)
    # gradient is zero exactly where clipping binds, and on padding
    loss.backward()
    ratio = torch.exp(new.detach() - old)
    binds = (-A * ratio.clamp(1 - eps, 1 + eps)) > (-A * ratio)
    assert (new.grad[binds & mask.bool()] == 0).all()
    assert (new.grad[mask == 0] == 0).all()
    assert (new.grad[~binds & mask.bool()] != 0).all()


def test_policy_clip_frac_hand_case():
    old = torch.zeros(1, 4, dtype=D)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.1]], dtype=D))
    A = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=D)
    # token 0: A>0, ratio 1.5 > 1.2 -> binds; token 1: A<0, ratio 1.5 -> unclipped branch is max;
    # token 2: A<0, ratio 0.5 < 0.8 -> binds; token 3: inside the range.
    loss, m = policy_loss(new, old, A, torch.ones(1, 4, dtype=D), clip_eps=0.2)
    assert math.isclose(m["clip_frac"].item(), 0.5)
    assert math.isclose(loss.item(), (-1.2 + 1.5 + 0.8 - 1.1) / 4, rel_tol=1e-12)


def test_value_loss_matches_elementwise():
    g = torch.Generator().manual_seed(5)
    B, T, eps = 3, 5, 0.3
    old = torch.randn(B, T, generator=g, dtype=D)
    V = old + torch.randn(B, T, generator=g, dtype=D)
    R = torch.randn(B, T, generator=g, dtype=D)
    mask = prefix_mask([5, 2, 3], T)
    loss, m = value_loss(V, old, R, mask, clip_eps=eps)
    tot, n, nclip, vs = 0.0, 0, 0, 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            v, vo, r = V[b, t].item(), old[b, t].item(), R[b, t].item()
            vc = vo + min(max(v - vo, -eps), eps)
            tot += max((v - r) ** 2, (vc - r) ** 2); n += 1
            nclip += (vc - r) ** 2 > (v - r) ** 2; vs += v
    assert math.isclose(loss.item(), 0.5 * tot / n, rel_tol=1e-12)
    assert math.isclose(m["value_clip_frac"].item(), nclip / n, rel_tol=1e-12)
    assert math.isclose(m["value_mean"].item(), vs / n, rel_tol=1e-12)
    unclipped, _ = value_loss(V, old, R, mask, clip_eps=None)
    assert math.isclose(unclipped.item(), 0.5 * masked_mean((V - R) ** 2, mask).item())


def test_entropy_and_kl_estimators():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 11, generator=g, dtype=D)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    lp, ref = -torch.rand(2, 5, generator=g, dtype=D) * 4, -torch.rand(2, 5, generator=g, dtype=D) * 4
    d = lp - ref
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), 0.5 * d ** 2)
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.exp(ref - lp) - (ref - lp) - 1)
    torch.testing.assert_close(kl_penalty(lp, ref, "abs"), d.abs())
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    mask = prefix_mask([5, 2], 5)
    assert (kl_penalty(lp, ref, "k1", mask=mask)[mask == 0] == 0).all()
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")


def test_explained_variance():
    g = torch.Generator().manual_seed(7)
    R, V = torch.randn(3, 6, generator=g, dtype=D), torch.randn(3, 6, generator=g, dtype=D)
    mask = prefix_mask([6, 4, 1], 6)
    r, v = R[mask.bool()], V[mask.bool()]
    assert math.isclose(explained_variance(V, R, mask).item(), 1 - (r - v).var().item() / r.var().item(),
                        rel_tol=1e-12)
    assert math.isclose(explained_variance(R, R, mask).item(), 1.0)
    assert math.isnan(explained_variance(V, torch.ones_like(R), mask).item())


# ---------------------------------------------------------------- Clip / Delta process rewards

def test_clip_hand_case():
    r = torch.tensor([[0.9, 0.4, 0.7, 0.0], [0.2, 0.8, 0.0, 0.0]], dtype=D)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = clip_process_rewards(r, 0.5, m)
    torch.testing.assert_close(out, torch.tensor([[0.0, -0.1, 0.0, 0], [-0.3, 0.0, 0, 0]], dtype=D))
    g = torch.Generator().manual_seed(8)
    assert (clip_process_rewards(torch.randn(5, 6, generator=g, dtype=D), 0.3) <= 0).all()


def test_delta_hand_case_and_telescoping():
    r = torch.tensor([[0.9, 0.4, 0.7, 9.0], [0.2, 0.8, 9.0, 9.0]], dtype=D)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(delta_process_rewards(r, m),
                               torch.tensor([[0.5, -0.3, 0.7, 0], [-0.6, 0.8, 0, 0]], dtype=D))
    g = torch.Generator().manual_seed(9)
    K, lengths = 8, [8, 5, 1, 3, 0]
    r = torch.randn(len(lengths), K, generator=g, dtype=D)
    m = prefix_mask(lengths, K)
    for refined, target in [(delta_process_rewards(r, m), r),
                            (refine_process_rewards(r, m, clip_eta=0.2, delta=True),
                             clip_process_rewards(r, 0.2, m))]:
        suffix = torch.flip(torch.cumsum(torch.flip(refined, [1]), 1), [1])
        torch.testing.assert_close(suffix[m.bool()], target[m.bool()])    # sum_{j>=k} = r_k
        assert (refined[m == 0] == 0).all()


def test_refine_order_and_validation():
    r = torch.tensor([[0.9, 0.4, 0.7]], dtype=D)
    m = torch.ones(1, 3)
    both = refine_process_rewards(r, m, clip_eta=0.5, delta=True)
    # clip -> [0, -0.1, 0]; then delta -> [0.1, -0.1, 0]  (delta-then-clip would give [0, -0.8, 0])
    torch.testing.assert_close(both, torch.tensor([[0.1, -0.1, 0.0]], dtype=D))
    torch.testing.assert_close(clip_process_rewards(delta_process_rewards(r, m), 0.5, m),
                               torch.tensor([[0.0, -0.8, 0.0]], dtype=D))
    torch.testing.assert_close(both, delta_process_rewards(clip_process_rewards(r, 0.5, m), m))
    torch.testing.assert_close(refine_process_rewards(r, m), r)
    torch.testing.assert_close(refine_process_rewards(r, m, clip_eta=0.5), clip_process_rewards(r, 0.5))
    with pytest.raises(ValueError, match="prefix"):
        delta_process_rewards(r, torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError):
        clip_process_rewards(r, 0.5, torch.ones(1, 4))


def test_place_step_rewards():
    steps = torch.tensor([[-0.1, -0.2, -0.3], [0.5, 7.0, 7.0]], dtype=D)
    ends = torch.tensor([[2, 5, 8], [3, -1, -1]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = place_step_rewards(steps, ends, m, 10, success_reward=torch.tensor([1.0, 0.0], dtype=D),
                             last_positions=torch.tensor([9, 6]), alpha=0.5)
    exp = torch.zeros(2, 10, dtype=D)
    exp[0, 2], exp[0, 5], exp[0, 8], exp[0, 9] = -0.05, -0.1, -0.15, 1.0
    exp[1, 3] = 0.25
    torch.testing.assert_close(out, exp)
    # success reward on the same token as the last step end adds up
    out = place_step_rewards(steps, ends, m, 10, success_reward=torch.tensor([1.0, 2.0], dtype=D),
                             last_positions=torch.tensor([8, 3]))
    assert math.isclose(out[0, 8].item(), 0.7) and math.isclose(out[1, 3].item(), 2.5)
    assert math.isclose(out.sum().item(), -0.6 + 1.0 + 0.5 + 2.0)
    with pytest.raises(ValueError):
        place_step_rewards(steps, ends, m, 8)                 # position 8 out of range
    with pytest.raises(ValueError):
        place_step_rewards(steps, ends, m, 10, success_reward=torch.ones(2, dtype=D))


def test_ppo_objective_entropy_bonus_and_kl_loss():
    """The PPO class adds -entropy_coef * entropy and, with kl_in_reward=False, kl_coef * k3."""
    import torch
    from prefopt.objectives.base import PolicyOutput
    from prefopt.objectives.ppo import PPO, PPOParams
    from prefopt.rl.ppo import kl_penalty, policy_loss
    from prefopt.rl.advantages import masked_mean

    torch.manual_seed(0)
    n, t = 3, 5
    logps = torch.randn(n, t, dtype=torch.float64) - 2
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[0, 3:] = False
    batch = {"old_logps": logps + 0.05 * torch.randn(n, t, dtype=torch.float64),
             "advantages": torch.randn(n, t, dtype=torch.float64),
             "ref_logps": logps + 0.1 * torch.randn(n, t, dtype=torch.float64)}
    entropy = torch.rand(n, t, dtype=torch.float64)
    policy = PolicyOutput(logps=logps.sum(-1), num_tokens=mask.sum(-1).double(), token_logps=logps,
                          token_mask=mask, entropy=entropy)
    obj = PPO(PPOParams(entropy_coef=0.01, kl_coef=0.1, kl_in_reward=False))
    assert obj.wants_entropy
    out = obj.loss(policy, batch)
    base, _ = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip_eps=0.2)
    kl = masked_mean(kl_penalty(logps, batch["ref_logps"], kind="k3"), mask)
    expected = base + 0.1 * kl - 0.01 * masked_mean(entropy, mask)
    assert float(out.loss) == pytest.approx(float(expected), abs=1e-12)
    assert float(out.metrics["policy/entropy"]) == pytest.approx(float(masked_mean(entropy, mask)))
    assert not PPO(PPOParams(log_entropy=False)).wants_entropy


def test_sequence_reward_clip_and_running_normalisation():
    from prefopt.rl.signals import RewardNormalizer, shape_sequence_rewards
    from prefopt.objectives.ppo import PPOParams

    clipped = shape_sequence_rewards([-20.0, 0.5, 30.0], PPOParams(reward_clip=[-10.0, 10.0]), RewardNormalizer())
    assert clipped == [-10.0, 0.5, 10.0]
    norm = RewardNormalizer()
    first = shape_sequence_rewards([1.0, 2.0, 3.0], PPOParams(normalize_rewards=True), norm)
    assert first == pytest.approx([-1.0, 0.0, 1.0])              # mean 2, unbiased std 1
    second = shape_sequence_rewards([5.0], PPOParams(normalize_rewards=True), norm)
    values = [1.0, 2.0, 3.0, 5.0]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert second == pytest.approx([(5.0 - mean) / std])


def test_compute_advantages_from_samples():
    """Sequence reward at the last token + process rewards; GRPO and GAE (gamma = lam = 1, V = 0)."""
    from prefopt.objectives.ppo import PPOParams
    from prefopt.rl.signals import compute_advantages

    from prefopt.data.rollouts import RolloutSample

    def samples():
        return [RolloutSample(prompt_ids=[7], response_ids=[1, 2, 3], old_logps=[-1.0] * 3, reward=1.0),
                RolloutSample(prompt_ids=[7], response_ids=[1, 2], old_logps=[-1.0] * 2, reward=0.0,
                              process_rewards=[0.5, 0.0])]

    grpo = samples()
    compute_advantages(grpo, PPOParams(advantage="grpo", kl_coef=0.0, whiten_advantages=False), group_size=2)
    # scores 1.0 and 0.5 -> (r - mean) / (unbiased std + eps), broadcast over each response
    std = math.sqrt(((1.0 - 0.75) ** 2 + (0.5 - 0.75) ** 2) / 1)
    assert grpo[0].advantages == pytest.approx([0.25 / std] * 3, rel=1e-5)
    assert grpo[1].advantages == pytest.approx([-0.25 / std] * 2, rel=1e-5)

    gae_samples = samples()
    for s in gae_samples:
        s.values = [0.0] * len(s.response_ids)
    stats = compute_advantages(gae_samples, PPOParams(advantage="gae", gamma=1.0, lam=1.0, kl_coef=0.0,
                                                      whiten_advantages=False), group_size=2)
    assert gae_samples[0].returns == pytest.approx([1.0, 1.0, 1.0])   # reward-to-go
    assert gae_samples[1].returns == pytest.approx([0.5, 0.0])
    assert gae_samples[1].advantages == pytest.approx([0.5, 0.0])
    assert "critic/explained_variance" in stats
