"""DPO / cDPO / IPO and SimPO: the pure losses against per-example formulas and hand-derived
gradients, the objective classes against the pure losses, and equality with TRL 1.16's own loss
code on identical inputs (float64, tolerance 1e-6)."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.objectives import PolicyOutput, get_objective
from prefopt.objectives.dpo import DPO, IPO, dpo_loss
from prefopt.objectives.simpo import SimPO, simpo_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
TOL = dict(atol=1e-6, rtol=1e-6)
B = 6


def _logps(seed: int, n: int = 4, scale: float = 20.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(-scale * torch.rand(B, generator=g, dtype=torch.float64)).requires_grad_()
            for _ in range(n)]


def _num_tokens(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 30, (B,), generator=g).to(torch.float64)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def neg_log_sigmoid(z: float) -> float:
    return math.log1p(math.exp(-z)) if z > 0 else -z + math.log1p(math.exp(z))


# ----------------------------------------------------------------------------- DPO / cDPO / IPO

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_loss_and_grads_match_formula(eps):
    beta = 0.3
    pc, pr, rc, rr = _logps(0)
    losses, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert losses.shape == rew_c.shape == rew_r.shape == (B,)
    losses.sum().backward()
    for i in range(B):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        z = beta * h
        expected = (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z)
        assert losses[i].item() == pytest.approx(expected, abs=1e-6)
        # d/dz [-(1-eps) log s(z) - eps log s(-z)] = s(z) - 1 + eps ; dz/d(pc) = beta
        dz = sigmoid(z) - 1 + eps
        assert pc.grad[i].item() == pytest.approx(beta * dz, abs=1e-6)
        assert pr.grad[i].item() == pytest.approx(-beta * dz, abs=1e-6)
        assert rc.grad[i].item() == pytest.approx(-beta * dz, abs=1e-6)
        assert rr.grad[i].item() == pytest.approx(beta * dz, abs=1e-6)
        assert rew_c[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), abs=1e-6)
        assert rew_r[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), abs=1e-6)
    assert not rew_c.requires_grad and not rew_r.requires_grad


def test_ipo_loss_and_grads_match_formula():
    beta = 0.5
    pc, pr, rc, rr = _logps(1, scale=3.0)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, ipo=True)
    losses.sum().backward()
    for i in range(B):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-6)
        assert pc.grad[i].item() == pytest.approx(2 * (h - 1 / (2 * beta)), abs=1e-6)
        assert rr.grad[i].item() == pytest.approx(2 * (h - 1 / (2 * beta)), abs=1e-6)
        assert pr.grad[i].item() == pytest.approx(-2 * (h - 1 / (2 * beta)), abs=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, beta=beta, ipo=True, label_smoothing=0.1)


def test_dpo_is_stable_for_large_margins():
    big = torch.tensor([1e4, -1e4], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    losses, _, _ = dpo_loss(big, zero, zero, zero, beta=1.0, label_smoothing=0.1)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.1 * 1e4, rel=1e-9)


def _pairs_batch(seed: int):
    pc, pr, rc, rr = _logps(seed)
    nc, nr = _num_tokens(seed + 100), _num_tokens(seed + 200)
    logps = torch.cat([pc, pr]).detach().requires_grad_()
    policy = PolicyOutput(logps=logps, num_tokens=torch.cat([nc, nr]))
    batch = {"ref_logps": torch.cat([rc, rr]).detach()}
    return policy, batch


def test_dpo_class_uses_split_pairs_and_reports_metrics():
    policy, batch = _pairs_batch(2)
    out = DPO(DPO.Params(beta=0.2, label_smoothing=0.1)).loss(policy, batch)
    pc, pr = policy.logps[:B], policy.logps[B:]
    rc, rr = batch["ref_logps"][:B], batch["ref_logps"][B:]
    losses, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1)
    torch.testing.assert_close(out.loss, losses.mean(), **TOL)
    m = out.metrics
    torch.testing.assert_close(m["rewards/chosen"], rew_c, **TOL)
    torch.testing.assert_close(m["rewards/rejected"], rew_r, **TOL)
    torch.testing.assert_close(m["rewards/margin"], rew_c - rew_r, **TOL)
    torch.testing.assert_close(m["rewards/accuracy"], (rew_c > rew_r).double() + 0.5 * (rew_c == rew_r).double())
    torch.testing.assert_close(m["logps/chosen"], pc.detach())
    torch.testing.assert_close(m["logps/rejected"], pr.detach())
    assert all(v.shape == (B,) and not v.requires_grad for v in m.values())
    assert 0 < m["rewards/accuracy"].sum() < B      # the random case has both outcomes


def test_ipo_class_divides_by_num_tokens():
    policy, batch = _pairs_batch(3)
    n = policy.num_tokens
    avg_pol, avg_ref = policy.logps / n, batch["ref_logps"] / n
    expected, rew_c, _ = dpo_loss(avg_pol[:B], avg_pol[B:], avg_ref[:B], avg_ref[B:], beta=0.1, ipo=True)
    for objective in (IPO(IPO.Params()), DPO(DPO.Params(ipo=True))):
        out = objective.loss(policy, batch)
        torch.testing.assert_close(out.loss, expected.mean(), **TOL)
        torch.testing.assert_close(out.metrics["rewards/chosen"], rew_c, **TOL)
        torch.testing.assert_close(out.metrics["logps/chosen"], policy.logps[:B].detach())
    # Not the same as IPO on summed log-probs.
    summed, _, _ = dpo_loss(policy.logps[:B], policy.logps[B:], batch["ref_logps"][:B],
                            batch["ref_logps"][B:], beta=0.1, ipo=True)
    assert abs(summed.mean().item() - expected.mean().item()) > 1e-3
    assert IPO.Params().ipo and IPO.Params().name == "ipo" and get_objective("ipo") is IPO


# ----------------------------------------------------------------------------- SimPO

@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_simpo_loss_and_grads_match_formula(eps):
    beta, gamma = 2.5, 1.4
    ac, ar = _logps(4, n=2, scale=3.0)
    losses, rew_c, rew_r = simpo_loss(ac, ar, beta=beta, gamma=gamma, label_smoothing=eps)
    losses.sum().backward()
    for i in range(B):
        z = beta * ac[i].item() - beta * ar[i].item() - gamma
        assert losses[i].item() == pytest.approx(
            (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z), abs=1e-6)
        dz = sigmoid(z) - 1 + eps
        assert ac.grad[i].item() == pytest.approx(beta * dz, abs=1e-6)
        assert ar.grad[i].item() == pytest.approx(-beta * dz, abs=1e-6)
        assert rew_c[i].item() == pytest.approx(beta * ac[i].item(), abs=1e-6)
        assert rew_r[i].item() == pytest.approx(beta * ar[i].item(), abs=1e-6)
    assert not rew_c.requires_grad


def test_simpo_class_averages_and_needs_no_reference():
    policy, _ = _pairs_batch(5)
    out = SimPO(SimPO.Params(beta=2.0, gamma=1.0)).loss(policy, {})   # no ref_logps at all
    avg = policy.logps / policy.num_tokens
    expected, rew_c, rew_r = simpo_loss(avg[:B], avg[B:], beta=2.0, gamma=1.0)
    torch.testing.assert_close(out.loss, expected.mean(), **TOL)
    torch.testing.assert_close(out.metrics["logps/chosen"], avg[:B].detach(), **TOL)
    torch.testing.assert_close(out.metrics["rewards/accuracy"], (rew_c > rew_r).double() + 0.5 * (rew_c == rew_r).double())
    assert SimPO.needs == frozenset()


# ----------------------------------------------------------------------------- TRL 1.16

def _trl_dpo(pc, pr, rc, rr, nc, nr, *, beta, loss_type, label_smoothing=0.0):
    """Run TRL 1.16's ``DPOTrainer._compute_loss`` itself on given sequence log-probs.

    In TRL 1.16 the DPO losses are computed inline in ``_compute_loss`` (no standalone loss
    function), so we call that method unbound with a ``SimpleNamespace`` ``self`` carrying only
    the attributes it reads, reference log-probs passed as precomputed (as TRL does with
    ``precompute_ref_log_probs``), and a stub model whose per-token log-probs over each row's
    completion tokens sum to the given sequence log-probs (and stay differentiable).
    Returns TRL's loss (mean over the batch) and its logged metrics.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    logps = torch.cat([pc, pr])
    n = torch.cat([nc, nr]).long()
    prompt_len = 3
    total = prompt_len + int(n.max())
    completion_mask = torch.zeros(len(n), total, dtype=torch.long)
    for row, k in enumerate(n.tolist()):
        completion_mask[row, prompt_len:prompt_len + k] = 1
    shift_mask = completion_mask[:, 1:].to(logps.dtype)
    per_token_logps = (logps / n.to(logps.dtype)).unsqueeze(1) * shift_mask

    def model(**kwargs):
        zeros = torch.zeros_like(per_token_logps)
        return SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool))

    identity = lambda x: x  # noqa: E731  (single process: gather is the identity)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity,
                                    gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask),
              "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask,
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("ipo", [False, True])
def test_dpo_and_ipo_equal_trl_dpo_trainer(ipo):
    beta = 0.1 if not ipo else 0.4
    policy, batch = _pairs_batch(6)
    ours = DPO(DPO.Params(beta=beta, ipo=ipo)).loss(policy, batch)
    ours.loss.backward()
    pol = policy.logps.detach().clone().requires_grad_()
    nc, nr = policy.num_tokens[:B], policy.num_tokens[B:]
    ref = batch["ref_logps"]
    trl_loss, trl_metrics = _trl_dpo(pol[:B], pol[B:], ref[:B], ref[B:], nc, nr, beta=beta,
                                     loss_type="ipo" if ipo else "sigmoid")
    trl_loss.backward()
    torch.testing.assert_close(ours.loss, trl_loss, **TOL)
    torch.testing.assert_close(policy.logps.grad, pol.grad, **TOL)
    assert policy.logps.grad.abs().min() > 0
    if not ipo:  # TRL logs rewards from summed log-ratios; ours for IPO are per-token averages
        for ours_key, trl_key in [("rewards/chosen", "rewards/chosen"),
                                  ("rewards/rejected", "rewards/rejected"),
                                  ("rewards/margin", "rewards/margins"),
                                  ("rewards/accuracy", "rewards/accuracies"),
                                  ("logps/chosen", "logps/chosen")]:
            assert ours.metrics[ours_key].mean().item() == pytest.approx(trl_metrics[trl_key][0], abs=1e-6)


def test_cdpo_equals_trl_label_smoothed_loss():
    """TRL 1.16's ``loss_type="sigmoid"`` ignores ``label_smoothing``; its cDPO-form expression
    -(1-eps) log s(beta d) - eps log s(-beta d) is in the ``"aot"`` branch, where d is the
    difference of the *batch-sorted* policy and reference log-ratios. With a batch of one pair the
    sort is the identity and d = h, so we compare example by example."""
    beta, eps = 0.2, 0.15
    pc, pr, rc, rr = _logps(7)
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    ones = torch.ones(1, dtype=torch.float64)
    for i in range(B):
        args = [t[i:i + 1].detach().clone().requires_grad_() for t in (pc, pr, rc, rr)]
        trl_loss, _ = _trl_dpo(*args, ones, ones, beta=beta, loss_type="aot", label_smoothing=eps)
        torch.testing.assert_close(trl_loss, ours[i], **TOL)
        trl_loss.backward()
        (grad_pc,) = torch.autograd.grad(ours[i], pc, retain_graph=True)
        assert args[0].grad.item() == pytest.approx(grad_pc[i].item(), abs=1e-6)
    # And TRL's plain "sigmoid" is our eps = 0 (it drops label_smoothing).
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    trl_sigmoid, _ = _trl_dpo(pc.detach(), pr.detach(), rc, rr, torch.ones(B), torch.ones(B),
                              beta=beta, loss_type="sigmoid", label_smoothing=eps)
    torch.testing.assert_close(trl_sigmoid, plain.mean(), **TOL)


def _trl_cpo(beta, gamma, label_smoothing):
    """An unbound-call ``self`` for TRL's ``CPOTrainer.cpo_loss`` configured as SimPO
    (``loss_type="simpo"``, AlphaPO ``alpha=0``; ``cpo_alpha=0`` only drops the NLL term that
    ``get_batch_loss_metrics`` adds to ``losses.mean()``)."""
    return SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=gamma,
                           label_smoothing=label_smoothing, cpo_alpha=0.0,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_equals_trl_cpo_trainer(eps):
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 1.6   # absolute gamma (official gamma_beta_ratio 0.8)
    ac, ar = _logps(8, n=2, scale=2.0)
    ours, rc, rr = simpo_loss(ac, ar, beta=beta, gamma=gamma, label_smoothing=eps)
    ac2, ar2 = ac.detach().clone().requires_grad_(), ar.detach().clone().requires_grad_()
    trl_losses, trl_rc, trl_rr = CPOTrainer.cpo_loss(_trl_cpo(beta, gamma, eps), ac2, ar2)
    torch.testing.assert_close(ours, trl_losses, **TOL)
    torch.testing.assert_close(rc, trl_rc, **TOL)
    torch.testing.assert_close(rr, trl_rr, **TOL)
    ours.sum().backward()
    trl_losses.sum().backward()
    torch.testing.assert_close(ac.grad, ac2.grad, **TOL)
    torch.testing.assert_close(ar.grad, ar2.grad, **TOL)


def test_simpo_class_equals_trl_on_token_logprobs():
    """From per-token logits: TRL averages with ``get_batch_logps(average_log_prob=True)`` (as its
    SimPO forward does); our class gets summed log-probs and token counts, as the learner sends."""
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(9)
    rows, length, vocab = 2 * B, 12, 7
    logits = torch.randn(rows, length, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    for r in range(rows):   # prompt of 3 tokens, then a response of random length, then padding
        labels[r, :3] = -100
        labels[r, 4 + r % 7:] = -100
    summed = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
    avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    num_tokens = (labels[:, 1:] != -100).sum(-1).to(torch.float64)
    out = SimPO(SimPO.Params(beta=2.5, gamma=1.375)).loss(PolicyOutput(summed, num_tokens), {})
    trl_losses, _, _ = CPOTrainer.cpo_loss(_trl_cpo(2.5, 1.375, 0.0), avg[:B], avg[B:])
    torch.testing.assert_close(out.loss, trl_losses.mean(), **TOL)


# ----------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("cls,kwargs", [
    (DPO, dict(beta=0.0)), (DPO, dict(beta=-1.0)), (DPO, dict(label_smoothing=0.5)),
    (DPO, dict(label_smoothing=-0.1)), (DPO, dict(label_smoothing=0.1, ipo=True)),
    (IPO, dict(label_smoothing=0.2)), (SimPO, dict(beta=0.0)), (SimPO, dict(gamma=-1.0)),
    (SimPO, dict(label_smoothing=0.7)),
])
def test_invalid_params_raise_config_error(cls, kwargs):
    key = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"objective\\.{key}"):
        cls.Params(**kwargs)


def test_default_params():
    assert DPO.Params() == DPO.Params(name="dpo", beta=0.1, label_smoothing=0.0, ipo=False)
    assert SimPO.Params() == SimPO.Params(name="simpo", beta=2.0, gamma=1.0, label_smoothing=0.0)


def test_accuracy_counts_ties_as_half():
    from prefopt.objectives.dpo import pair_metrics
    c = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)
    r = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    m = pair_metrics(c, r, c, r)
    assert m["rewards/accuracy"].tolist() == [1.0, 0.5, 0.0, 0.0]
