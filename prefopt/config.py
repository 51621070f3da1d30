"""Load, merge and validate recipes.

    recipe = load_recipe("recipes/tiny_dpo.yaml", ["train.lr=1e-5", "roles.learner.num_actors=2"])

Layers, later wins: the ``base:`` chain (a recipe may extend another, recursively), the recipe
itself, then ``key=value`` overrides. Each layer's keys are checked against the schema in
:mod:`prefopt.config_schema` before merging, so an error names the file (or the override) that
introduced a bad key, and suggests the closest valid key. Cross-field checks (batch sizes, roles
the objective needs) run here too: every recipe error surfaces before Ray starts.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prefopt.config_schema import Recipe
from prefopt.errors import ConfigError, closest, did_you_mean

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# ----------------------------------------------------------------------------- reading layers

def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(cfg).__name__}")
    return OmegaConf.to_container(cfg, resolve=False)


def resolve_recipe_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe path as given, relative to ``relative_to``'s folder, or a name in ``recipes/``."""
    p = Path(path).expanduser()
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to.parent / p)
    if not p.is_absolute():
        candidates.append(RECIPES_DIR / p)
        if p.suffix == "":
            candidates.append(RECIPES_DIR / f"{p}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    where = f" (referenced from {relative_to})" if relative_to else ""
    raise ConfigError(f"recipe file not found: {path}{where}")


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """[(origin, dict)] from the root of the base chain down to ``path``."""
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"recipe base chain has a cycle: {chain}")
    data = _read_yaml(path)
    layers = []
    base = data.get("base")
    if base:
        # a base recipe's `expect:` ranges describe *its* run: a derived recipe states its own
        layers = [(origin, {k: v for k, v in layer.items() if k != "expect"})
                  for origin, layer in _read_layers(resolve_recipe_path(base, relative_to=path), (*seen, path))]
    data.pop("base", None)
    return layers + [(str(path), data)]


def _parse_overrides(overrides: list[str]) -> dict:
    """``a.b=1`` -> ``{"a": {"b": 1}}``; a numeric part indexes a list (``roles.reward.sources.0.weight=2``
    -> ``{..., "sources": {0: {"weight": 2}}}``, merged into that element). Values use OmegaConf's
    grammar (numbers incl. ``1e-2``, ``null``, ``[a, b]``, ``{k: v}``)."""
    layer: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]), resolve=False)["v"]
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse override '{item}': {str(e).splitlines()[0]}") from None
        parts = [int(part) if part.isdigit() else part for part in key.split(".")]
        node = layer
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return layer


def _deep_merge(base: Any, new: Any, key: str = "") -> Any:
    """Mappings merge key by key; a list is replaced, or updated per index by an int-keyed mapping
    (from an override); anything else is replaced."""
    if isinstance(base, dict) and isinstance(new, dict):
        out = dict(base)
        for k, v in new.items():
            out[k] = _deep_merge(base[k], v, f"{key}{k}.") if k in base else v
        return out
    if isinstance(base, list) and isinstance(new, dict) and new and all(isinstance(k, int) for k in new):
        out = list(base)
        for i, v in new.items():
            if not 0 <= i < len(out):
                raise ConfigError(f"override of '{key}{i}': '{key.rstrip('.')}' has {len(out)} entries "
                                  f"(indices 0..{len(out) - 1})")
            out[i] = _deep_merge(out[i], v, f"{key}{i}.")
        return out
    if isinstance(new, dict) and new and all(isinstance(k, int) for k in new):
        raise ConfigError(f"override of '{key}{next(iter(new))}': '{key.rstrip('.')}' is not a list in the recipe")
    return new


# ----------------------------------------------------------------------------- key checking

def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def check_keys(data: Any, schema: type, origin: str, prefix: str = "") -> None:
    """Raise ConfigError for any key of ``data`` that ``schema`` (a dataclass) does not have."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            best = closest(str(key), fields)
            hint = f" (did you mean '{prefix}{best}'?)" if best else ""
            raise ConfigError(f"{origin}: unknown key '{dotted}'{hint}; valid keys under "
                              f"'{prefix.rstrip('.') or 'the recipe'}': {', '.join(sorted(fields))}")
        sub = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            check_keys(value, sub, origin, f"{dotted}.")
        elif typing.get_origin(sub) is list and isinstance(value, (list, dict)):
            item_type = typing.get_args(sub)[0] if typing.get_args(sub) else None
            items = value.items() if isinstance(value, dict) else enumerate(value)   # dict: index overrides
            if dataclasses.is_dataclass(item_type):
                for i, item in items:
                    check_keys(item, item_type, origin, f"{dotted}[{i}].")


def _merge(layers: list[tuple[str, dict]]) -> dict:
    merged: dict = {}
    for _, data in layers:
        merged = _deep_merge(merged, data)
    return merged


def _typed(schema: type, data: dict, what: str) -> Any:
    """Validate types by merging into the structured schema; return the dataclass instance."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        if "issing mandatory value" in msg:
            raise ConfigError(f"{what}: required key '{key}' is not set") from None
        raise ConfigError(f"{what}: invalid value for '{key}': {msg}") from None


# ----------------------------------------------------------------------------- public API

def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file (plus its bases and overrides) into a validated :class:`Recipe`."""
    recipe_path = resolve_recipe_path(path)
    layers = _read_layers(recipe_path)
    if overrides:
        layers.append(("override", _parse_overrides(list(overrides))))
    return recipe_from_layers(layers, str(recipe_path))


def recipe_from_dict(data: dict, origin: str = "<dict>") -> Recipe:
    """Validate a recipe given as a plain dict (e.g. built in an ablation script)."""
    data = dict(data)
    data.pop("base", None)
    return recipe_from_layers([(origin, data)], origin)


def recipe_from_layers(layers: list[tuple[str, dict]], what: str) -> Recipe:
    from prefopt.objectives import OBJECTIVES

    for origin, data in layers:
        if "objective" in data and not isinstance(data["objective"], dict):
            raise ConfigError(f"{origin}: 'objective' must be a mapping with at least 'name'")
        check_keys({k: v for k, v in data.items() if k != "objective"}, Recipe, origin)
    merged = _merge(layers)
    objective = merged.pop("objective", None) or {"name": "dpo"}
    recipe = _typed(Recipe, merged, what)

    name = objective.get("name", "dpo")
    objective_cls = OBJECTIVES.get(name) if name in OBJECTIVES else None
    if objective_cls is None:
        raise ConfigError(f"{what}: unknown objective.name '{name}'{did_you_mean(str(name), OBJECTIVES.names())}; "
                          f"available: {', '.join(OBJECTIVES.names())}")
    for origin, data in layers:
        layer_obj = dict(data.get("objective") or {})
        # a base recipe's objective parameters don't apply once a child switches objectives
        if layer_obj.get("name", name) != name:
            continue
        check_keys(layer_obj, objective_cls.Params, origin, "objective.")
    # keep only the parameters of the chosen objective from every layer (see comment above)
    kept = {}
    for _, data in layers:
        layer_obj = dict(data.get("objective") or {})
        if layer_obj.get("name", name) == name:
            kept = _deep_merge(kept, layer_obj, "objective.")
    kept["name"] = name
    recipe.objective = _typed(objective_cls.Params, kept, what)
    validate_recipe(recipe, what)
    return recipe


def _positive(value: float, key: str, what: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{what}: '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _one_of(value: Any, choices: tuple, key: str, what: str) -> None:
    if value not in choices:
        raise ConfigError(f"{what}: '{key}' must be one of {', '.join(map(str, choices))}, "
                          f"got '{value}'{did_you_mean(str(value), map(str, choices))}")


def validate_recipe(recipe: Recipe, what: str = "recipe") -> None:
    """Cross-field checks that typing alone cannot express."""
    from prefopt.objectives import OBJECTIVES

    t, learner = recipe.train, recipe.roles.learner
    _positive(t.batch_size, "train.batch_size", what)
    _positive(t.micro_batch_size, "train.micro_batch_size", what)
    for key in ("micro_batch_tokens", "inference_micro_batch_tokens"):
        if getattr(t, key) is not None:
            _positive(getattr(t, key), f"train.{key}", what)
    _positive(t.lr, "train.lr", what)
    _positive(t.epochs, "train.epochs", what)
    _positive(learner.num_actors, "roles.learner.num_actors", what)
    _positive(learner.num_cpus, "roles.learner.num_cpus", what, allow_zero=True)
    _positive(learner.num_gpus, "roles.learner.num_gpus", what, allow_zero=True)
    _positive(t.max_grad_norm, "train.max_grad_norm", what, allow_zero=True)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"{what}: 'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"{what}: 'train.adam_betas' needs two values, got {list(t.adam_betas)}")
    _one_of(t.lr_scheduler, ("constant", "linear", "cosine"), "train.lr_scheduler", what)
    _one_of(t.precision, ("fp32", "bf16", "fp16"), "train.precision", what)
    _one_of(learner.zero_stage, (0, 1, 2, 3), "roles.learner.zero_stage", what)
    _one_of(learner.placement, ("pack", "spread"), "roles.learner.placement", what)
    per_step = t.micro_batch_size * learner.num_actors
    if t.batch_size % per_step:
        raise ConfigError(
            f"{what}: 'train.batch_size' ({t.batch_size}) must be a multiple of "
            f"train.micro_batch_size x roles.learner.num_actors ({t.micro_batch_size} x {learner.num_actors})")
    for key, bounds in recipe.expect.items():
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            raise ConfigError(f"{what}: 'expect.{key}' must be [low, high] with low <= high, got {list(bounds)}")
    if recipe.roles.reference is not None:
        _one_of(recipe.roles.reference.placement, ("learner", "actor"), "roles.reference.placement", what)

    objective_cls = OBJECTIVES.get(recipe.objective.name)
    required = getattr(objective_cls, "required_roles", None)
    for role in sorted(required(recipe.objective) if required else objective_cls.needs):
        if getattr(recipe.roles, role, None) is None:
            raise ConfigError(f"{what}: objective '{recipe.objective.name}' needs the '{role}' role, "
                              f"but roles.{role} is not set (add e.g. `roles: {{{role}: {{}}}}`)")
    if objective_cls.batch_kind == "rollouts":
        per_iter = t.prompts_per_iteration * recipe.roles.rollout.sampling.n
        if per_iter % t.batch_size:
            raise ConfigError(f"{what}: train.prompts_per_iteration x roles.rollout.sampling.n ({per_iter} samples) "
                              f"must be a multiple of train.batch_size ({t.batch_size})")
        _one_of(recipe.roles.rollout.weight_sync, ("object_store", "process_group"), "roles.rollout.weight_sync", what)
        _one_of(recipe.roles.rollout.placement, (None, "pack", "spread"), "roles.rollout.placement", what)
        ro = recipe.roles.rollout
        if ro.colocate_with_learners and ro.engines > learner.num_actors:
            raise ConfigError(f"{what}: roles.rollout.colocate_with_learners puts one engine in each learner's "
                              f"bundle, so roles.rollout.engines ({ro.engines}) must be <= roles.learner.num_actors "
                              f"({learner.num_actors})")
        if t.async_rollouts and getattr(recipe.objective, "nelder_mead", None) is not None:
            raise ConfigError(f"{what}: train.async_rollouts cannot be combined with objective.nelder_mead")
        critic = recipe.roles.critic
        if critic is not None and t.batch_size % (t.micro_batch_size * critic.num_actors):
            raise ConfigError(f"{what}: 'train.batch_size' ({t.batch_size}) must be a multiple of "
                              f"train.micro_batch_size x roles.critic.num_actors")
    check = getattr(recipe.objective, "validate", None)
    cross_check = getattr(objective_cls, "check_recipe", None)   # checks across objective and roles
    try:
        if callable(check):
            check()
        if callable(cross_check):
            cross_check(recipe)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain-dict form of a validated recipe (what ``prefopt show`` prints and runs save)."""
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(recipe_to_dict(recipe)))
