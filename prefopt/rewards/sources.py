"""Reward sources of the online loop: Python functions named in the recipe, combined with weights.

``roles.reward.sources: [{fn: "mypkg.rewards:exact_match", weight: 1.0}, ...]``. A function is
imported only from the module the recipe names (no plugin scanning) and is called as
``fn(prompt=..., response=..., row=...)`` with the prompt text, the decoded response and the prompt
row's fields; it returns a float.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable

from prefopt.config_schema import RewardRoleConfig
from prefopt.errors import ConfigError


def import_reward_fn(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (ConfigError naming what is missing)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward fn '{spec}' must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward fn '{spec}': cannot import module '{module_name}': {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward fn '{spec}': module '{module_name}' has no function '{attr}'")
    return fn


def check_sources(cfg: RewardRoleConfig) -> None:
    """Each source names exactly one of ``fn`` / ``model`` (checked before Ray starts)."""
    if not cfg.sources and cfg.process is None:
        raise ConfigError("roles.reward.sources is empty: name at least one reward source "
                          "(or process rewards in roles.reward.process)")
    if cfg.process is not None:
        if bool(cfg.process.fn) == bool(cfg.process.model):
            raise ConfigError("roles.reward.process needs exactly one of 'fn' (a 'package.module:function') "
                              "or 'model' (a sequence-classification process reward model)")
        if cfg.process.fn:
            import_reward_fn(cfg.process.fn)
        if not cfg.process.delimiter:
            raise ConfigError("roles.reward.process.delimiter must be a non-empty string")
    for i, src in enumerate(cfg.sources):
        if bool(src.fn) == bool(src.model):
            raise ConfigError(f"roles.reward.sources[{i}] needs exactly one of 'fn' (a 'package.module:function') "
                              f"or 'model' (a sequence-classification checkpoint)")
        if src.fn:
            import_reward_fn(src.fn)   # a typo fails here, before any actor starts


class NonFiniteReward(ValueError):
    """A reward source returned NaN/Inf: the loop skips the iteration's update (``loops.guards``)."""

    def __init__(self, source: str, samples: list[int], value: float):
        super().__init__(f"reward '{source}' returned {value} for {len(samples)} sample(s), first: sample {samples[0]}")
        self.source, self.samples = source, samples


def source_name(index: int, src) -> str:
    """A source's label in metrics: its ``name``, else the function's name, else ``model<i>``."""
    return src.name or (src.fn.rpartition(":")[2] if src.fn else f"model{index}")


class SequenceRewards:
    """The weighted sum of the recipe's reward sources, per sample, with each component kept.

    Sources with a ``constraint`` (objective ``constrained_ppo``) are left out of the sum: they are
    only reported as components (their multipliers weigh them, see ``loops/constrained.py``).

    Function sources run here; model sources are scored by ``RewardModelWorker`` actors, which the
    caller creates (``model_actors``: source index -> actor handle).
    """

    def __init__(self, cfg: RewardRoleConfig, model_actors: dict | None = None, timeout_s: float = 1800.0):
        check_sources(cfg)
        self.sources = []
        for i, src in enumerate(cfg.sources):
            if src.fn:
                fn, actor = import_reward_fn(src.fn), None
            else:
                fn, actor = None, (model_actors or {})[i]
            name = source_name(i, src)
            self.sources.append((name, fn, actor, 0.0 if src.constraint else float(src.weight)))
        self.timeout_s = timeout_s

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict]):
        from prefopt.cluster import remote_get
        totals = [0.0] * len(responses)
        components: dict[str, list[float]] = {}
        pending = {name: actor.score.remote([p + r for p, r in zip(prompts, responses)])
                   for name, fn, actor, _ in self.sources if actor is not None}
        for name, fn, actor, weight in self.sources:
            if fn is not None:
                values = [float(fn(prompt=p, response=r, row=row)) for p, r, row in zip(prompts, responses, rows)]
            else:
                values = remote_get(pending[name], self.timeout_s, f"reward model '{name}'")
            bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
            if bad:
                raise NonFiniteReward(name, bad, values[bad[0]])
            for i, v in enumerate(values):
                totals[i] += weight * v
            components[name] = values
        return totals, components


PROBE_RESPONSE = "A short sample response."


def _where(fn) -> str:
    import inspect
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (TypeError, OSError):
        return getattr(fn, "__module__", "?")


def _probe(key: str, spec: str, fn, prompt: dict, **kwargs):
    """Call ``fn`` once on the first prompt row; a raise becomes a ConfigError naming its source."""
    try:
        return fn(prompt=prompt["prompt_text"], row=prompt["row"], **kwargs)
    except Exception as e:
        raise ConfigError(f"{key} '{spec}' ({_where(fn)}) raised {type(e).__name__}: {e} when called on the "
                          f"first prompt row with a sample response") from None


def _check_number(key: str, spec: str, fn, value) -> None:
    from numbers import Real
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{key} '{spec}' ({_where(fn)}) must return a float, but returned "
                          f"{type(value).__name__} ({str(value)[:80]}) on the first prompt row")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{key} '{spec}' ({_where(fn)}) returned {value} on the first prompt row")


def probe_rewards(recipe, prompt: dict) -> None:
    """Before Ray starts: import every reward function of ``recipe`` and call it once on ``prompt`` (the
    first prompt row) with a short sample response; each must return a finite float (a process
    reward function: one float per step). Errors name the recipe key, the function and its file."""
    cfg = recipe.roles.reward
    for i, src in enumerate(cfg.sources):
        if src.fn:
            fn = import_reward_fn(src.fn)
            key = f"roles.reward.sources[{i}].fn"
            _check_number(key, src.fn, fn, _probe(key, src.fn, fn, prompt, response=PROBE_RESPONSE))
    if cfg.process is not None and cfg.process.fn:
        fn, key = import_reward_fn(cfg.process.fn), "roles.reward.process.fn"
        steps = [PROBE_RESPONSE, PROBE_RESPONSE]
        values = _probe(key, cfg.process.fn, fn, prompt, steps=steps)
        if not isinstance(values, (list, tuple)) or len(values) != len(steps):
            raise ConfigError(f"{key} '{cfg.process.fn}' ({_where(fn)}) must return one float per step, but "
                              f"returned {str(values)[:80]} for {len(steps)} steps on the first prompt row")
        for v in values:
            _check_number(key, cfg.process.fn, fn, v)
    nm = getattr(recipe.objective, "nelder_mead", None)
    if nm is not None and nm.eval_fn:
        fn, key = import_reward_fn(nm.eval_fn), "objective.nelder_mead.eval_fn"
        _check_number(key, nm.eval_fn, fn, _probe(key, nm.eval_fn, fn, prompt, response=PROBE_RESPONSE))
