"""prefopt's AdamW for fp32 ZeRO-0: one gradient norm for the NaN/Inf check, the skip bound and clipping."""
import math

import torch

from prefopt.backends.deepspeed_engine import guarded_adamw, total_grad_norm


def _params(seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))]
    for p in params:
        p.grad = scale * torch.randn(p.shape, generator=g, dtype=torch.float64)
    return params


def test_total_grad_norm_is_the_global_l2_norm():
    params = _params(0)
    want = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
    assert abs(total_grad_norm([p.grad for p in params]) - want) < 1e-12


def test_clipping_equals_clip_grad_norm_then_adamw():
    ours, ref = _params(1, scale=10.0), _params(1, scale=10.0)
    opt = guarded_adamw()(ours, lr=0.1)
    opt.clip_norm = 1.0
    opt.norm_hint = total_grad_norm([p.grad for p in ours])
    opt.step()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.optim.AdamW(ref, lr=0.1).step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not opt.overflow


def test_small_gradients_are_not_scaled_and_nan_skips_the_step():
    params = _params(2, scale=1e-3)
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    opt = guarded_adamw()(params, lr=0.1)
    opt.clip_norm = 1.0
    opt.step()                                   # no hint: the optimizer computes the norm itself
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)            # norm below the bound: gradients untouched
    stepped = [p.detach().clone() for p in params]
    assert any(not torch.equal(a, b) for a, b in zip(before, stepped))
    params[0].grad[0, 0] = float("nan")
    opt.step()
    assert opt.overflow
    for p, s in zip(params, stepped):
        assert torch.equal(p.detach(), s)        # skipped: parameters unchanged
