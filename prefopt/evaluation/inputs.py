"""The checks of ``prefopt eval`` that run before Ray starts: the models (a checkpoint, ``builtin:``,
``run:NAME`` or a run folder), the reward sources, the sampling options and the output folder.

Every problem is a :class:`~prefopt.errors.ConfigError` naming the argument.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from prefopt.errors import ConfigError

RESULTS = ("summary.json", "samples.jsonl")
_FN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
MODEL_PREFIXES = ("run:", "builtin:")


@dataclass
class Model:
    """A model to evaluate: what the user named, its checkpoint folder, and the run folder it came from."""
    shown: str
    path: str
    run_dir: Path | None = None


def is_run_dir(path: str) -> bool:
    """Whether ``path`` is a prefopt run folder (it holds the ``.prefopt-run`` marker)."""
    from prefopt.io.run_dir import MARKER
    return (Path(path).expanduser() / MARKER).is_file()


def resolve_model(arg: str, runs_root: str, what: str, trust_remote_code: bool = False) -> Model:
    """``arg`` -> its checked checkpoint folder: a run folder's ``model/``, ``run:NAME`` (the newest
    finished run of recipe NAME under ``runs_root``), ``builtin:NAME``, a local folder or a hub name."""
    from prefopt.io.run_dir import run_model
    from prefopt.models.check import check_model
    run_dir = None
    path = arg
    if is_run_dir(arg):
        run_dir = Path(arg).expanduser().resolve()
        if not (run_dir / "model" / "config.json").is_file():
            raise ConfigError(f"{what} {arg} is a run folder without a saved model (model/): the run has not "
                              f"finished, or ran with output.save_model: false")
        path = str(run_dir / "model")
    path = run_model(path, runs_root, what)
    return Model(shown=arg, path=check_model(path, trust_remote_code=trust_remote_code, what=what), run_dir=run_dir)


def check_context(model: Model, needed: int, what: str) -> None:
    """The model's context (``max_position_embeddings`` in config.json, when it says) must hold the
    longest prompt plus the response."""
    config = Path(model.path) / "config.json"
    try:
        limit = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return                       # a hub name left to load time
    if isinstance(limit, int) and limit < needed:
        raise ConfigError(f"{what} {model.shown} holds {limit} positions, but --max-prompt-length + --max-tokens "
                          f"= {needed}: lower one of them")


def check_options(n: int, temperature: float, max_tokens: int, max_prompt_length: int,
                  max_prompts: int | None) -> None:
    if n < 1:
        raise ConfigError(f"--n must be >= 1 (got {n})")
    if not temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (got {temperature})")
    if n > 1 and temperature == 0:
        raise ConfigError(f"--n {n} with --temperature 0: greedy decoding gives {n} identical responses; "
                          f"set --temperature > 0 to sample several")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1 (got {max_tokens})")
    if max_prompt_length < 1:
        raise ConfigError(f"--max-prompt-length must be >= 1 (got {max_prompt_length})")
    if max_prompts is not None and max_prompts < 1:
        raise ConfigError(f"--max-prompts must be >= 1 (got {max_prompts})")


def split_weight(spec: str) -> tuple[str, float]:
    """``"SOURCE@2.5"`` -> ``("SOURCE", 2.5)``; without a numeric ``@W`` suffix the weight is 1."""
    head, sep, tail = spec.rpartition("@")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def is_reward_fn(source: str) -> bool:
    """``package.module:function`` (not ``run:NAME`` / ``builtin:NAME``, not an existing path)."""
    return (bool(_FN.fullmatch(source)) and not source.startswith(MODEL_PREFIXES)
            and not Path(source).expanduser().exists())


def reward_role(specs: list[str], runs_root: str, attribute_weights: dict[str, float] | None = None,
                trust_remote_code: bool = False):
    """``--reward`` arguments -> a checked :class:`~prefopt.config_schema.RewardRoleConfig`: one source
    each, a reward function (``package.module:function``) or a reward model (path, hub name,
    ``builtin:NAME`` or ``run:NAME``), with an optional ``@WEIGHT`` suffix (default 1)."""
    import math

    from prefopt.config_schema import RewardRoleConfig, RewardSourceConfig
    from prefopt.curation import reward_models
    from prefopt.rewards.sources import check_sources, import_reward_fn
    if not specs:
        raise ConfigError("--reward: name at least one reward source (a 'package.module:function' or a "
                          "reward model)")
    sources = []
    for spec in specs:
        source, weight = split_weight(spec)
        if not math.isfinite(weight):
            raise ConfigError(f"--reward {spec}: the weight must be a finite number")
        if is_reward_fn(source):
            import_reward_fn(source)
            sources.append(RewardSourceConfig(fn=source, weight=weight))
        else:
            (path,), _ = reward_models([source], runs_root, attribute_weights, trust_remote_code)
            sources.append(RewardSourceConfig(model=path, weight=weight,
                                              attribute_weights=dict(attribute_weights or {})))
    cfg = RewardRoleConfig(sources=sources)
    check_sources(cfg)
    return cfg


def out_dir(out: str | None, model: Model, force: bool) -> Path:
    """The output folder: ``--out``, else ``RUN_DIR/eval`` for a run folder (a plain model needs
    ``--out``). A folder that already holds ``summary.json`` or ``samples.jsonl`` is refused unless
    ``force`` (then only those two files are replaced)."""
    if out is None:
        if model.run_dir is None:
            raise ConfigError(f"--out DIR is needed: {model.shown} is not a run folder (a run folder's results go "
                              f"to RUN_DIR/eval)")
        path = model.run_dir / "eval"
    else:
        path = Path(out).expanduser().resolve()
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out {path}: {parent} is a file, not a folder")
    taken = [name for name in RESULTS if (path / name).exists()]
    if taken and not force:
        raise ConfigError(f"--out {path} already holds results ({', '.join(taken)}): refusing to overwrite "
                          f"them (choose another --out, or pass --force to replace them)")
    return path
