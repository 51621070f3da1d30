"""Constrained RLHF math (Moskovitz et al. 2023): squashing, multiplier updates, mixed advantage."""
import json
import math

import pytest
import torch

from prefopt.rl.lagrange import (LagrangeMultipliers, combined_advantage,
                                            multiplier_objective, squash)

D = torch.float64


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- squash

def test_squash_values_per_kind():
    raw = torch.tensor([-2.0, 0.0, 1.5, -0.7, 0.0, 3.0], dtype=D)
    kinds = ["ge", "ge", "ge", "eq", "eq", "eq"]
    got = squash(raw, kinds)
    want = [sig(-2.0), 0.5, sig(1.5), math.tanh(-0.7), 0.0, math.tanh(3.0)]
    assert torch.allclose(got, torch.tensor(want, dtype=D), atol=1e-15, rtol=0)
    assert squash(raw[:2], "eq").tolist() == pytest.approx([math.tanh(-2.0), 0.0])


def test_squash_unknown_kind():
    with pytest.raises(ValueError, match=r"'le'.*\['eq', 'ge'\]"):
        squash(torch.zeros(2, dtype=D), ["ge", "le"])
    with pytest.raises(ValueError, match="2 constraint kinds for 3"):
        squash(torch.zeros(3, dtype=D), ["ge", "eq"])


def test_init_roundtrips_through_inverse_squash():
    m = LagrangeMultipliers(["ge", "eq", "ge", "eq"], init=[0.3, -0.4, 0.0, 1.0])
    v = m.values()
    assert v[:2] == pytest.approx([0.3, -0.4], abs=1e-12)
    assert 0.0 < v[2] < 1e-5 and 1 - 1e-5 < v[3] < 1.0     # clamped endpoints stay finite
    assert all(math.isfinite(x) for x in m.raw.tolist())
    assert LagrangeMultipliers(["ge", "eq"]).values() == pytest.approx([0.5, 0.0])
    with pytest.raises(ValueError, match="outside"):
        LagrangeMultipliers(["ge"], init=-0.1)


# ---------------------------------------------------------------- update direction

def test_ge_multiplier_direction():
    m = LagrangeMultipliers(["ge", "ge"], init=0.5)
    before = m.values()
    after = m.update(returns=[1.0, 0.0], thresholds=[0.5, 0.5])   # satisfied, violated
    assert after[0] < before[0] and after[1] > before[1]
    trace = [after] + [m.update(returns=[1.0, 0.0], thresholds=[0.5, 0.5]) for _ in range(100)]
    assert all(b[0] < a[0] and b[1] > a[1] for a, b in zip(trace, trace[1:]))   # monotone
    assert 0.0 < trace[-1][0] < 0.3 and 0.7 < trace[-1][1] < 1.0


def test_multiplier_objective_gradient_sign():
    raw = torch.zeros(2, dtype=D, requires_grad=True)
    multiplier_objective(raw, [2.0, 0.0], [1.0, 1.0], ["ge", "eq"]).backward()
    assert raw.grad.tolist() == pytest.approx([0.25 * 1.0, 1.0 * -1.0])
    with pytest.raises(ValueError, match="must both have shape"):
        multiplier_objective(raw, [1.0], [1.0, 1.0], ["ge", "eq"])


def test_eq_multiplier_changes_sign_as_return_crosses_threshold():
    m = LagrangeMultipliers(["eq"], init=0.0)
    theta = 0.5
    # J rises through theta: below for 10 iterations, then above for 30.
    trace = [m.update([J], [theta])[0] for J in [0.2] * 10 + [0.8] * 30]
    assert all(v > 0 for v in trace[:10])          # J < theta: multiplier pushes J up
    assert trace[-1] < 0                           # J > theta long enough: it turns negative
    first_neg = next(i for i, v in enumerate(trace) if v < 0)
    assert first_neg > 10                          # only after J crossed theta
    assert all(v < 0 for v in trace[first_neg:])
    # and back: J falls below theta again -> sign flips back to positive
    trace2 = [m.update([0.2], [theta])[0] for _ in range(60)]
    assert trace2[-1] > 0


# ---------------------------------------------------------------- exact SGD-with-momentum step

def hand_updates(raw, kinds, steps, lr, mom):
    """Analytic gradients (sigmoid' = s(1-s), tanh' = 1-t^2) and torch SGD momentum semantics."""
    raw, buf = list(raw), None
    for J, theta in steps:
        g = []
        for x, k, j, t in zip(raw, kinds, J, theta):
            if k == "ge":
                s = sig(x)
                g.append(s * (1 - s) * (j - t))
            else:
                th = math.tanh(x)
                g.append((1 - th * th) * (j - t))
        buf = g if buf is None else [mom * b + gi for b, gi in zip(buf, g)]
        raw = [x - lr * b for x, b in zip(raw, buf)]
    return raw


def test_update_matches_hand_computed_sgd_momentum():
    kinds = ["ge", "eq", "ge"]
    m = LagrangeMultipliers(kinds, init=[0.3, 0.2, 0.9], lr=0.1, momentum=0.1)
    raw0 = m.raw.detach().tolist()
    steps = [([0.7, 0.1, 0.4], [0.5, 0.3, 0.6]), ([0.2, 0.5, 0.9], [0.5, 0.3, 0.6]),
             ([1.3, -0.2, 0.6], [0.5, 0.3, 0.1])]
    for J, theta in steps:
        vals = m.update(J, theta)
    want = hand_updates(raw0, kinds, steps, lr=0.1, mom=0.1)
    assert m.raw.detach().tolist() == pytest.approx(want, abs=1e-12, rel=0)
    assert vals == pytest.approx([sig(want[0]), math.tanh(want[1]), sig(want[2])], abs=1e-12)


def test_max_grad_norm_clips_raw_gradient():
    m = LagrangeMultipliers(["eq", "eq"], init=0.0, lr=1.0, momentum=0.0, max_grad_norm=0.5)
    m.update([3.0, 4.0], [0.0, 0.0])                 # grad (3, 4), norm 5 -> (0.3, 0.4)
    assert m.raw.detach().tolist() == pytest.approx([-0.3, -0.4], abs=1e-6)


def test_pid_terms_match_formula():
    """lambda = squash(x - kp * e - kd * (e - e_prev)) with x the integral (gradient-step) state."""
    kinds = ["eq", "ge"]
    m = LagrangeMultipliers(kinds, init=[0.1, 0.4], lr=0.1, momentum=0.1, kp=0.3, kd=0.2)
    plain = LagrangeMultipliers(kinds, init=[0.1, 0.4], lr=0.1, momentum=0.1)
    assert m.values() == pytest.approx(plain.values(), abs=1e-15)     # no error seen yet
    theta = [6.0, 0.5]
    prev = [0.0, 0.0]
    for J in ([8.0, 0.2], [7.0, 0.6], [5.0, 0.5]):
        got = m.update(J, theta)
        plain.update(J, theta)
        assert m.raw.detach().tolist() == plain.raw.detach().tolist()   # integral state unchanged
        e = [j - t for j, t in zip(J, theta)]
        x = [r - 0.3 * ei - 0.2 * (ei - pi) for r, ei, pi in zip(plain.raw.detach().tolist(), e, prev)]
        assert got == pytest.approx([math.tanh(x[0]), sig(x[1])], abs=1e-12)
        prev = e


def test_proportional_term_reacts_in_the_update_direction():
    """An equality multiplier jumps down at once when J overshoots theta (and up when under)."""
    m = LagrangeMultipliers(["eq"], init=0.0, lr=1e-6, momentum=0.0, kp=0.5)
    assert m.update([9.0], [6.0])[0] < -0.5
    assert m.update([3.0], [6.0])[0] > 0.5


def test_pid_state_round_trips():
    m = LagrangeMultipliers(["eq"], init=0.0, kp=0.2, kd=0.1)
    m.update([7.0], [6.0])
    m.update([4.0], [6.0])
    other = LagrangeMultipliers(["eq"])
    other.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert other.values() == m.values()
    assert other.update([6.5], [6.0]) == m.update([6.5], [6.0])


# ---------------------------------------------------------------- combined advantage

def test_combined_advantage_matches_formula():
    g = torch.Generator().manual_seed(0)
    B, T, N = 3, 5, 2
    task = torch.randn(B, T, generator=g, dtype=D)
    comp = torch.randn(N, B, T, generator=g, dtype=D)
    lam = [0.3, -0.6]
    got = combined_advantage(task, comp, lam)
    want = (N - sum(lam)) * task + lam[0] * comp[0] + lam[1] * comp[1]
    assert got.shape == (B, T)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    got_t = combined_advantage(task, comp, torch.tensor(lam, dtype=D, requires_grad=True))
    assert torch.allclose(got_t, want, atol=1e-12, rtol=0) and not got_t.requires_grad


def test_combined_advantage_ge_keeps_task_weight_positive():
    task, comp = torch.ones(1, 1, dtype=D), torch.zeros(3, 1, 1, dtype=D)
    lam = squash(torch.tensor([5.0, 5.0, 5.0], dtype=D), ["ge"] * 3)   # each close to 1
    assert combined_advantage(task, comp, lam).item() > 0


def test_combined_advantage_shape_errors():
    task = torch.zeros(2, 4, dtype=D)
    with pytest.raises(ValueError, match="component_advantages has shape"):
        combined_advantage(task, torch.zeros(3, 2, 4, dtype=D), [0.5, 0.5])
    with pytest.raises(ValueError, match="component_advantages has shape"):
        combined_advantage(task, torch.zeros(2, 2, 5, dtype=D), [0.5, 0.5])
    with pytest.raises(ValueError, match="vector"):
        combined_advantage(task, torch.zeros(2, 2, 4, dtype=D), [[0.5, 0.5]])


# ---------------------------------------------------------------- resume exactness

def test_state_dict_resume_is_bit_identical():
    g = torch.Generator().manual_seed(1)
    kinds, N_steps, k = ["ge", "eq", "eq"], 12, 5
    J = (torch.rand(N_steps, 3, generator=g, dtype=D) * 2).tolist()
    theta = [0.9, 1.1, 0.4]

    full = LagrangeMultipliers(kinds, init=[0.4, 0.1, -0.2], lr=0.1, momentum=0.1)
    for j in J:
        full.update(j, theta)

    first = LagrangeMultipliers(kinds, init=[0.4, 0.1, -0.2], lr=0.1, momentum=0.1)
    for j in J[:k]:
        first.update(j, theta)
    sd = json.loads(json.dumps(first.state_dict()))
    assert sd["momentum_buffer"] is not None
    resumed = LagrangeMultipliers(["ge"], init=0.9, lr=0.5, momentum=0.9)   # overwritten by load
    resumed.load_state_dict(sd)
    assert resumed.kinds == kinds and resumed.lr == 0.1 and resumed.momentum == 0.1
    for j in J[k:]:
        resumed.update(j, theta)

    assert resumed.raw.detach().tolist() == full.raw.detach().tolist()       # bit-identical
    assert resumed.values() == full.values()
    assert resumed.state_dict() == full.state_dict()


def test_state_dict_before_any_update():
    m = LagrangeMultipliers(["eq"], init=0.25)
    sd = json.loads(json.dumps(m.state_dict()))
    assert sd["momentum_buffer"] is None
    fresh = LagrangeMultipliers(["eq"])
    fresh.load_state_dict(sd)
    assert fresh.update([1.0], [0.0]) == m.update([1.0], [0.0])
