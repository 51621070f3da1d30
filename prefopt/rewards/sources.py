"""Reward sources of the online loop, combined with weights.

``roles.reward.sources: [{fn: "mypkg.rewards:exact_match", weight: 1.0}, {model: path}, ...]``.

* A function is imported only from the module the recipe names (no plugin scanning) and is called
  as ``fn(prompt=..., response=..., row=...)`` with the prompt text, the decoded response and the
  prompt row's fields; it returns a float.
* A reward model (``model``) or an ensemble of them (``models``, one actor) scores the prompt row's
  own prompt (chat messages go through each model's chat template) and the decoded response
  (:mod:`prefopt.rewards.scorer`). Per sample, a multi-head model's heads are summed with
  ``attribute_weights``; an ensemble's members are combined by ``aggregate`` (mean, min, uwo;
  :func:`prefopt.rewards.ensemble.aggregate`); ``transform: log_sigmoid`` maps r to
  ``log sigma(r - r_ref)`` (:func:`prefopt.rewards.transforms.log_sigmoid_transform`), ``r_ref`` the
  constant ``reference_reward`` or, with ``reference_from: reference_samples``, per prompt the score of
  one sample of the initial (reference) policy, drawn and scored once before the first update;
  ``normalize`` standardises the source with its running mean and std (part of the checkpoint).
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


TRANSFORMS = (None, "log_sigmoid")


def model_paths(src) -> list[str]:
    """The reward models of a source: ``[model]`` or its ensemble's ``models``."""
    return [src.model] if src.model else list(src.models)


MODEL_ONLY = {"models": [], "aggregate": "mean", "uwo_coef": 0.0, "attribute_weights": {}, "transform": None,
              "reference_reward": 0.0, "reference_from": "constant", "normalize": False}
REFERENCE_FROM = ("constant", "reference_samples")


def _metadata(path: str) -> dict | None:
    """A reward model's serving metadata, or None when it cannot be read here (a path on a cluster)."""
    from prefopt.errors import PrefoptError
    from prefopt.rewards.scorer import reward_metadata
    try:
        return reward_metadata(path)
    except (OSError, ValueError, PrefoptError):
        return None


def check_model_source(i: int, src) -> None:
    """Ensemble, head weights and transform of a model source (heads read from each model's config.json)."""
    from prefopt.rewards.ensemble import AGGREGATES
    key = f"roles.reward.sources[{i}]"
    if src.aggregate not in AGGREGATES:
        raise ConfigError(f"{key}.aggregate must be one of {', '.join(AGGREGATES)} (got '{src.aggregate}')")
    if src.uwo_coef < 0:
        raise ConfigError(f"{key}.uwo_coef must be >= 0 (got {src.uwo_coef})")
    if src.transform not in TRANSFORMS:
        raise ConfigError(f"{key}.transform must be log_sigmoid or unset (got '{src.transform}')")
    if src.reference_from not in REFERENCE_FROM:
        raise ConfigError(f"{key}.reference_from must be one of {', '.join(REFERENCE_FROM)} (got '{src.reference_from}')")
    if src.reference_from != "constant" and src.transform != "log_sigmoid":
        raise ConfigError(f"{key}.reference_from: reference_samples sets r_ref of the log-sigmoid transform: "
                          f"set {key}.transform: log_sigmoid")
    if src.batch_tokens < 1:
        raise ConfigError(f"{key}.batch_tokens must be >= 1 (got {src.batch_tokens})")
    for j, path in enumerate(model_paths(src)):
        meta = _metadata(path)
        if meta is None:
            continue        # not readable here (a cluster path): the actor reports it
        what = f"{key}.{'models[%d]' % j if src.models else 'model'} ({path})"
        if meta["kind"] == "process":
            raise ConfigError(f"{what} is a process reward model (it scores steps): serve it as "
                              f"roles.reward.process.model")
        head_weights(meta["heads"], src.attribute_weights, what, f"{key}.attribute_weights")


def check_process_model(cfg) -> None:
    """A process reward model has one head, and is read at the steps' delimiter it was trained with."""
    if cfg.beta <= 0:
        raise ConfigError(f"roles.reward.process.beta must be > 0 (got {cfg.beta})")
    if cfg.batch_tokens < 1:
        raise ConfigError(f"roles.reward.process.batch_tokens must be >= 1 (got {cfg.batch_tokens})")
    meta = _metadata(cfg.model) if cfg.model and not cfg.reference else None
    if meta is None:
        return
    if len(meta["heads"]) != 1:
        raise ConfigError(f"roles.reward.process.model ({cfg.model}) has {len(meta['heads'])} heads "
                          f"({', '.join(meta['heads'])}); a process reward model has one")
    trained = meta.get("step_delimiter")
    if trained is not None and trained != cfg.delimiter:
        raise ConfigError(f"roles.reward.process.delimiter is {cfg.delimiter!r}, but {cfg.model} was trained with "
                          f"steps ending in {trained!r}: set roles.reward.process.delimiter: {trained!r}")


def head_weights(heads: list[str], weights: dict, what: str, key: str) -> list[float]:
    """The weight of each head: ``weights`` by name (absent heads: 0); a one-head model: 1."""
    if not weights:
        if len(heads) > 1:
            raise ConfigError(f"{what} has {len(heads)} heads ({', '.join(heads)}): set {key} to weigh them, "
                              f"e.g. {{{heads[0]}: 1.0}}")
        return [1.0]
    unknown = [name for name in weights if name not in heads]
    if unknown:
        raise ConfigError(f"{key} names {', '.join(unknown)}, but {what} has the heads {', '.join(heads)}")
    return [float(weights.get(name, 0.0)) for name in heads]


def check_sources(cfg: RewardRoleConfig) -> None:
    """Each source names exactly one of ``fn`` / ``model`` / ``models`` (checked before Ray starts)."""
    if not cfg.sources and cfg.process is None:
        raise ConfigError("roles.reward.sources is empty: name at least one reward source "
                          "(or process rewards in roles.reward.process)")
    if cfg.process is not None:
        if bool(cfg.process.fn) == bool(cfg.process.model):
            raise ConfigError("roles.reward.process needs exactly one of 'fn' (a 'package.module:function') "
                              "or 'model' (a process reward model; with 'reference': an implicit PRM)")
        if cfg.process.reference and not cfg.process.model:
            raise ConfigError("roles.reward.process.reference makes 'model' an implicit PRM: set "
                              "roles.reward.process.model to its causal LM")
        if cfg.process.fn:
            import_reward_fn(cfg.process.fn)
        if not cfg.process.delimiter:
            raise ConfigError("roles.reward.process.delimiter must be a non-empty string")
        check_process_model(cfg.process)
    for i, src in enumerate(cfg.sources):
        if sum(map(bool, (src.fn, src.model, src.models))) != 1:
            raise ConfigError(f"roles.reward.sources[{i}] needs exactly one of 'fn' (a 'package.module:function'), "
                              f"'model' (a reward model checkpoint) or 'models' (an ensemble of them)")
        if src.fn:
            import_reward_fn(src.fn)   # a typo fails here, before any actor starts
            for name, default in MODEL_ONLY.items():
                if getattr(src, name) != default:
                    raise ConfigError(f"roles.reward.sources[{i}].{name} applies to reward models, not to a "
                                      f"function source ('fn')")
        else:
            check_model_source(i, src)
    names = [source_name(i, src) for i, src in enumerate(cfg.sources)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"roles.reward.sources: the name(s) {', '.join(twice)} label more than one source; "
                          f"give each source its own 'name'")


class NonFiniteReward(ValueError):
    """A reward source returned NaN/Inf: the loop skips the iteration's update (``loops.guards``)."""

    def __init__(self, source: str, samples: list[int], value: float):
        super().__init__(f"reward '{source}' returned {value} for {len(samples)} sample(s), first: sample {samples[0]}")
        self.source, self.samples = source, samples


def row_prompts(prompts: list[str], rows: list[dict], field: str) -> list:
    """What a reward model reads as each sample's prompt: the prompt row's own ``field`` (text or chat
    messages, rendered by the model's chat template), else the prompt text."""
    return [row.get(field, p) if isinstance(row, dict) else p for p, row in zip(prompts, rows)]


def source_name(index: int, src) -> str:
    """A source's label in metrics: its ``name``, else the function's name, else ``model<i>``."""
    return src.name or (src.fn.rpartition(":")[2] if src.fn else f"model{index}")


class ModelSource:
    """Turns one model source's ``[M][N][H]`` scores into one reward per sample (see the module docstring)."""

    def __init__(self, src, heads: list[list[str]], key: str):
        from prefopt.rl.signals import RewardNormalizer
        self.src = src
        self.weights = [head_weights(h, src.attribute_weights, f"{key} member {m}", f"{key}.attribute_weights")
                        for m, h in enumerate(heads)]
        self.normalizer = RewardNormalizer() if src.normalize else None
        self.reference_by_prompt: dict[str, float] = {}     # reference_from: reference_samples

    @property
    def uses_reference_samples(self) -> bool:
        return self.src.transform == "log_sigmoid" and self.src.reference_from == "reference_samples"

    def combine(self, scores: list[list[list[float]]]):
        """``[M][N][H]`` -> ``[N]``: heads weighted, then members aggregated."""
        import torch

        from prefopt.rewards.ensemble import aggregate
        per_member = torch.stack([torch.tensor(s, dtype=torch.float64).reshape(len(s), -1)
                                  @ torch.tensor(w, dtype=torch.float64) for s, w in zip(scores, self.weights)])
        return aggregate(per_member, self.src.aggregate, uwo_coef=self.src.uwo_coef)

    def set_references(self, scores: list[list[list[float]]], prompts: list[str]) -> None:
        """r_ref of each prompt: the combined score of a reference-policy sample for it."""
        self.reference_by_prompt.update(zip(prompts, self.combine(scores).tolist()))

    def __call__(self, scores: list[list[list[float]]], prompts: list[str]) -> list[float]:
        import torch

        from prefopt.rewards.transforms import log_sigmoid_transform
        rewards = self.combine(scores)
        if self.src.transform == "log_sigmoid":
            if self.uses_reference_samples:
                reference = torch.tensor([self.reference_by_prompt[p] for p in prompts], dtype=torch.float64)
            else:
                reference = torch.tensor(self.src.reference_reward, dtype=torch.float64)
            rewards = log_sigmoid_transform(rewards, reference)
        values = rewards.tolist()
        if self.normalizer is not None and all(map(math.isfinite, values)):
            self.normalizer.update(values)
            values = [self.normalizer(v) for v in values]
        return values


class SequenceRewards:
    """The weighted sum of the recipe's reward sources, per sample, with each component kept.

    Sources with a ``constraint`` (objective ``constrained_ppo``) are left out of the sum: they are
    only reported as components (their multipliers weigh them, see ``loops/constrained.py``).

    Function sources run here; model sources are scored by ``RewardModelWorker`` actors, which the
    caller creates (``model_actors``: source index -> actor handle). A reward model reads the prompt
    row's ``prompt_field`` (text or chat messages), else the prompt text.
    """

    def __init__(self, cfg: RewardRoleConfig, model_actors: dict | None = None, timeout_s: float = 1800.0,
                 prompt_field: str = "prompt"):
        from prefopt.rewards.scorer import reward_metadata
        check_sources(cfg)
        self.sources, self.models = [], {}
        for i, src in enumerate(cfg.sources):
            name = source_name(i, src)
            if src.fn:
                fn, actor = import_reward_fn(src.fn), None
            else:
                fn, actor = None, (model_actors or {})[i]
                heads = [reward_metadata(p)["heads"] for p in model_paths(src)]
                self.models[name] = ModelSource(src, heads, f"roles.reward.sources[{i}]")
            self.sources.append((name, fn, actor, 0.0 if src.constraint else float(src.weight)))
        self.timeout_s, self.prompt_field = timeout_s, prompt_field

    optional_state = True     # checkpoints without it (no model source with state) still load

    def state_dict(self) -> dict:
        """Per model source: its running statistics (``normalize``) and its reference rewards per prompt."""
        return {name: {"normalizer": m.normalizer.state_dict() if m.normalizer is not None else None,
                       "reference_by_prompt": dict(m.reference_by_prompt)} for name, m in self.models.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, s in state.items():
            source = self.models.get(name)
            if source is None or (s["normalizer"] is not None) != (source.normalizer is not None):
                raise ConfigError(f"the checkpoint holds the state of reward source '{name}', which the recipe "
                                  f"does not have (or no longer normalises): roles.reward.sources")
            if source.normalizer is not None:
                source.normalizer.load_state_dict(s["normalizer"])
            source.reference_by_prompt = dict(s["reference_by_prompt"])

    def needs_reference_samples(self) -> bool:
        return any(m.uses_reference_samples for m in self.models.values())

    def score_references(self, prompts: list[str], responses: list[str], rows: list[dict]) -> None:
        """Score one reference-policy sample per prompt for the sources that take r_ref from them."""
        from prefopt.cluster import remote_get
        structured = row_prompts(prompts, rows, self.prompt_field)
        for name, fn, actor, _ in self.sources:
            if name in self.models and self.models[name].uses_reference_samples:
                scores = remote_get(actor.score.remote(structured, responses), self.timeout_s, f"reward model '{name}'")
                self.models[name].set_references(scores, prompts)

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict]):
        from prefopt.cluster import remote_get
        totals = [0.0] * len(responses)
        components: dict[str, list[float]] = {}
        structured = row_prompts(prompts, rows, self.prompt_field)
        pending = {name: actor.score.remote(structured, responses)
                   for name, fn, actor, _ in self.sources if actor is not None}
        for name, fn, actor, weight in self.sources:
            if fn is not None:
                values = [float(fn(prompt=p, response=r, row=row)) for p, r, row in zip(prompts, responses, rows)]
            else:
                values = self.models[name](remote_get(pending[name], self.timeout_s, f"reward model '{name}'"), prompts)
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
