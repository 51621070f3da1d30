"""Generic recipe checks used by :mod:`prefopt.config`.

* keys: ``roles.reward.sources[0].weight`` <-> ``("roles", "reward", "sources", 0, "weight")``;
  :func:`origin_of` finds the layer (file or ``override``) that set a key, so a value error names
  where the value came from;
* :func:`schema_default`: a key's schema default (an override indexing a list that no layer set,
  ``train.adam_betas.0=0.8``, updates the default list);
* :func:`check_shapes`: before typing, a layer's sections are mappings, lists are lists (or an
  override's ``{index: value}``), scalars are not containers, ``ray.env`` values are strings;
* :func:`first_non_finite`: the first NaN/Inf in a typed layer (``'nan'`` in an override is text
  until typed);
* :func:`check_values`: a walk over a typed recipe (dataclasses, lists, dicts, the objective's
  Params): every value has its field's type, floats are finite, ``*timeout*`` fields are > 0, and
  the ranges in :data:`RULES` hold. It also covers a Recipe built in code.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from typing import Any, Callable, Iterable

from prefopt.errors import ConfigError

Parts = tuple  # str field names / mapping keys and int list indices

_KEY = re.compile(r"[^.\[\]=\s][^.\[\]=]*(\[\d+\])*(\.[^.\[\]=]+(\[\d+\])*)*")
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def format_key(parts: Iterable) -> str:
    """``("roles", "reward", "sources", 0, "weight")`` -> ``roles.reward.sources[0].weight``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def parse_key(key: str) -> Parts:
    """``a.b[0].c`` or ``a.b.0.c`` -> ``("a", "b", 0, "c")``; ConfigError for a malformed key."""
    if not _KEY.fullmatch(key):
        raise ConfigError(f"'{key}' is not a valid key (dotted names, list indices as '.0' or '[0]')")
    return tuple(int(i) if i else (int(n) if n.isdigit() else n) for n, i in _PART.findall(key))


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


@functools.lru_cache(maxsize=None)
def hints(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _instance(tp: Any) -> Any:
    try:
        return tp()
    except Exception:   # a dataclass without defaults: no default value to offer
        return None


def is_index_map(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, int) for k in value)


def _deferred(value: Any) -> bool:
    """'???' (missing) and '${...}' (interpolation) strings: OmegaConf resolves or reports them."""
    return isinstance(value, str) and (value == "???" or "${" in value)


# ----------------------------------------------------------------------------- layers

def schema_default(schema: type, parts: Parts) -> Any:
    """The schema default at ``parts`` (an unset optional section counts as that section's
    defaults, an absent list element as its item type's defaults); None where there is none."""
    tp, value = schema, _instance(schema)
    for part in parts:
        if dataclasses.is_dataclass(tp) and isinstance(part, str) and part in hints(tp):
            tp = unwrap_optional(hints(tp)[part])[0]
            value = getattr(value, part, None)
        elif typing.get_origin(tp) is list and isinstance(part, int):
            tp = (typing.get_args(tp) or (Any,))[0]
            value = value[part] if isinstance(value, list) and 0 <= part < len(value) else None
        else:
            return None
        if value is None and dataclasses.is_dataclass(tp):
            value = _instance(tp)
    return value


def layer_sets(data: Any, parts: Parts) -> bool:
    """Whether a layer (a plain dict from YAML or overrides) sets the key ``parts``."""
    node = data
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    return True


def origin_of(layers: list[tuple[str, dict]], key: str) -> str | None:
    """The origin of the last layer that sets ``key`` (or a section holding it)."""
    try:
        parts = parse_key(key)
    except ConfigError:
        return None
    for origin, data in reversed(layers):
        if layer_sets(data, parts):
            return origin
    return None


def env_problem(name: Any, value: Any, override: bool = False) -> str | None:
    """Why ``ray.env.<name>: value`` is not a usable environment variable (None if it is)."""
    if not isinstance(name, str) or not name.strip() or "=" in name or "\0" in name:
        return "is not a valid environment variable name (a non-empty name without '=')"
    if isinstance(value, str):
        return "must not contain a NUL character" if "\0" in value else None
    if isinstance(value, (bool, int, float)):
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if override:
            return (f"must be a string, got {type(value).__name__} {value!r}: set it as `ray.env.{name}={text}` "
                    f"(the text is kept) or quote it, `ray.env={{{name}: '{text}'}}`")
        return (f"must be a string, got {type(value).__name__} {value!r}: quote it in YAML, "
                f"e.g. `ray.env.{name}: '{text}'`")
    if value is None:
        return "must be a string, got null (quote it: '' for an empty value)"
    kind = "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__
    return f"must be a string (environment variables are text), got {kind}: {value!r}"


def first_non_finite(data: Any, prefix: Parts = ()) -> tuple[Parts, float] | None:
    """The key and value of the first NaN/Inf float in nested dicts/lists (e.g. a typed layer:
    an objective's Params check their ranges when built and would report NaN as out of range)."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        if isinstance(v, float) and not math.isfinite(v):
            return (*prefix, k), v
        found = first_non_finite(v, (*prefix, k))
        if found:
            return found
    return None


def _kind(tp: Any) -> str | None:
    """What a scalar field holds, in words (None for non-scalars)."""
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp)


def _overflows(tp: Any, value: Any) -> bool:
    """An integer too large for a float field (OmegaConf's conversion would raise OverflowError)."""
    return tp is float and isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2 ** 1023


def check_shapes(data: Any, schema: type, origin: str, prefix: Parts = ()) -> None:
    """Raise ConfigError (naming ``origin`` and the key) where a layer's value has the wrong kind of
    container for ``schema``: mappings for sections and dicts, lists (or an override's
    ``{index: value}``) for lists, no containers for scalars; ``ray.env`` values must be strings.
    Unknown keys are left to ``check_keys``; scalar types and nulls to typing."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(schema):
        return
    for k, v in data.items():
        if k not in hints(schema) or v is None or _deferred(v):
            continue
        parts = (*prefix, k)
        key = format_key(parts)
        tp = unwrap_optional(hints(schema)[k])[0]

        def fail(message: str, key: str = key) -> None:
            raise ConfigError(f"{origin}: '{key}' {message}")

        if is_index_map(v) and typing.get_origin(tp) is not list:
            i = next(iter(v))
            fail(f"is not a list, so '{key}.{i}' cannot index it", key)
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                fail(f"must be a mapping of {tp.__name__} keys ({', '.join(hints(tp))}), got {v!r}")
            check_shapes(v, tp, origin, parts)
        elif typing.get_origin(tp) is list:
            if isinstance(v, dict):
                bad = next((i for i in v if not isinstance(i, int)), None)
                if bad is not None or not v:
                    fail(f"is a list: give a list, or index an entry with a number (e.g. '{key}.0'), "
                         f"not a mapping (key {bad!r})")
                items = list(v.items())
            elif isinstance(v, list):
                items = list(enumerate(v))
            else:
                fail(f"must be a list, got {v!r}")
            item_tp = unwrap_optional((typing.get_args(tp) or (Any,))[0])[0]
            for i, item in items:
                if dataclasses.is_dataclass(item_tp) and item is not None:
                    if not isinstance(item, dict):
                        fail(f"must be a mapping of {item_tp.__name__} keys, got {item!r}", format_key((*parts, i)))
                    check_shapes(item, item_tp, origin, (*parts, i))
                elif _kind(item_tp) and isinstance(item, (dict, list)):
                    fail(f"must be {_kind(item_tp)}, got {item!r}", format_key((*parts, i)))
                elif _overflows(item_tp, item):
                    fail("must be a finite number, got an integer too large for a float", format_key((*parts, i)))
        elif typing.get_origin(tp) is dict:
            if not isinstance(v, dict):
                fail(f"must be a mapping, got {v!r}")
            for name, value in v.items():
                problem = env_problem(name, value, origin == "override") if parts == ("ray", "env") else None
                if problem:
                    fail(problem, f"ray.env.{name}")
                if _overflows((typing.get_args(tp) or (None, None))[-1], value):
                    fail("must be a finite number, got an integer too large for a float", format_key((*parts, name)))
        elif _kind(tp) and isinstance(v, (dict, list)):
            fail(f"must be {_kind(tp)}, got {v!r}")
        elif _overflows(tp, v):
            fail("must be a finite number, got an integer too large for a float")


# ----------------------------------------------------------------------------- typed values

_NUM_RESOURCES = {"num_cpus": ">=0", "num_gpus": ">=0"}
# ranges by key pattern ([*]: any list index, .*: any mapping key); None values are skipped
RULES: dict[str, str] = {
    "data.eval_fraction": "[0,1)", "data.max_eval_examples": ">=0", "data.max_length": ">0",
    "data.max_prompt_length": ">0", "data.synthetic.num_rows": ">0", "data.synthetic.list_size": ">=2",
    "model.lora.r": ">0", "model.lora.alpha": ">0", "model.lora.dropout": "[0,1)",
    "roles.learner.num_actors": ">0", "roles.learner.resources.*": ">=0",
    "roles.reference.num_actors": ">0",
    "roles.rollout.engines": ">0", "roles.rollout.resources.*": ">=0", "roles.rollout.max_restarts": ">=0",
    "roles.rollout.max_model_len": ">0", "roles.rollout.gpu_memory_utilization": "(0,1]",
    "roles.rollout.cpu_kv_cache_gib": ">0", "roles.rollout.verify_sync_prompts": ">=0",
    "roles.rollout.sampling.n": ">0", "roles.rollout.sampling.temperature": ">=0",
    "roles.rollout.sampling.top_p": "(0,1]", "roles.rollout.sampling.max_tokens": ">0",
    "roles.rollout.sampling.min_tokens": ">=0",
    "roles.critic.num_actors": ">0", "roles.critic.resources.*": ">=0", "roles.critic.lr": ">0",
    "train.epochs": ">0", "train.batch_size": ">0", "train.micro_batch_size": ">0",
    "train.micro_batch_tokens": ">0", "train.inference_micro_batch_tokens": ">0",
    "train.lr": ">0", "train.warmup_ratio": "[0,1)", "train.weight_decay": ">=0",
    "train.adam_betas": "pair", "train.adam_betas[*]": "[0,1)", "train.adam_eps": ">0",
    "train.max_grad_norm": ">=0", "train.eval_every": ">=0", "train.iterations": ">0",
    "train.prompts_per_iteration": ">0", "train.log_every": ">0", "train.max_skipped_steps": ">=0",
    "train.skip_grad_norm_above": ">0", "train.debug_nan_steps[*]": ">=0",
    "train.max_sampling_rounds": ">0", "train.min_reward_gap": ">=0", "train.sample_log_every": ">=0",
    "output.checkpoint_every": ">=0", "output.keep_checkpoints": ">=0",
    "ray.num_cpus": ">=0", "ray.oversubscribe": ">0",
    **{f"{role}.{k}": rule for role in ("roles.learner", "roles.reference", "roles.rollout", "roles.critic",
                                         "roles.reward.sources[*]", "roles.reward.process")
       for k, rule in _NUM_RESOURCES.items()},
}
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    ">0": (lambda v: v > 0, "must be > 0"), ">=0": (lambda v: v >= 0, "must be >= 0"),
    ">=2": (lambda v: v >= 2, "must be >= 2"), "[0,1)": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
}


def _type_problem(value: Any, tp: Any) -> str | None:
    if dataclasses.is_dataclass(tp):
        ok = isinstance(value, tp)
    elif typing.get_origin(tp) in (list, dict):
        ok = isinstance(value, typing.get_origin(tp))
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp in (str, bool):
        ok = isinstance(value, tp)
    else:
        return None   # Any and other annotations: not checked
    if ok:
        return None
    want = (_kind(tp) or ("a list" if typing.get_origin(tp) is list else "a mapping" if typing.get_origin(tp) is dict
                          else f"a {getattr(tp, '__name__', tp)}"))
    return f"must be {want}, got {type(value).__name__} {value!r}"


def check_values(obj: Any, at: Callable[[str], str]) -> None:
    """Walk a typed recipe (or any dataclass tree); raise ConfigError, prefixed with ``at(key)``
    (where the key was set), for the first value of the wrong type, non-finite float, non-positive
    ``*timeout*`` or value outside its :data:`RULES` range."""
    for f in dataclasses.fields(obj):
        _check(getattr(obj, f.name), hints(type(obj))[f.name], (f.name,), (f.name,), at)


def _check(value: Any, tp: Any, parts: Parts, pattern: Parts, at: Callable[[str], str]) -> None:
    key = format_key(parts)

    def fail(message: str) -> None:
        raise ConfigError(f"{at(key)}: '{key}' {message}")

    tp, optional = unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return
        fail("must be set, got null")
    if parts[:2] == ("ray", "env") and len(parts) == 3:
        problem = env_problem(parts[2], value)
        if problem:
            fail(problem)
    problem = _type_problem(value, tp)
    if problem:
        fail(problem)
    if isinstance(value, float) and not math.isfinite(value):
        fail(f"must be a finite number, got {value}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and isinstance(parts[-1], str) and "timeout" in parts[-1] and not value > 0:
        fail(f"must be > 0 (seconds), got {value}")
    rule = RULES.get(format_key(pattern).replace("[-1]", "[*]"))
    if rule == "pair" and len(value) != 2:
        fail(f"needs two values, got {list(value)}")
    if rule in _RANGES and number and not _RANGES[rule][0](value):
        fail(f"{_RANGES[rule][1]}, got {value}")

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _check(getattr(value, f.name), hints(type(value))[f.name], (*parts, f.name), (*pattern, f.name), at)
    elif isinstance(value, list):
        item_tp = (typing.get_args(tp) or (Any,))[0]
        for i, item in enumerate(value):
            _check(item, item_tp, (*parts, i), (*pattern, -1), at)    # -1: any index, "[*]" in RULES
    elif isinstance(value, dict):
        args = typing.get_args(tp)
        for k, item in value.items():
            if not isinstance(k, str) or not k:
                fail(f"keys must be non-empty strings, got {k!r}")
            _check(item, args[1] if len(args) == 2 else Any, (*parts, k), (*pattern, "*"), at)
