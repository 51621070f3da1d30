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
import re
import typing
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prefopt.config_checks import (is_index_map, check_shapes, check_values, first_non_finite,
                                   format_key, origin_of, parse_key, schema_default)
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
    """A recipe path as given, relative to ``relative_to``'s folder, or a shipped recipe: a name in
    ``recipes/`` (``tiny_dpo``, ``tiny_dpo.yaml``, ``papers/zephyr_dpo.yaml``, or ``recipes/tiny_dpo.yaml``
    from any working directory). A missing recipe gets the closest shipped name."""
    p = Path(path).expanduser()
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to.parent / p)
    if not p.is_absolute():
        inside = Path(*p.parts[1:]) if p.parts[:1] == ("recipes",) and len(p.parts) > 1 else p
        candidates += [RECIPES_DIR / inside] + ([RECIPES_DIR / f"{inside}.yaml"] if inside.suffix == "" else [])
    for c in candidates:
        if c.is_file():
            return c.resolve()
    where = f" (referenced from {relative_to})" if relative_to else ""
    shipped = sorted(str(f.relative_to(RECIPES_DIR)) for f in RECIPES_DIR.glob("**/*.yaml"))
    guess = closest(p.name if p.suffix else f"{p.name}.yaml", [Path(n).name for n in shipped])
    hint = f" (did you mean '{next(n for n in shipped if Path(n).name == guess)}'?)" if guess else ""
    raise ConfigError(f"recipe file not found: {path}{where}{hint}; shipped recipes (usable by name from any "
                      f"folder): {', '.join(n.removesuffix('.yaml') for n in shipped if '/' not in n)}")


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """[(origin, dict)] from the root of the base chain down to ``path``."""
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"recipe base chain has a cycle: {chain}")
    data = _read_yaml(path)
    layers = []
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be the path or name of the recipe this one extends, got {base!r}")
    if base:
        # a base recipe's `expect:` ranges describe *its* run: a derived recipe states its own
        layers = [(origin, {k: v for k, v in layer.items() if k != "expect"})
                  for origin, layer in _read_layers(resolve_recipe_path(base, relative_to=path), (*seen, path))]
    data.pop("base", None)
    return layers + [(str(path), data)]


def _env_text(text: str, value: Any) -> Any:
    """An override ``ray.env.NAME=text`` sets the variable to ``text`` as typed (``=1`` is '1', not
    an int; a quoted value is unquoted); lists, mappings and ``null`` stay as parsed (and are refused)."""
    if isinstance(value, (bool, int, float)) or (value is None and not text.strip()):
        return text.strip()
    return value


def _parse_overrides(overrides: list[str]) -> dict:
    """``a.b=1`` -> ``{"a": {"b": 1}}``; a numeric part indexes a list (``roles.reward.sources.0.weight=2``
    or ``roles.reward.sources[0].weight=2`` -> ``{..., "sources": {0: {"weight": 2}}}``, merged into
    that element). Values use OmegaConf's grammar (numbers incl. ``1e-2``, ``null``, ``[a, b]``,
    ``{k: v}``), except that ``ray.env.NAME=value`` keeps the value's text."""
    layer: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            parts = parse_key(key)
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]), resolve=False)["v"]
        except ConfigError as e:
            raise ConfigError(f"override '{item}': {e}") from None
        except Exception as e:   # OmegaConf's grammar errors, and YAML's for some values
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot parse override '{item}': {first}") from None
        if len(parts) == 3 and parts[:2] == ("ray", "env"):
            value = _env_text(text, value)
        node = layer
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of "
                                  f"'{format_key(parts[:depth + 1])}'")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override '{item}' conflicts with an earlier override of a key under '{key}' "
                              f"(set '{key}' first, then its keys)")
        node[parts[-1]] = value
    return layer


def _deep_merge(base: Any, new: Any, path: tuple = (), default: Callable[[tuple], Any] | None = None,
                origin: str = "recipe") -> Any:
    """Mappings merge key by key; a list is replaced, or updated per index by an int-keyed mapping
    (from an override); anything else is replaced. An index mapping for a key that no earlier layer
    set updates ``default(path)``, the schema's default (``train.adam_betas.0=0.8``)."""
    if is_index_map(new):
        key = format_key(path)
        if not isinstance(base, list):
            i = next(iter(new))
            held = "null (unset)" if base is None else f"{type(base).__name__} {base!r}"
            raise ConfigError(f"{origin}: '{key}' is not a list, so '{key}.{i}' cannot index it (it is {held})")
        out = list(base)
        for i, v in new.items():
            if not 0 <= i < len(out):
                valid = f"indices 0..{len(out) - 1}" if out else "no valid index: set the whole list instead"
                raise ConfigError(f"{origin}: index {i} of '{key}' is out of range: '{key}' has {len(out)} "
                                  f"entries ({valid})")
            out[i] = _deep_merge(out[i], v, (*path, i), default, origin)
        return out
    if isinstance(new, dict):
        out = dict(base) if isinstance(base, dict) else {}   # a mapping replaces a non-mapping
        for k, v in new.items():
            if k in out:
                sub = out[k]
            else:
                sub = default((*path, k)) if default is not None and is_index_map(v) else None
            out[k] = _deep_merge(sub, v, (*path, k), default, origin) if isinstance(v, dict) else v
        return out
    return new


# ----------------------------------------------------------------------------- key checking

def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


# keys that recipes written for an earlier schema may still carry: what replaces them
RENAMED = {"output.tensorboard": "replaced by output.loggers: a list of tensorboard, wandb, mlflow; "
                                 "output.tensorboard: false is output.loggers: []"}


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
            if dotted in RENAMED:
                hint = f" ({RENAMED[dotted]})"
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


def _merge(layers: list[tuple[str, dict]], default: Callable[[tuple], Any] | None = None) -> dict:
    merged: dict = {}
    for origin, data in layers:
        merged = _deep_merge(merged, data, (), default, origin)
    return merged


def _typed(schema: type, data: dict, what: str, prefix: str = "", where: Callable[[str], str] | None = None) -> Any:
    """Validate types by merging into the structured schema; return the dataclass instance. An error
    names the key (``prefix`` + OmegaConf's key) and ``where(key)``: the layer that set it."""
    where = where or (lambda key: what)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
        # NaN/Inf first: 'nan' in an override is text until typed, and Params check ranges when built
        bad = first_non_finite(OmegaConf.to_container(cfg, resolve=True))
        typed = None if bad else OmegaConf.to_object(cfg)
    except ConfigError as e:   # an objective's Params validate themselves when built
        named = _KEY_IN_MESSAGE.search(str(e))
        raise ConfigError(f"{where(named.group(0)) if named else what}: {e}") from None
    except (OmegaConfBaseException, TypeError, ValueError, ArithmeticError) as e:
        key = (prefix + (getattr(e, "full_key", None) or "")).rstrip(".") or "the recipe"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "issing mandatory value" in msg:
            raise ConfigError(f"{where(key)}: required key '{key}' is not set") from None
        if "is not Optional" in msg or "Incompatible value 'None'" in msg:
            empty = " (an override 'key=' with nothing after '=' sets null)" if where(key) == "override" else ""
            raise ConfigError(f"{where(key)}: '{key}' must not be null{empty}") from None
        raise ConfigError(f"{where(key)}: invalid value for '{key}': {msg}") from None
    if bad:
        key = prefix + format_key(bad[0])
        raise ConfigError(f"{where(key)}: '{key}' must be a finite number, got {bad[1]}")
    return typed


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

    rest = []   # each layer without its objective section (merged apart, by the chosen objective's schema)
    name, name_origin = "dpo", what
    for origin, data in layers:
        if "objective" in data and not isinstance(data["objective"], dict):
            raise ConfigError(f"{origin}: 'objective' must be a mapping with at least 'name'")
        if data.get("base") is not None:   # files' `base:` is read (and dropped) by _read_layers
            raise ConfigError(f"{origin}: 'base' names the recipe a recipe file extends; it can only be set "
                              f"in a recipe file, not here")
        rest.append((origin, {k: v for k, v in data.items() if k != "objective"}))
        check_keys(rest[-1][1], Recipe, origin)
        check_shapes(rest[-1][1], Recipe, origin)
        if "name" in (data.get("objective") or {}):
            name, name_origin = data["objective"]["name"], origin
    if not isinstance(name, str):
        raise ConfigError(f"{name_origin}: 'objective.name' must be a string naming an objective "
                          f"({', '.join(OBJECTIVES.names())}), got {name!r}")
    if name not in OBJECTIVES:
        raise ConfigError(f"{name_origin}: unknown objective.name '{name}'{did_you_mean(name, OBJECTIVES.names())}; "
                          f"available: {', '.join(OBJECTIVES.names())}")
    objective_cls = OBJECTIVES.get(name)
    # a base recipe's objective parameters don't apply once a child switches objectives
    objective_layers, view = [], []   # view: each layer as it counts, to find where a key was set
    for (origin, data), (_, kept_data) in zip(layers, rest):
        layer_obj = dict(data.get("objective") or {})
        if layer_obj.get("name", name) == name:
            check_keys(layer_obj, objective_cls.Params, origin, "objective.")
            check_shapes(layer_obj, objective_cls.Params, origin, ("objective",))
            objective_layers.append((origin, layer_obj))
            kept_data = {**kept_data, "objective": layer_obj}
        view.append((origin, kept_data))

    def where(key: str) -> str:
        return origin_of(view, key) or what

    recipe = _typed(Recipe, _merge(rest, lambda path: schema_default(Recipe, path)), what, where=where)
    kept: dict = {}
    for origin, layer_obj in objective_layers:
        kept = _deep_merge(kept, layer_obj, ("objective",),
                           lambda path: schema_default(objective_cls.Params, path[1:]), origin)
    kept["name"] = name
    recipe.objective = _typed(objective_cls.Params, kept, what, "objective.", where)
    validate_recipe(recipe, what, where)
    return recipe


def _one_of(value: Any, choices: tuple, key: str, what: str) -> None:
    if value not in choices:
        raise ConfigError(f"{what}: '{key}' must be one of {', '.join(map(str, choices))}, "
                          f"got '{value}'{did_you_mean(str(value), map(str, choices))}")


_KEY_IN_MESSAGE = re.compile(r"\b(?:objective|roles|train|data|model|output|ray)\.[\w.\[\]]*\w\]?")


def validate_recipe(recipe: Recipe, what: str = "recipe", where: Callable[[str], str] | None = None) -> None:
    """Cross-field checks that typing alone cannot express, and a walk over every value (types,
    finite floats, positive timeouts, ranges: :mod:`prefopt.config_checks`), so a Recipe built in
    code is checked too. ``where(key)`` names the file or override that set a key (default: ``what``)."""
    from prefopt.objectives import OBJECTIVES

    at = where or (lambda key: what)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"{what}: expected a Recipe, got {type(recipe).__name__}")
    objective_cls = OBJECTIVES.get(recipe.objective.name) \
        if isinstance(getattr(recipe.objective, "name", None), str) and recipe.objective.name in OBJECTIVES else None
    if objective_cls is None or not isinstance(recipe.objective, objective_cls.Params):
        raise ConfigError(f"{what}: 'objective' must be the Params dataclass of a registered objective "
                          f"(e.g. OBJECTIVES.get('dpo').Params(beta=0.1)), got {recipe.objective!r}")
    check_values(recipe, at)

    t, learner, ro = recipe.train, recipe.roles.learner, recipe.roles.rollout
    _one_of(t.lr_scheduler, ("constant", "linear", "cosine"), "train.lr_scheduler", at("train.lr_scheduler"))
    _one_of(t.precision, ("fp32", "bf16", "fp16"), "train.precision", at("train.precision"))
    _one_of(learner.zero_stage, (0, 1, 2, 3), "roles.learner.zero_stage", at("roles.learner.zero_stage"))
    _one_of(learner.placement, ("pack", "spread"), "roles.learner.placement", at("roles.learner.placement"))
    from prefopt.console import LEVELS
    _one_of(recipe.output.log_level, LEVELS, "output.log_level", at("output.log_level"))
    from prefopt.io.loggers import check_logger_names
    check_logger_names(recipe.output.loggers, at("output.loggers"))
    per_step = t.micro_batch_size * learner.num_actors
    if t.batch_size % per_step:
        raise ConfigError(
            f"{at('train.batch_size')}: 'train.batch_size' ({t.batch_size}) must be a multiple of "
            f"train.micro_batch_size x roles.learner.num_actors ({t.micro_batch_size} x {learner.num_actors})")
    for key, bounds in recipe.expect.items():
        if len(bounds) != 2 or bounds[0] > bounds[1]:
            raise ConfigError(f"{at(f'expect.{key}')}: 'expect.{key}' must be [low, high] with low <= high, "
                              f"got {list(bounds)}")
    if recipe.roles.reference is not None:
        _one_of(recipe.roles.reference.placement, ("learner", "actor"), "roles.reference.placement",
                at("roles.reference.placement"))
    if ro is not None and ro.sampling.min_tokens > ro.sampling.max_tokens:
        raise ConfigError(f"{at('roles.rollout.sampling.min_tokens')}: 'roles.rollout.sampling.min_tokens' "
                          f"({ro.sampling.min_tokens}) must be <= roles.rollout.sampling.max_tokens "
                          f"({ro.sampling.max_tokens})")

    for role in sorted(objective_cls.required_roles(recipe.objective)):
        if getattr(recipe.roles, role, None) is None:
            raise ConfigError(f"{at(f'roles.{role}')}: objective '{recipe.objective.name}' needs the '{role}' role, "
                              f"but roles.{role} is not set (add e.g. `roles: {{{role}: {{}}}}`)")
    from prefopt.algorithms import algorithm_for
    algorithm = algorithm_for(recipe)
    if algorithm.reads == "prompts":   # online: PPO's required roles include the rollout; online DPO is chosen by it
        per_iter = t.prompts_per_iteration * ro.sampling.n
        if objective_cls.batch_kind == "rollouts" and per_iter % t.batch_size:
            raise ConfigError(f"{at('train.prompts_per_iteration')}: train.prompts_per_iteration x "
                              f"roles.rollout.sampling.n ({per_iter} samples) must be a multiple of "
                              f"train.batch_size ({t.batch_size})")
        _one_of(ro.weight_sync, ("object_store", "process_group"), "roles.rollout.weight_sync",
                at("roles.rollout.weight_sync"))
        _one_of(ro.placement, (None, "pack", "spread"), "roles.rollout.placement", at("roles.rollout.placement"))
        _one_of(ro.lora_sync, ("auto", "merged", "adapter"), "roles.rollout.lora_sync", at("roles.rollout.lora_sync"))
        if ro.lora_sync == "adapter":
            from prefopt.models.lora import adapter_unservable
            why = "it needs model.lora" if recipe.model.lora is None else adapter_unservable(recipe.model.lora)
            if why:
                raise ConfigError(f"{at('roles.rollout.lora_sync')}: roles.rollout.lora_sync=adapter: {why} "
                                  f"(use lora_sync: merged)")
        if ro.colocate_with_learners and ro.engines > learner.num_actors:
            raise ConfigError(f"{at('roles.rollout.colocate_with_learners')}: roles.rollout.colocate_with_learners "
                              f"puts one engine in each learner's bundle, so roles.rollout.engines ({ro.engines}) "
                              f"must be <= roles.learner.num_actors ({learner.num_actors})")
        if t.async_rollouts and getattr(recipe.objective, "nelder_mead", None) is not None:
            raise ConfigError(f"{at('train.async_rollouts')}: train.async_rollouts cannot be combined with "
                              f"objective.nelder_mead")
        critic = recipe.roles.critic
        if critic is not None and t.batch_size % (t.micro_batch_size * critic.num_actors):
            raise ConfigError(f"{at('train.batch_size')}: 'train.batch_size' ({t.batch_size}) must be a multiple of "
                              f"train.micro_batch_size x roles.critic.num_actors")
    if isinstance(getattr(recipe.objective, "advantage", None), str):   # PPO's registry names the value only
        from prefopt.rl.advantages import ADVANTAGES
        _one_of(recipe.objective.advantage, tuple(ADVANTAGES.names()), "objective.advantage",
                at("objective.advantage"))
    try:
        recipe.objective.validate()
        objective_cls.check_recipe(recipe)      # checks across the objective and the roles
        algorithm.check_recipe(recipe)          # and across the algorithm and the roles
    except ConfigError as e:
        named = _KEY_IN_MESSAGE.search(str(e))   # the objective's message names a key: say where it was set
        raise ConfigError(f"{at(named.group(0)) if named else what}: {e}") from None


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain-dict form of a validated recipe (what ``prefopt show`` prints and runs save)."""
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(recipe_to_dict(recipe)))
