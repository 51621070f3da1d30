"""LiPO-lambda and ListMLE against naive per-list loops written from the formulas (float64,
tolerance 1e-6), special cases (K = 2 is DPO), padding invariance and the ranking metrics."""
from __future__ import annotations

import math

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.objectives import PolicyOutput
from prefopt.objectives.dpo import dpo_loss
from prefopt.objectives.lipo import (LiPO, lambda_weights, lipo_lambda_loss, list_metrics,
                                     pairwise_logistic_loss, ranks)
from prefopt.objectives.listmle import ListMLE, listmle_loss

TOL = dict(atol=1e-6, rtol=1e-6)


def _lists(seed: int, b: int = 5, k: int = 5, graded: bool = True):
    g = torch.Generator().manual_seed(seed)
    pol = (-30 * torch.rand(b, k, generator=g, dtype=torch.float64)).requires_grad_()
    ref = (-30 * torch.rand(b, k, generator=g, dtype=torch.float64)).requires_grad_()
    if graded:   # small integer grades, with ties
        scores = torch.randint(0, 4, (b, k), generator=g).to(torch.float64)
    else:
        scores = torch.rand(b, k, generator=g, dtype=torch.float64)
    return pol, ref, scores


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _softplus(z: float) -> float:
    return math.log1p(math.exp(z)) if z < 0 else z + math.log1p(math.exp(-z))


def naive_lipo(pol, ref, scores, beta, valid=None, unit=False):
    """Per-list loss and d loss / d s, by a double loop over pairs with ``math``."""
    losses, grads = [], []
    for b in range(len(pol)):
        idx = [i for i in range(len(pol[b])) if valid is None or valid[b][i]]
        s = {i: beta * (pol[b][i] - ref[b][i]) for i in idx}
        order = sorted(idx, key=lambda i: -s[i])            # Python's sort is stable
        tau = {i: order.index(i) + 1 for i in idx}
        gain = {i: 2.0 ** scores[b][i] - 1 for i in idx}
        inv_d = {i: 1.0 / math.log2(1 + tau[i]) for i in idx}
        loss, grad = 0.0, {i: 0.0 for i in idx}
        for i in idx:
            for j in idx:
                if scores[b][i] > scores[b][j]:
                    w = 1.0 if unit else abs(gain[i] - gain[j]) * abs(inv_d[i] - inv_d[j])
                    loss += w * _softplus(-(s[i] - s[j]))      # -log sigma(s_i - s_j)
                    g = w * (1 - _sig(s[i] - s[j]))
                    grad[i] -= g
                    grad[j] += g
        losses.append(loss)
        grads.append(grad)
    return losses, grads


def naive_listmle(pol, ref, scores, beta, valid=None):
    losses, grads = [], []
    for b in range(len(pol)):
        idx = [i for i in range(len(pol[b])) if valid is None or valid[b][i]]
        s = {i: beta * (pol[b][i] - ref[b][i]) for i in idx}
        lowest = min(scores[b][i] for i in idx)
        loss, grad = 0.0, {i: 0.0 for i in idx}
        for item in idx:                # Breslow: the risk set is every response graded no higher
            if scores[b][item] == lowest:
                continue                # the lowest grade is preferred over nothing
            rest = [m for m in idx if scores[b][m] <= scores[b][item]]
            z = sum(math.exp(s[m]) for m in rest)
            loss -= s[item] - math.log(z)
            grad[item] -= 1.0
            for m in rest:
                grad[m] += math.exp(s[m]) / z
        losses.append(loss)
        grads.append(grad)
    return losses, grads


def _check_against_naive(loss_fn, naive_fn, pol, ref, scores, beta, mask=None, **kw):
    losses = loss_fn(pol, ref, scores, beta=beta, mask=mask, **kw)
    losses.sum().backward()
    valid = None if mask is None else mask.tolist()
    expected, grads = naive_fn(pol.tolist(), ref.tolist(), scores.tolist(), beta, valid, **(
        {"unit": kw.get("weights") == "unit"} if naive_fn is naive_lipo else {}))
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), **TOL)
    for b, grad in enumerate(grads):
        for i in range(pol.shape[1]):
            if i in grad:
                assert pol.grad[b, i].item() == pytest.approx(beta * grad[i], abs=1e-6)
                assert ref.grad[b, i].item() == pytest.approx(-beta * grad[i], abs=1e-6)
            else:
                assert pol.grad[b, i].item() == 0.0 and ref.grad[b, i].item() == 0.0
    return losses


# ----------------------------------------------------------------------------- LiPO

@pytest.mark.parametrize("graded", [True, False])
@pytest.mark.parametrize("weights", ["lambda", "unit"])
def test_lipo_matches_naive_double_loop(graded, weights):
    pol, ref, scores = _lists(0 if graded else 1, graded=graded)
    losses = _check_against_naive(lipo_lambda_loss, naive_lipo, pol, ref, scores, 0.1, weights=weights)
    assert (losses > 0).all()


def test_lipo_rank_ties_follow_slot_order():
    # Policy == reference: every s is 0 (the first training step); ranks are slot order.
    pol = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    scores = torch.tensor([[0.0, 2.0, 1.0, 3.0]], dtype=torch.float64)
    assert ranks(pol).tolist() == [[1, 2, 3, 4]]
    assert ranks(torch.tensor([[0.5, 2.0, 0.5, -1.0]])).tolist() == [[2, 1, 3, 4]]
    _check_against_naive(lipo_lambda_loss, naive_lipo, pol, ref, scores, 0.5)


def test_lambda_weights_hand_case_and_no_gradient():
    s = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.float64, requires_grad=True)   # tau = 3, 1, 2
    scores = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)                   # G = 3, 0, 1
    w = lambda_weights(scores, s)
    assert not w.requires_grad
    inv = [1 / math.log2(4), 1 / math.log2(2), 1 / math.log2(3)]
    gain = [3.0, 0.0, 1.0]
    for i in range(3):
        for j in range(3):
            assert w[0, i, j].item() == pytest.approx(abs(gain[i] - gain[j]) * abs(inv[i] - inv[j]))
    # The loss gradient treats Delta as a constant: it equals the weighted logistic gradient.
    pol = s.detach().clone().requires_grad_()
    loss = lipo_lambda_loss(pol, torch.zeros_like(pol), scores, beta=1.0).sum()
    (grad,) = torch.autograd.grad(loss, pol)
    expected = torch.zeros(3, dtype=torch.float64)
    for i, j in [(0, 1), (0, 2), (2, 1)]:    # psi_i > psi_j
        g = w[0, i, j].item() * (1 - _sig(s[0, i].item() - s[0, j].item()))
        expected[i] -= g
        expected[j] += g
    torch.testing.assert_close(grad[0], expected, **TOL)


def test_lipo_k2_unit_weights_is_dpo():
    g = torch.Generator().manual_seed(2)
    pw, pl, rw, rl = (-20 * torch.rand(4, 8, generator=g, dtype=torch.float64)).unbind(0)
    winner_first = torch.rand(8, generator=g) < 0.5
    # Put the winner in slot 0 or 1 at random.
    pol = torch.where(winner_first[:, None], torch.stack([pw, pl], 1), torch.stack([pl, pw], 1))
    ref = torch.where(winner_first[:, None], torch.stack([rw, rl], 1), torch.stack([rl, rw], 1))
    scores = torch.where(winner_first[:, None], torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    beta = 0.2
    dpo, _, _ = dpo_loss(pw, pl, rw, rl, beta=beta)
    torch.testing.assert_close(pairwise_logistic_loss(pol, ref, scores, beta=beta), dpo, **TOL)
    torch.testing.assert_close(
        lipo_lambda_loss(pol, ref, scores, beta=beta, weights="unit"), dpo, **TOL)
    # Lambda weights for K = 2: |G_w - G_l| * |1/log2(2) - 1/log2(3)| times DPO.
    delta = 1.0 * (1.0 - 1.0 / math.log2(3))
    torch.testing.assert_close(lipo_lambda_loss(pol, ref, scores, beta=beta), delta * dpo, **TOL)


def _padded(seed: int, lengths: list[int], k: int, garbage: float):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.arange(k)[None, :] < torch.tensor(lengths)[:, None]
    pol, ref, scores = (-20 * torch.rand(3, b, k, generator=g, dtype=torch.float64)).unbind(0)
    scores = torch.randint(0, 4, (b, k), generator=g).to(torch.float64)
    fill = torch.full((b, k), garbage, dtype=torch.float64)
    pol, ref, scores = (torch.where(mask, x, fill) for x in (pol, ref, scores))
    return pol.requires_grad_(), ref.requires_grad_(), scores, mask


@pytest.mark.parametrize("loss_fn", [lipo_lambda_loss, listmle_loss])
@pytest.mark.parametrize("garbage", [1e3, -1e3, float("nan"), float("inf")])
def test_padding_changes_nothing(loss_fn, garbage):
    lengths = [5, 3, 1, 4, 2]
    pol, ref, scores, mask = _padded(3, lengths, 6, garbage)
    losses = loss_fn(pol, ref, scores, beta=0.3, mask=mask)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert (pol.grad[~mask] == 0).all() and (ref.grad[~mask] == 0).all()
    for b, n in enumerate(lengths):   # each list alone, unpadded
        p1 = pol[b:b + 1, :n].detach().clone().requires_grad_()
        r1 = ref[b:b + 1, :n].detach().clone().requires_grad_()
        alone = loss_fn(p1, r1, scores[b:b + 1, :n], beta=0.3)
        alone.sum().backward()
        torch.testing.assert_close(losses[b:b + 1], alone, **TOL)
        torch.testing.assert_close(pol.grad[b, :n], p1.grad[0], **TOL)
        torch.testing.assert_close(ref.grad[b, :n], r1.grad[0], **TOL)
    assert losses[2].item() == 0.0     # a single response has no pair


def test_lipo_with_padding_matches_naive():
    pol, ref, scores, mask = _padded(4, [4, 2, 5], 5, 7.0)
    _check_against_naive(lipo_lambda_loss, naive_lipo, pol, ref, scores, 0.05, mask=mask)


# ----------------------------------------------------------------------------- ListMLE

@pytest.mark.parametrize("graded", [True, False])
def test_listmle_matches_naive(graded):
    pol, ref, scores = _lists(5 if graded else 6, graded=graded)
    _check_against_naive(listmle_loss, naive_listmle, pol, ref, scores, 0.1)


def test_listmle_with_padding_matches_naive():
    pol, ref, scores, mask = _padded(7, [3, 5, 2], 5, -5.0)
    _check_against_naive(listmle_loss, naive_listmle, pol, ref, scores, 0.2, mask=mask)


def test_listmle_k2_is_dpo():
    pol, ref, _ = _lists(8, b=6, k=2)
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 3, dtype=torch.float64)
    w = scores.argmax(1)
    take = lambda x, i: x.gather(1, i[:, None]).squeeze(1)  # noqa: E731
    dpo, _, _ = dpo_loss(take(pol, w), take(pol, 1 - w), take(ref, w), take(ref, 1 - w), beta=0.1)
    torch.testing.assert_close(listmle_loss(pol, ref, scores, beta=0.1), dpo, **TOL)


# ----------------------------------------------------------------------------- classes, metrics

def _lists_batch(pol_rows, ref_rows, scores, mask):
    return (PolicyOutput(logps=pol_rows, num_tokens=torch.ones_like(pol_rows)),
            {"ref_logps": ref_rows, "scores": scores, "slot_mask": mask})


def test_list_objectives_use_slot_rows():
    pol, ref, scores, mask = _padded(9, [4, 2, 3], 4, 0.0)
    rows = pol[mask].detach().clone().requires_grad_()      # the learner's row order
    policy, batch = _lists_batch(rows, ref[mask].detach(), scores, mask)
    for cls, fn in [(LiPO, lipo_lambda_loss), (ListMLE, listmle_loss)]:
        out = cls(cls.Params(beta=0.3)).loss(policy, batch)
        torch.testing.assert_close(out.loss, fn(pol, ref, scores, beta=0.3, mask=mask).mean(), **TOL)
        (grad,) = torch.autograd.grad(out.loss, rows)
        assert grad.shape == rows.shape and grad.abs().min() > 0
        assert set(out.metrics) == {"ranking/accuracy", "ranking/pairs", "rewards/mean",
                                    "rewards/top_minus_bottom"}
        assert all(v.shape == (3,) and not v.requires_grad for v in out.metrics.values())
    unit = LiPO(LiPO.Params(beta=0.3, weights="unit")).loss(policy, batch)
    torch.testing.assert_close(unit.loss, pairwise_logistic_loss(pol, ref, scores, beta=0.3, mask=mask).mean())


def test_ranking_metrics_hand_case():
    nan = float("nan")
    s = torch.tensor([[0.5, 0.7, 0.1, -1.0],     # pairs: 6, correct: all but (0, 1) -> 5/6
                      [-1.0, 1.0, nan, nan],     # one pair, wrong -> 0
                      [0.2, 0.4, 0.3, nan]],     # all labels tied: no pair
                     dtype=torch.float64)
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 0.0, 9.0, 9.0], [1.0, 1.0, 1.0, 9.0]],
                          dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, True, True, False]])
    m = list_metrics(s, scores, mask)
    torch.testing.assert_close(m["ranking/pairs"], torch.tensor([6.0, 1.0, 0.0], dtype=torch.float64))
    # The list without pairs gets the mean of the others, so the plain mean excludes it.
    acc = torch.tensor([5 / 6, 0.0, 5 / 12], dtype=torch.float64)
    torch.testing.assert_close(m["ranking/accuracy"], acc)
    assert m["ranking/accuracy"].mean().item() == pytest.approx((5 / 6 + 0.0) / 2)
    torch.testing.assert_close(m["rewards/mean"], torch.tensor([0.075, 0.0, 0.3], dtype=torch.float64))
    torch.testing.assert_close(m["rewards/top_minus_bottom"],
                               torch.tensor([1.5, -2.0, 0.0], dtype=torch.float64))
    # Through the LiPO objective (beta = 1, reference 0: s = policy log-probs).
    policy, batch = _lists_batch(s[mask], torch.zeros(int(mask.sum()), dtype=torch.float64), scores, mask)
    out = LiPO(LiPO.Params(beta=1.0)).loss(policy, batch)
    torch.testing.assert_close(out.metrics["ranking/accuracy"], acc)
    assert LiPO.accuracy_metric == ListMLE.accuracy_metric == "ranking/accuracy"
    # No list with a pair at all: 0.5, never NaN.
    none = list_metrics(s[2:], scores[2:], mask[2:])
    assert none["ranking/accuracy"].tolist() == [0.5]


@pytest.mark.parametrize("cls,kwargs", [(LiPO, dict(beta=0.0)), (LiPO, dict(weights="ndcg")),
                                        (ListMLE, dict(beta=-0.1))])
def test_invalid_list_params(cls, kwargs):
    with pytest.raises(ConfigError, match=f"objective\\.{next(iter(kwargs))}"):
        cls.Params(**kwargs)
    with pytest.raises(ValueError):
        lipo_lambda_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), beta=1.0, weights="x")


def test_ranking_accuracy_of_untrained_policy_is_chance():
    from prefopt.objectives.lipo import list_metrics
    s = torch.zeros(2, 4, dtype=torch.float64)            # policy == reference: all rewards tie
    scores = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    assert list_metrics(s, scores)["ranking/accuracy"].tolist() == [0.5, 0.5]


def test_listmle_ties_invent_no_order():
    """Breslow's ties: a list whose labels all tie has loss 0 and no gradient; in [1, 1, 0, 0] each
    right answer's denominator is the whole list, and the wrong ones add no term."""
    from prefopt.objectives.listmle import listmle_loss
    pol = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(1, 4, dtype=torch.float64)
    tied = listmle_loss(pol, ref, torch.ones(1, 4), beta=0.5)
    tied.sum().backward()
    assert tied.item() == 0.0 and torch.all(pol.grad == 0)
    s = 0.5 * pol.detach()[0]
    expected = -sum(s[i] - torch.logsumexp(s, 0) for i in (0, 1))
    got = listmle_loss(pol, ref, torch.tensor([[1.0, 1.0, 0.0, 0.0]]), beta=0.5)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)
