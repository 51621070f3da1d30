"""Every check a run makes before Ray starts; ``prefopt train`` and ``prefopt validate`` share it.

:func:`prepare` validates the recipe, resolves and checks every model path (weights as safetensors,
a tokenizer, ``trust_remote_code``, the attention kernel), loads and tokenizes the data (or the
prompts), imports each reward function and calls it once on the first prompt row, checks that the
roles fit a local cluster and that the libraries of ``output.loggers`` are installed, and plans the
run folder (or finds the checkpoint to resume). It writes nothing but caches (builtin models,
synthetic data): the run folder is created only after it passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefopt.config_schema import Recipe


@dataclass
class Prepared:
    """What the checks loaded, handed to the run."""
    recipe: Recipe
    objective_cls: type
    tokenizer: object
    spec: object = None                     # roles.spec.RoleSpec: the actors the run starts
    data: object = None                     # offline: PreferenceData
    steps: list | None = None               # offline: the examples of each optimizer step
    prompts: list | None = None             # online: prompt rows
    eval_prompts: list | None = None        # online: held-out prompt rows (train.eval_every)
    run_dir: Path | None = None             # the run to continue (resume), else None: a new folder
    resume_from: Path | None = None         # the checkpoint to load


def here(path: str | None) -> bool:
    """Whether ``path`` (a model or data path) can be read on this machine: a ``builtin:`` model,
    ``synthetic:`` data, or an existing file or folder."""
    return bool(path) and (path.startswith(("builtin:", "synthetic:")) or Path(path).expanduser().exists())


def check_models(recipe: Recipe, *, remote: bool = False) -> None:
    """Resolve every model path of the recipe in place (``builtin:`` names -> cached folders, ``run:NAME``
    -> the newest finished run's model, :func:`prefopt.io.run_dir.run_model`) and
    check that each loads here: safetensors weights, a tokenizer, no unrequested remote code.
    ``remote``: the run happens on a cluster, so paths that exist only there are left alone."""
    from prefopt.models.check import check_model as check

    from prefopt.io.run_dir import run_model

    def check_model(path, **kwargs):
        if remote and isinstance(path, str) and path.startswith("run:"):
            return path          # a run on the cluster: the job's own pre-flight resolves it there
        path = run_model(path, recipe.output.root, kwargs.get("what", "model.path"))
        return check(path, **kwargs) if not remote or here(path) else path

    from prefopt.cluster import is_local

    m, roles = recipe.model, recipe.roles
    trust = m.trust_remote_code
    # whether an attention kernel runs is a question for the machines the learners land on: this one
    # only when the cluster is local
    attn = m.attn_implementation if is_local(recipe.ray) else "sdpa"
    if m.tokenizer and not remote:
        m.tokenizer = run_model(m.tokenizer, recipe.output.root, "model.tokenizer")
    m.path = check_model(m.path, tokenizer=m.tokenizer, trust_remote_code=trust, attn_implementation=attn,
                         what="model.path")
    from prefopt.models.lora import check_engine_serves_lora, sync_mode
    if sync_mode(recipe) == "adapter" and here(m.path):
        check_engine_serves_lora(m.path)
    if roles.critic is not None and roles.critic.path:
        roles.critic.path = check_model(roles.critic.path, trust_remote_code=trust, what="roles.critic.path",
                                        attn_implementation=attn, head="token_classification")
    if roles.reward is not None:
        for i, src in enumerate(roles.reward.sources):
            if src.model:
                src.model = check_model(src.model, trust_remote_code=trust, what=f"roles.reward.sources[{i}].model",
                                        head="sequence_classification")
            src.models = [check_model(p, trust_remote_code=trust, what=f"roles.reward.sources[{i}].models[{j}]",
                                      head="sequence_classification") for j, p in enumerate(src.models)]
        process = roles.reward.process
        if process is not None and process.model:
            head = "causal_lm" if process.reference else "sequence_classification"   # an implicit PRM is an LM
            process.model = check_model(process.model, trust_remote_code=trust, what="roles.reward.process.model",
                                        head=head)
            if process.reference:
                process.reference = check_model(process.reference, trust_remote_code=trust,
                                                what="roles.reward.process.reference", head="causal_lm")


def prepare(recipe: Recipe, *, remote: bool = False) -> Prepared | None:
    """Run every pre-Ray check of ``recipe``; raise a :class:`prefopt.errors.PrefoptError` naming the
    problem, or return what the run needs.

    ``remote=True`` (``prefopt submit``, a sweep with ``--address``): the run starts on a cluster, so
    the checks of this machine's resources and run folder are skipped, and models and data that do
    not exist here are left to the cluster (None is returned when the model is not here)."""
    from prefopt.cache import cache_dir
    from prefopt.cluster import check_local_resources
    from prefopt.config import validate_recipe
    from prefopt.errors import ConfigError
    from prefopt.io.loggers import check_logger_packages
    from prefopt.models.load import load_tokenizer
    from prefopt.objectives import get_objective

    from prefopt.algorithms import algorithm_for

    validate_recipe(recipe)
    objective_cls = get_objective(recipe.objective.name)
    algorithm = algorithm_for(recipe)
    spec = algorithm.role_spec(recipe)
    if not remote:
        check_local_resources(recipe, spec)
        check_logger_packages(recipe.output.loggers)     # the driver here logs; a cluster's job checks its own
    check_models(recipe, remote=remote)
    if remote and not (here(recipe.model.tokenizer or recipe.model.path) and here(recipe.data.path)):
        return None
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path,
                               trust_remote_code=recipe.model.trust_remote_code)
    out = Prepared(recipe=recipe, objective_cls=objective_cls, tokenizer=tokenizer, spec=spec)
    t = recipe.train
    if algorithm.reads == "prompts":
        from prefopt.data.prompts import load_prompt_splits
        from prefopt.rewards.sources import check_sources, probe_rewards
        out.prompts, out.eval_prompts = load_prompt_splits(recipe.data, tokenizer, cache_dir=cache_dir(),
                                                           held_out=t.eval_every > 0)
        check_sources(recipe.roles.reward)
        probe_rewards(recipe, out.prompts[0])
    else:
        from prefopt.data import load_preference_data
        from prefopt.data import batching
        attributes = getattr(recipe.objective, "attributes", None)
        data = load_preference_data(recipe.data, tokenizer, seed=t.seed, cache_dir=cache_dir(), attributes=attributes,
                                    kinds=objective_cls.data_kinds())
        if data.kind not in objective_cls.data_kinds():
            kinds = " or ".join(objective_cls.data_kinds())
            raise ConfigError(f"objective '{recipe.objective.name}' trains on {kinds} rows, but {data.source} holds "
                              f"{data.kind} rows")
        objective_cls.check_examples(recipe.objective, data.train, data.source)
        objective_cls.check_examples(recipe.objective, data.eval, recipe.data.eval_path or data.source)
        if attributes == [] and data.attributes:   # the heads are named by the data (saved in config.yaml)
            recipe.objective.attributes = list(data.attributes)
        out.data = data
        out.steps = batching.step_batches(len(data.train), t.batch_size, seed=t.seed, epochs=t.epochs,
                                          max_steps=t.max_steps)
        if not out.steps:
            raise ConfigError(f"train.batch_size={t.batch_size} is larger than the {len(data.train)} "
                              f"training examples")
    if remote:
        return out
    if recipe.resume:
        from prefopt.io.checkpoint import find_resume_point
        out.run_dir, out.resume_from = find_resume_point(recipe.resume, recipe.output.root, recipe.name)
    else:
        from prefopt.io.run_dir import check_run_dir
        check_run_dir(recipe)
    return out


def open_run_dir(pre: Prepared) -> tuple[Path, Path | None]:
    """After :func:`prepare` passed: create the run folder (or cut a resumed run's metrics back to
    its checkpoint) and write ``config.yaml``; returns ``(run_dir, checkpoint to resume or None)``."""
    from prefopt.io.run_dir import create_run_dir, write_config
    if pre.resume_from is not None:
        from prefopt.io.checkpoint import cut_to_checkpoint
        run_dir = pre.run_dir
        cut_to_checkpoint(run_dir, pre.resume_from)
    else:
        run_dir = create_run_dir(pre.recipe)
    write_config(run_dir, pre.recipe)
    return run_dir, pre.resume_from
