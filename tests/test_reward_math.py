"""Reward-model math against formulas written independently in float64 with plain Python/math:
Bradley-Terry (also against TRL's RewardTrainer.compute_loss), attribute MSE, step BCE, ensemble
aggregates and preference strength, the log-sigmoid reward transform, implicit process rewards."""
import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prefopt.objectives.prm import step_bce_loss
from prefopt.objectives.reward_model import bradley_terry_loss
from prefopt.objectives.reward_regression import attribute_mse_loss
from prefopt.rewards.ensemble import AGGREGATES, aggregate, preference_strength
from prefopt.rewards.implicit_prm import step_mask, step_rewards
from prefopt.rewards.transforms import combine_transformed, log_sigmoid_transform

ATOL = 1e-6


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.double(), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- Bradley-Terry

def _bt_ref(rc, rr, margin, eps, c):
    out = []
    for i, (a, b) in enumerate(zip(rc, rr)):
        m = margin[i] if isinstance(margin, list) else margin
        d = a - b - m
        out.append(-(1 - eps) * _log_sigmoid(d) - eps * _log_sigmoid(-d) + c * (a + b) ** 2)
    return out


@pytest.mark.parametrize("margin_kind", ["none", "tensor", "const"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("c", [0.0, 0.01])
def test_bradley_terry_formula(margin_kind, eps, c):
    rc, rr = _rand(7, seed=1, scale=2.0), _rand(7, seed=2, scale=2.0)
    margin_t = _rand(7, seed=3).abs()
    margin = {"none": None, "tensor": margin_t, "const": 0.5}[margin_kind]
    ref_margin = {"none": 0.0, "tensor": margin_t.tolist(), "const": 0.5}[margin_kind]
    got = bradley_terry_loss(rc, rr, margin=margin, label_smoothing=eps, center_coef=c)
    _close(got, _bt_ref(rc.tolist(), rr.tolist(), ref_margin, eps, c))


def test_bradley_terry_values_by_hand():
    # d = 0: log 2; smoothing leaves it at log 2; centring adds c * (1 + 1)^2.
    got = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), label_smoothing=0.2, center_coef=0.5)
    assert got.item() == pytest.approx(math.log(2) + 0.5 * 4, abs=ATOL)


# ---------------------------------------------------------------- TRL RewardTrainer

class _Accel:
    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


class _FixedRewards(torch.nn.Module):
    """Returns fixed logits ``[2B, 1]``: the chosen rewards then the rejected ones (TRL's collated order)."""

    def __init__(self, chosen, rejected):
        super().__init__()
        self.logits = torch.cat([chosen, rejected]).unsqueeze(-1)

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits)


def _trl_loss(chosen, rejected, *, margin=None, center=None, training=False):
    from trl.trainer.reward_trainer import RewardTrainer

    model = _FixedRewards(chosen, rejected)
    model.train(training)
    stand_in = SimpleNamespace(
        model=model, args=SimpleNamespace(center_rewards_coefficient=center), accelerator=_Accel(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    n = 2 * chosen.shape[0]
    inputs = {"input_ids": torch.ones(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(stand_in, model, inputs)
    return loss, stand_in


@pytest.mark.parametrize("use_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01, 0.3])
@pytest.mark.parametrize("training", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(use_margin, center, training):
    rc, rr = _rand(6, seed=11, scale=2.0), _rand(6, seed=12, scale=2.0)
    margin = _rand(6, seed=13).abs() if use_margin else None
    trl_loss, stand_in = _trl_loss(rc, rr, margin=margin, center=center, training=training)
    ours = bradley_terry_loss(rc, rr, margin=margin, center_coef=center or 0.0).mean()
    assert trl_loss.dtype == torch.float64
    torch.testing.assert_close(trl_loss, ours, atol=ATOL, rtol=0)
    # TRL logged the accuracy of this very split, so the chosen/rejected order was read as intended.
    mode = "train" if training else "eval"
    assert stand_in._metrics[mode]["accuracy"] == [pytest.approx((rc > rr).double().mean().item())]


def test_trl_centring_is_mean_over_pairs_of_squared_sums():
    # The concatenated alternative c * mean(r^2) over all 2B rewards would give c * 5 here; pairs give 0.
    rc, rr = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([-1.0, -2.0], dtype=torch.float64)
    with_c, _ = _trl_loss(rc, rr, center=1.0)
    without, _ = _trl_loss(rc, rr, center=None)
    assert (with_c - without).item() == pytest.approx(0.0, abs=ATOL)
    assert (bradley_terry_loss(rc, rr, center_coef=1.0) - bradley_terry_loss(rc, rr)).abs().max().item() < ATOL


# ---------------------------------------------------------------- attribute MSE / step BCE

def test_attribute_mse_formula_with_and_without_mask():
    pred, target = _rand(5, 4, seed=21), _rand(5, 4, seed=22) * 2 + 2
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    p, t, m = pred.tolist(), target.tolist(), mask.tolist()
    full = [sum((a - b) ** 2 for a, b in zip(pr, tr)) / 4 for pr, tr in zip(p, t)]
    masked = []
    for pr, tr, mr in zip(p, t, m):
        terms = [(a - b) ** 2 for a, b, keep in zip(pr, tr, mr) if keep]
        masked.append(sum(terms) / len(terms) if terms else 0.0)
    _close(attribute_mse_loss(pred, target), full)
    _close(attribute_mse_loss(pred, target, mask), masked)
    assert masked[3] == 0.0


def test_step_bce_formula_soft_labels_and_padded_steps():
    logits = _rand(4, 5, seed=31, scale=3.0)
    labels = torch.rand(4, 5, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    labels[0] = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # a row of hard labels
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    expected = []
    for lr, yr, mr in zip(logits.tolist(), labels.tolist(), mask.tolist()):
        terms = [-(y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x)) for x, y, keep in zip(lr, yr, mr) if keep]
        expected.append(sum(terms) / len(terms) if terms else 0.0)
    _close(step_bce_loss(logits, labels, mask), expected)


# ---------------------------------------------------------------- ensembles

def test_aggregate_modes_against_numpy():
    scores = _rand(5, 8, seed=41, scale=2.0)
    s = scores.numpy()
    assert AGGREGATES == ("mean", "min", "uwo")
    _close(aggregate(scores, "mean"), s.mean(0))
    _close(aggregate(scores, "min"), s.min(0))
    _close(aggregate(scores, "uwo", uwo_coef=0.7), s.mean(0) - 0.7 * s.var(0, ddof=0))
    _close(aggregate(scores, "uwo"), s.mean(0))  # lambda = 0 is the mean
    # and by hand with math, column by column
    cols = list(zip(*scores.tolist()))
    uwo = []
    for col in cols:
        mu = math.fsum(col) / len(col)
        uwo.append(mu - 0.7 * math.fsum((v - mu) ** 2 for v in col) / len(col))
    _close(aggregate(scores, "uwo", uwo_coef=0.7), uwo)
    _close(aggregate(scores, "min"), [min(col) for col in cols])


def test_aggregate_single_member():
    scores = _rand(1, 6, seed=42)
    mean = aggregate(scores, "mean")
    _close(mean, scores[0].tolist())
    _close(aggregate(scores, "min"), mean.tolist())
    _close(aggregate(scores, "uwo", uwo_coef=5.0), mean.tolist())
    assert not torch.isnan(aggregate(scores, "uwo", uwo_coef=5.0)).any()


@pytest.mark.parametrize("bad, kwargs, match", [
    (_rand(3, 4), {"mode": "median"}, "mean, min, uwo"),
    (_rand(4), {"mode": "mean"}, "2-D"),
    (_rand(2, 3, 4), {"mode": "min"}, "2-D"),
    (torch.zeros(0, 4), {"mode": "mean"}, "M == 0"),
    (_rand(3, 4), {"mode": "uwo", "uwo_coef": -0.1}, "uwo_coef"),
])
def test_aggregate_rejects(bad, kwargs, match):
    with pytest.raises(ValueError, match=match):
        aggregate(bad, **kwargs)


def test_preference_strength():
    chosen, rejected = _rand(4, 6, seed=51), _rand(4, 6, seed=52)
    mean, std = preference_strength(chosen, rejected)
    means, stds = [], []
    for j in range(6):
        d = [chosen[i, j].item() - rejected[i, j].item() for i in range(4)]
        mu = math.fsum(d) / 4
        means.append(mu)
        stds.append(math.sqrt(math.fsum((v - mu) ** 2 for v in d) / 4))
    _close(mean, means)
    _close(std, stds)
    m1, s1 = preference_strength(chosen[:1], rejected[:1])
    _close(m1, (chosen[0] - rejected[0]).tolist())
    _close(s1, [0.0] * 6)
    with pytest.raises(ValueError):
        preference_strength(chosen, rejected[:, :5])
    with pytest.raises(ValueError):
        preference_strength(chosen[0], rejected[0])


# ---------------------------------------------------------------- transforms

def test_log_sigmoid_transform_formula_and_extremes():
    r, ref = _rand(9, seed=61, scale=4.0), _rand(9, seed=62, scale=4.0)
    _close(log_sigmoid_transform(r, ref), [_log_sigmoid(a - b) for a, b in zip(r.tolist(), ref.tolist())])
    for dtype in (torch.float32, torch.float64):
        big = log_sigmoid_transform(torch.tensor([-1000.0, 1000.0, 0.0], dtype=dtype), torch.zeros(3, dtype=dtype))
        assert torch.isfinite(big).all()
        _close(big, [-1000.0, 0.0, -math.log(2)])
    # broadcasting: one reference per prompt against several samples per prompt
    r2, ref2 = _rand(3, 4, seed=63), _rand(3, 1, seed=64)
    _close(log_sigmoid_transform(r2, ref2),
           [[_log_sigmoid(a - rr[0]) for a in row] for row, rr in zip(r2.tolist(), ref2.tolist())])
    _close(log_sigmoid_transform(r, 0.5), [_log_sigmoid(a - 0.5) for a in r.tolist()])


def test_combine_transformed_is_sum_of_transforms():
    rs = [_rand(5, seed=70 + i, scale=3.0) for i in range(3)]
    refs = [_rand(5, seed=80 + i) for i in range(3)]
    expected = [sum(_log_sigmoid(rs[i][j].item() - refs[i][j].item()) for i in range(3)) for j in range(5)]
    _close(combine_transformed(rs, refs), expected)
    _close(combine_transformed(rs[:1], refs[:1]), [_log_sigmoid(a - b) for a, b in zip(rs[0].tolist(),
                                                                                        refs[0].tolist())])
    with pytest.raises(ValueError):
        combine_transformed(rs, refs[:2])


# ---------------------------------------------------------------- implicit PRM

def _step_rewards_ref(pol, ref, idx, beta):
    K = max((k for row in idx for k in row), default=-1) + 1
    out = [[0.0] * K for _ in idx]
    for b, (pr, rr, ir) in enumerate(zip(pol, ref, idx)):
        for p, q, k in zip(pr, rr, ir):
            if k >= 0:
                out[b][k] += beta * (p - q)
    return out


def test_implicit_step_rewards_formula():
    idx = torch.tensor([
        [-1, -1, 0, 0, 0, 1, 1, 2, 2, 2],      # prompt tokens, then 3 steps
        [-1, 0, 0, 1, 1, 1, 1, -1, -1, -1],    # 2 steps, then padding
        [-1, -1, -1, 0, 0, 0, 0, 0, 0, -1],    # 1 step
        [-1, -1, -1, -1, -1, -1, -1, -1, -1, -1],  # no step at all
    ])
    pol = -_rand(4, 10, seed=91).abs()
    ref = -_rand(4, 10, seed=92).abs()
    beta = 0.05
    got = step_rewards(pol, ref, idx, beta=beta)
    assert got.shape == (4, 3)
    _close(got, _step_rewards_ref(pol.tolist(), ref.tolist(), idx.tolist(), beta))
    assert got[1, 2].item() == 0.0 and (got[2, 1:] == 0).all() and (got[3] == 0).all()
    # the step rewards of a row add up to beta * log pi/pi_ref over its step tokens (the outcome reward)
    whole = [beta * math.fsum(p - q for p, q, k in zip(pr, rr, ir) if k >= 0)
             for pr, rr, ir in zip(pol.tolist(), ref.tolist(), idx.tolist())]
    _close(got.sum(-1), whole)
    expected_mask = [[True, True, True], [True, True, False], [True, False, False], [False, False, False]]
    assert step_mask(idx).tolist() == expected_mask
    assert step_mask(idx).dtype == torch.bool


def test_implicit_step_rewards_gap_and_empty():
    # a step index with a gap: step 1 absent in row 0 -> 0 and masked out
    idx = torch.tensor([[0, 0, 2, -1], [1, 1, 1, 0]])
    pol, ref = _rand(2, 4, seed=93), _rand(2, 4, seed=94)
    _close(step_rewards(pol, ref, idx, beta=1.0), _step_rewards_ref(pol.tolist(), ref.tolist(), idx.tolist(), 1.0))
    assert step_mask(idx).tolist() == [[True, False, True], [True, True, False]]
    none = torch.full((3, 5), -1)
    assert step_rewards(_rand(3, 5), _rand(3, 5), none, beta=0.1).shape == (3, 0)
    assert step_mask(none).shape == (3, 0)


def test_implicit_step_rewards_shape_errors():
    with pytest.raises(ValueError):
        step_rewards(_rand(2, 4), _rand(2, 5), torch.zeros(2, 4, dtype=torch.long), beta=0.1)
    with pytest.raises(ValueError):
        step_rewards(_rand(2, 4), _rand(2, 4), torch.zeros(2, 3, dtype=torch.long), beta=0.1)
    with pytest.raises(ValueError):
        step_rewards(_rand(8), _rand(8), torch.zeros(8, dtype=torch.long), beta=0.1)


def test_reward_model_weights_each_pair_loss():
    """data.weight_field on reward-model pairs: the loss is the mean over pairs of w_i * l_i (weight 1
    everywhere is the unweighted loss)."""
    from prefopt.objectives import get_objective
    from prefopt.objectives.base import ScoreOutput
    rm = get_objective("reward_model")(get_objective("reward_model").Params())
    rewards = torch.tensor([0.3, -0.2, 1.0, 1.5], dtype=torch.float64)        # (c0, r0), (c1, r1), row-major
    out = ScoreOutput(scores=rewards.reshape(4, 1, 1), mask=torch.ones(4, 1, dtype=torch.bool))
    batch = {"slot_mask": torch.ones(2, 2, dtype=torch.bool), "scores": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    per_pair = bradley_terry_loss(rewards[[0, 2]], rewards[[1, 3]])
    assert rm.loss(out, batch).loss.item() == pytest.approx(per_pair.mean().item(), abs=ATOL)
    weighted = rm.loss(out, {**batch, "weight": torch.tensor([2.0, 0.5])}).loss
    assert weighted.item() == pytest.approx(((per_pair * torch.tensor([2.0, 0.5], dtype=torch.float64)).mean()).item(),
                                            abs=ATOL)
    assert rm.loss(out, {**batch, "weight": torch.ones(2)}).loss.item() == pytest.approx(per_pair.mean().item(), abs=ATOL)
