"""Constrained RLHF math: Lagrange multipliers over component rewards (pure tensors, no model).

Moskovitz et al. 2023, "Confronting Reward Model Overoptimization with Constrained RLHF"
(arXiv 2310.04373; public code tedmoskovitz/ConstrainedRL4LMs, rl4lms/algorithms/constrained_ppo).

Component reward model i has expected return J_i and a threshold ("proxy point") theta_i. Each
component has an unconstrained parameter x_i squashed into its multiplier lambda_i:

* ``"ge"`` (mu-PPO, inequality J_i >= theta_i):  lambda_i = sigmoid(x_i) in (0, 1)
* ``"eq"`` (xi-PPO, equality  J_i  = theta_i):   lambda_i = tanh(x_i)    in (-1, 1)

Multiplier update: one gradient-descent step (SGD with momentum; lr 0.1, momentum 0.1 in the
public code) on  L(x) = sum_i lambda_i * (J_i - theta_i)  with J_i held fixed, so
dL/dx_i = squash'(x_i) * (J_i - theta_i) (squash' > 0). A satisfied inequality (J_i > theta_i)
drives lambda_i down, a violated one up; an equality multiplier falls while J_i > theta_i and
rises while J_i < theta_i, so it changes sign as J_i crosses theta_i.

Optional PID terms (Stooke, Achiam & Abbeel 2020, "Responsive Safety in Reinforcement Learning by
PID Lagrangian Methods", ICML): the gradient step above is an *integral* controller on the error
e_i = J_i - theta_i, which oscillates when the policy answers with a lag. With gains ``kp`` / ``kd``
the multiplier used by the policy is

    lambda_i = squash(x_i - kp * e_i - kd * (e_i - e_i_prev))

with e_i the latest batch's error (0 before the first update): the proportional term reacts to the
current gap at once, the derivative term damps a fast-moving return. kp = kd = 0 is the paper's
(and public code's) plain update.

Policy advantage (the policy maximises the Lagrangian with the multipliers held fixed):

    A = (N - sum_i lambda_i) * A_task + sum_i lambda_i * A_i

where A_task is the (KL-regularised) task advantage. With "ge" multipliers in (0, 1) the task
weight N - sum_i lambda_i stays positive (in (0, N)); with "eq" multipliers it lies in (0, 2N).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

_SQUASH = {"ge": torch.sigmoid, "eq": torch.tanh}
_EPS = 1e-6     # initial multipliers are clamped this far inside the open range, so x is finite


def _check_kinds(kinds: Sequence[str], n: int) -> list[str]:
    kinds = [kinds] * n if isinstance(kinds, str) else list(kinds)
    for k in kinds:
        if k not in _SQUASH:
            raise ValueError(f"unknown constraint kind {k!r}; valid kinds: {sorted(_SQUASH)}")
    if len(kinds) != n:
        raise ValueError(f"{len(kinds)} constraint kinds for {n} multipliers")
    return kinds


def squash(raw: torch.Tensor, kinds: Sequence[str]) -> torch.Tensor:
    """Multipliers from their unconstrained parameters ``raw`` [N]: sigmoid ("ge") / tanh ("eq")."""
    kinds = _check_kinds(kinds, raw.shape[0])
    is_eq = torch.tensor([k == "eq" for k in kinds], device=raw.device)
    return torch.where(is_eq, torch.tanh(raw), torch.sigmoid(raw))


def _unsquash(value: float, kind: str) -> float:
    """Inverse of :func:`squash` for one initial multiplier (logit / atanh, kept finite)."""
    lo = 0.0 if kind == "ge" else -1.0
    if not lo <= value <= 1.0:
        raise ValueError(f"initial {kind!r} multiplier {value} outside [{lo}, 1]")
    v = torch.tensor(min(max(value, lo + _EPS), 1.0 - _EPS), dtype=torch.float64)
    return float(torch.logit(v) if kind == "ge" else torch.atanh(v))


def multiplier_objective(raw: torch.Tensor, returns, thresholds,
                         kinds: Sequence[str]) -> torch.Tensor:
    """sum_i squash(raw)_i * (J_i - theta_i); descent on it w.r.t. ``raw`` is the update."""
    lam = squash(raw, kinds)
    J = torch.as_tensor(returns, dtype=raw.dtype, device=raw.device).detach()
    theta = torch.as_tensor(thresholds, dtype=raw.dtype, device=raw.device).detach()
    if J.shape != lam.shape or theta.shape != lam.shape:
        raise ValueError(f"returns {tuple(J.shape)} and thresholds {tuple(theta.shape)} "
                         f"must both have shape {tuple(lam.shape)}")
    return (lam * (J - theta)).sum()


class LagrangeMultipliers:
    """N multipliers, their float64 raw parameters and an SGD-with-momentum optimiser.

    ``init``: initial multiplier value(s) (one per component or one for all); default 0.5 for
    "ge" and 0.0 for "eq" (the public code draws raw ~ N(0, 0.01), i.e. about these values).
    ``max_grad_norm``: optional clip of the raw gradient's norm (the public code clips at 0.5).
    ``kp`` / ``kd``: proportional / derivative gains of the PID form (module docstring); 0 = off.
    """

    def __init__(self, kinds: Sequence[str], init: Union[None, float, Sequence[float]] = None,
                 lr: float = 0.1, momentum: float = 0.1, max_grad_norm: Optional[float] = None,
                 kp: float = 0.0, kd: float = 0.0):
        n = 1 if isinstance(kinds, str) else len(kinds)
        self.kinds = _check_kinds(kinds, n)
        if init is None:
            init = [0.5 if k == "ge" else 0.0 for k in self.kinds]
        elif isinstance(init, (int, float)):
            init = [float(init)] * n
        if len(init) != n:
            raise ValueError(f"{len(init)} initial multipliers for {n} constraints")
        raw = [_unsquash(float(v), k) for v, k in zip(init, self.kinds)]
        self.raw = torch.tensor(raw, dtype=torch.float64, requires_grad=True)
        self.lr, self.momentum, self.max_grad_norm = float(lr), float(momentum), max_grad_norm
        self._opt = torch.optim.SGD([self.raw], lr=self.lr, momentum=self.momentum)
        self.kp, self.kd = float(kp), float(kd)
        self.error = [0.0] * n          # latest J_i - theta_i, and the one before (PID terms)
        self.prev_error = [0.0] * n

    def values(self) -> list[float]:
        """The multipliers the policy uses: squash of the integral state plus the PID terms."""
        with torch.no_grad():
            e = torch.tensor(self.error, dtype=torch.float64)
            de = e - torch.tensor(self.prev_error, dtype=torch.float64)
            return squash(self.raw - self.kp * e - self.kd * de, self.kinds).tolist()

    def update(self, returns: Sequence[float], thresholds: Sequence[float]) -> list[float]:
        """One descent step on :func:`multiplier_objective`; returns the new multipliers."""
        self._opt.zero_grad()
        multiplier_objective(self.raw, returns, thresholds, self.kinds).backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([self.raw], self.max_grad_norm)
        self._opt.step()
        self.prev_error = self.error
        self.error = [float(j) - float(t) for j, t in zip(returns, thresholds)]
        return self.values()

    def state_dict(self) -> dict:
        buf = self._opt.state.get(self.raw, {}).get("momentum_buffer")
        return {"kinds": list(self.kinds), "raw": self.raw.detach().tolist(), "lr": self.lr,
                "momentum": self.momentum, "max_grad_norm": self.max_grad_norm,
                "momentum_buffer": None if buf is None else buf.tolist(),
                "kp": self.kp, "kd": self.kd, "error": list(self.error), "prev_error": list(self.prev_error)}

    def load_state_dict(self, d: dict) -> None:
        if len(d["raw"]) != len(d["kinds"]):
            raise ValueError("state_dict: 'raw' and 'kinds' differ in length")
        self.kinds = _check_kinds(d["kinds"], len(d["raw"]))
        self.raw = torch.tensor(d["raw"], dtype=torch.float64, requires_grad=True)
        self.lr, self.momentum = float(d["lr"]), float(d["momentum"])
        self.max_grad_norm = d.get("max_grad_norm")
        n = len(d["raw"])
        self.kp, self.kd = float(d.get("kp", 0.0)), float(d.get("kd", 0.0))
        self.error = list(d.get("error", [0.0] * n))
        self.prev_error = list(d.get("prev_error", [0.0] * n))
        self._opt = torch.optim.SGD([self.raw], lr=self.lr, momentum=self.momentum)
        if d.get("momentum_buffer") is not None:
            self._opt.state[self.raw]["momentum_buffer"] = torch.tensor(d["momentum_buffer"],
                                                                        dtype=torch.float64)


def combined_advantage(task_advantages: torch.Tensor, component_advantages: torch.Tensor,
                       multipliers) -> torch.Tensor:
    """A = (N - sum_i lambda_i) * A_task + sum_i lambda_i * A_i.

    Shapes: task [B, T] (any shape S works), components [N, B, T] ([N, *S]), multipliers [N].

    The multipliers are constants here (detached): the policy step does not move them.
    """
    lam = torch.as_tensor(multipliers, dtype=task_advantages.dtype,
                          device=task_advantages.device).detach()
    if lam.dim() != 1:
        raise ValueError(f"multipliers must be a vector [N], got shape {tuple(lam.shape)}")
    n = lam.shape[0]
    if component_advantages.shape != (n, *task_advantages.shape):
        raise ValueError(f"component_advantages has shape {tuple(component_advantages.shape)}, "
                         f"expected [N, *task_advantages.shape] = {(n, *task_advantages.shape)}")
    lam_b = lam.view(n, *([1] * task_advantages.dim()))
    return (n - lam.sum()) * task_advantages + (lam_b * component_advantages).sum(dim=0)
