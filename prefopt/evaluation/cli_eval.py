"""``prefopt eval``: generate with vLLM for a prompt set, score with reward sources, compare with a baseline.

Everything that can be refused is checked before Ray starts (:mod:`prefopt.evaluation.inputs`, the
prompt file as :func:`prefopt.data.prompts.load_prompts` reads it, one call of each reward function).
Then on an embedded local Ray cluster (or the one in ``RAY_ADDRESS``; a Ray connection that already
exists is reused): one vLLM engine per model, :class:`prefopt.roles.rollout.RolloutWorker` actors in
an :class:`prefopt.roles.engines.EngineGroup` as in training. The model's and the baseline's engines
start and generate at the same time (one CPU each; with ``num_gpus`` per engine they run one after
the other, since they may share a GPU); a baseline that is the model's own checkpoint shares its
samples. Reward models are ``RewardModelWorker`` actors (loading while the engines generate),
combined with the reward functions by :class:`prefopt.rewards.sources.SequenceRewards`, as in the
online loop. The numbers come from :func:`prefopt.evaluation.report.summarize`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefopt.errors import PrefoptError


@dataclass
class EvalResult:
    out_dir: Path
    summary: dict                         # what summary.json holds
    records: list[dict] = field(default_factory=list)   # what samples.jsonl holds

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary["metrics"]


def evaluate(model: str, prompts: str, rewards: list[str], *, baseline: str | None = None, n: int = 1,
             temperature: float = 0.0, max_tokens: int = 256, out: str | None = None, split: str = "train",
             prompt_field: str = "prompt", max_prompt_length: int = 256, max_prompts: int | None = None,
             seed: int = 0, attribute_weights: dict[str, float] | None = None, num_gpus: float = 0.0,
             runs_root: str = "runs", trust_remote_code: bool = False, force: bool = False) -> EvalResult:
    """Evaluate ``model`` (and ``baseline``) on ``prompts`` with the reward sources ``rewards``; write
    ``OUT/summary.json`` and ``OUT/samples.jsonl`` (docs/evaluation.md). Arguments as the CLI's."""
    from prefopt import console
    from prefopt.cache import cache_dir
    from prefopt.config_schema import DataConfig, RolloutRoleConfig, SamplingConfig
    from prefopt.data.prompts import load_prompts
    from prefopt.evaluation import inputs
    from prefopt.models.load import load_tokenizer
    console.status("checking the models, prompts and reward sources")
    inputs.check_options(n, temperature, max_tokens, max_prompt_length, max_prompts)
    models = [inputs.resolve_model(model, runs_root, "MODEL", trust_remote_code)]
    if baseline is not None:
        models.append(inputs.resolve_model(baseline, runs_root, "--baseline", trust_remote_code))
    for m, what in zip(models, ("MODEL", "--baseline")):
        inputs.check_context(m, max_prompt_length + max_tokens, what)
    out_dir = inputs.out_dir(out, models[0], force)
    reward_cfg = inputs.reward_role(rewards, runs_root, attribute_weights, trust_remote_code)
    data = DataConfig(path=prompts, split=split, prompt_field=prompt_field, max_prompt_length=max_prompt_length)
    tokenizers = [load_tokenizer(m.path, trust_remote_code=trust_remote_code) for m in models]
    prompt_sets, source = [], None
    for tokenizer in tokenizers:    # each model reads the prompts through its own tokenizer (and chat template)
        loaded = load_prompts(data, tokenizer, cache_dir=cache_dir())
        prompt_sets.append(loaded.prompts[:max_prompts])
        source = loaded.source
    rollout = RolloutRoleConfig(engines=1, num_gpus=num_gpus, max_model_len=max_prompt_length + max_tokens,
                                sampling=SamplingConfig(n=n, temperature=temperature, max_tokens=max_tokens,
                                                        seed=seed, logprobs=False))
    recipe = _recipe(models[0].path, rollout, reward_cfg, data, runs_root, trust_remote_code, seed)
    from prefopt.rewards.sources import probe_rewards
    probe_rewards(recipe, prompt_sets[0][0])
    spec = _spec(recipe, len({m.path for m in models}), num_gpus)
    from prefopt.cluster import check_local_resources
    check_local_resources(recipe, spec)

    timings: dict[str, float] = {}
    scored = _run(recipe, spec, models, tokenizers, prompt_sets, timings)
    from prefopt.evaluation.report import summarize
    metrics, records = summarize([p["prompt_text"] for p in prompt_sets[0] for _ in range(n)],
                                 scored[0].responses, scored[0].rewards, scored[0].components, scored[0].lengths,
                                 max_tokens, baseline=scored[1] if baseline is not None else None)
    records = [{"prompt_index": i // n, "sample": i % n, **r} for i, r in enumerate(records)]
    summary = {"model": model, "model_path": models[0].path,
               "baseline": baseline, "baseline_path": models[1].path if baseline is not None else None,
               "prompts": prompts, "prompts_source": source, "split": split, "num_prompts": len(prompt_sets[0]),
               "n": n, "temperature": temperature, "max_tokens": max_tokens, "max_prompt_length": max_prompt_length,
               "seed": seed, "rewards": list(rewards),
               "reward_sources": [_source_label(i, s) for i, s in enumerate(reward_cfg.sources)],
               "metrics": metrics, "time_s": timings}
    _write(out_dir, summary, records, force)
    return EvalResult(out_dir=out_dir, summary=summary, records=records)


def _source_label(i: int, src) -> dict:
    from prefopt.rewards.sources import source_name
    return {"name": source_name(i, src), "weight": src.weight, **({"fn": src.fn} if src.fn else {"model": src.model})}


def _recipe(model_path: str, rollout, reward_cfg, data, runs_root: str, trust_remote_code: bool, seed: int):
    """The recipe the role code reads (engines, reward actors, resource checks); never a training run."""
    from prefopt.config_schema import ModelConfig, OutputConfig, Recipe, RolesConfig, TrainConfig
    return Recipe(name="eval", model=ModelConfig(path=model_path, trust_remote_code=trust_remote_code), data=data,
                  roles=RolesConfig(rollout=rollout, reward=reward_cfg), train=TrainConfig(seed=seed),
                  output=OutputConfig(root=runs_root), objective={"name": "eval"})


def _spec(recipe, engines: int, num_gpus: float):
    """The actors of an evaluation: the engines that run at once (one per distinct model on CPU, one
    with GPUs) and a reward-model actor per model source; no learners."""
    from prefopt.config_schema import LearnerRoleConfig
    from prefopt.roles.spec import RoleSpec
    rollout = dataclasses.replace(recipe.roles.rollout, engines=1 if num_gpus else engines)
    models = [(f"--reward {s.model}", s) for s in recipe.roles.reward.sources if not s.fn]
    return RoleSpec(policy=LearnerRoleConfig(num_actors=0), rollout=rollout, reward_models=models)


def _run(recipe, spec, models, tokenizers, prompt_sets, timings: dict) -> list:
    """Start Ray, generate with every model, score every response; always release what was started.
    Returns one :class:`~prefopt.evaluation.report.Responses` per model."""
    from prefopt import console
    from prefopt.cluster import init_ray_for, release
    started = init_ray_for(recipe, spec)
    reward_actors: dict = {}
    try:
        # the reward models load while the engines start and generate (actors start without waiting)
        reward_actors = start_reward_models(recipe.roles.reward, recipe.model.trust_remote_code)
        generations = _generate(recipe, models, prompt_sets, parallel=not recipe.roles.rollout.num_gpus,
                                timings=timings)
        console.status(f"scoring {sum(len(s) for g in generations for s in g)} responses")
        start = time.perf_counter()
        scored = _score(recipe, reward_actors, tokenizers, prompt_sets, generations)
        timings["reward"] = time.perf_counter() - start
        return scored
    finally:
        import ray
        for actor in reward_actors.values():
            ray.kill(actor)
        release(None, started)


def start_reward_models(reward_cfg, trust_remote_code: bool) -> dict:
    """A ``RewardModelWorker`` actor per model source of ``reward_cfg`` (source index -> actor), with
    the source's resources, as the online run's roles start them."""
    import ray

    from prefopt.rewards.sources import model_paths
    from prefopt.roles.reward_model import RewardModelWorker
    actors = {}
    for i, src in enumerate(reward_cfg.sources):
        if not src.fn:
            cls = ray.remote(num_cpus=src.num_cpus, num_gpus=src.num_gpus)(RewardModelWorker)
            actors[i] = cls.remote(model_paths(src), trust_remote_code=trust_remote_code, batch_tokens=src.batch_tokens)
    return actors


def _generate(recipe, models, prompt_sets, *, parallel: bool, timings: dict) -> list[list[dict]]:
    """Per model, per prompt, its ``sampling.n`` samples as the engines return them (``{"response_ids",
    "finish_reason", ...}``). ``parallel``: every model's engine starts and generates at once. A
    baseline that is the model's own checkpoint shares its samples (the same engine settings and seed
    sample the same tokens)."""
    from prefopt import console
    from prefopt.roles.engines import EngineGroup
    sampling = recipe.roles.rollout.sampling
    start = time.perf_counter()
    unique = list({m.path: (m, ps) for m, ps in zip(models, prompt_sets)}.values())
    by_path, groups = {}, []
    try:
        while len(by_path) < len(unique):
            batch = unique[len(by_path):] if parallel else unique[len(by_path):len(by_path) + 1]
            console.status(f"starting {len(batch)} vLLM engine{'s' if len(batch) > 1 else ''} "
                           f"({', '.join(m.shown for m, _ in batch)}); generating for {len(batch[0][1])} prompts")
            current = [EngineGroup(dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=m.path)))
                       for m, _ in batch]
            groups += current
            refs = [g.submit([p["prompt_ids"] for p in ps], sampling, seed=sampling.seed)
                    for g, (_, ps) in zip(current, batch)]
            for (m, _), g, r in zip(batch, current, refs):
                by_path[m.path] = g.collect(r)
            while groups:
                groups.pop().kill()
    finally:
        for g in groups:           # after an error
            g.kill()
    timings["generate"] = time.perf_counter() - start
    return [by_path[m.path] for m in models]


def _score(recipe, reward_actors: dict, tokenizers, prompt_sets, generations) -> list:
    """Each model's samples decoded with its own tokenizer and scored (:func:`score_generations`)."""
    from prefopt.evaluation.scoring import score_generations
    from prefopt.rewards.sources import NonFiniteReward, SequenceRewards
    rewards = SequenceRewards(recipe.roles.reward, reward_actors, timeout_s=recipe.ray.call_timeout_s,
                              prompt_field=recipe.data.prompt_field)
    try:
        return [score_generations(rewards, tokenizer, prompts, gens)[1]
                for tokenizer, prompts, gens in zip(tokenizers, prompt_sets, generations)]
    except NonFiniteReward as e:
        raise PrefoptError(f"a reward source gave a non-finite reward: {e}") from None


def _write(out_dir: Path, summary: dict, records: list[dict], force: bool) -> None:
    """``samples.jsonl``, then ``summary.json`` (its presence marks a finished evaluation); atomic, never
    over existing files unless ``force``."""
    from prefopt.curation import write_rows, write_text
    write_rows(records, out_dir / "samples.jsonl", force)
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n", force)
