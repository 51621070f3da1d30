"""Bad numbers and overrides in recipes: every one is a ConfigError that names the key and where it
was set (the file or 'override'), raised when the recipe loads or validates, never a traceback."""
import dataclasses
import math
from typing import Optional

import pytest

from prefopt.config import load_recipe, recipe_from_dict, validate_recipe
from prefopt.config_checks import check_values
from prefopt.config_schema import (DataConfig, ModelConfig, RayConfig, Recipe, ReferenceRoleConfig,
                                   RolesConfig)
from prefopt.errors import ConfigError
from prefopt.objectives import OBJECTIVES

DPO, GRPO, NM = "recipes/tiny_dpo.yaml", "recipes/tiny_grpo.yaml", "recipes/tiny_constrained_nm.yaml"

BASE = """
name: base
model: {path: builtin:tiny-llama}
data: {path: synthetic:pairs}
objective: {name: dpo, beta: 0.2}
roles: {reference: {}}
train: {batch_size: 8, micro_batch_size: 4}
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def code_recipe(**changes) -> Recipe:
    """A valid DPO recipe built in code; ``changes`` maps dotted attributes to new values."""
    recipe = Recipe(model=ModelConfig(path="builtin:tiny-llama"), data=DataConfig(path="synthetic:pairs"),
                    objective=OBJECTIVES.get("dpo").Params(), roles=RolesConfig(reference=ReferenceRoleConfig()))
    for key, value in changes.items():
        *parents, last = key.split(".")
        obj = recipe
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return recipe


# ----------------------------------------------------------------------------- 1. NaN / Inf anywhere

@pytest.mark.parametrize("recipe, override, key", [
    (DPO, "train.lr=nan", r"train\.lr"),
    (DPO, "train.lr=1e400", r"train\.lr"),                  # overflows to inf
    (DPO, "objective.beta=inf", r"objective\.beta"),
    (DPO, "objective.label_smoothing=-inf", r"objective\.label_smoothing"),
    (DPO, "data.eval_fraction=nan", r"data\.eval_fraction"),
    (DPO, "train.adam_betas=[nan, 0.9]", r"train\.adam_betas\[0\]"),
    (DPO, "train.adam_betas.1=inf", r"train\.adam_betas\[1\]"),
    (DPO, "expect.eval/loss=[nan, 1]", r"expect\.eval/loss\[0\]"),
    (DPO, "roles.learner.resources={node_a: nan}", r"roles\.learner\.resources\.node_a"),
    (DPO, "train.skip_grad_norm_above=inf", r"train\.skip_grad_norm_above"),
    (GRPO, "roles.reward.sources.0.weight=nan", r"roles\.reward\.sources\[0\]\.weight"),
    (GRPO, "roles.rollout.sampling.temperature=inf", r"roles\.rollout\.sampling\.temperature"),
    (GRPO, "objective.gamma=nan", r"objective\.gamma"),
    (GRPO, "objective.reward_clip=[-inf, 1]", r"objective\.reward_clip\[0\]"),
    (NM, "objective.nelder_mead.initial_step=nan", r"objective\.nelder_mead\.initial_step"),
])
def test_non_finite_override_names_key_and_override(recipe, override, key):
    with pytest.raises(ConfigError, match=rf"^override: '{key}' must be a finite number, got -?(nan|inf)"):
        load_recipe(recipe, [override])


def test_non_finite_value_in_a_file_names_that_file(tmp_path):
    write(tmp_path, "base.yaml", BASE.replace("batch_size: 8,", "batch_size: 8, lr: .nan,"))
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: 'train\.lr' must be a finite number, got nan"):
        load_recipe(child)
    bad_child = write(tmp_path, "child2.yaml", "base: base.yaml\ntrain: {lr: .inf}\ndata: {eval_fraction: .nan}\n")
    with pytest.raises(ConfigError, match=r"child2\.yaml: '(train\.lr|data\.eval_fraction)' must be a finite"):
        load_recipe(bad_child)
    # an objective parameter (its Params check their range when built: NaN must still read as NaN)
    p = write(tmp_path, "obj.yaml", BASE.replace("beta: 0.2", "beta: .nan"))
    with pytest.raises(ConfigError, match=r"obj\.yaml: 'objective\.beta' must be a finite number, got nan"):
        load_recipe(p)
    # a later override wins, and is named
    with pytest.raises(ConfigError, match=r"^override: 'train\.lr' must be a finite number, got inf"):
        load_recipe(child, ["train.lr=inf"])


@pytest.mark.parametrize("changes, key", [
    ({"train.lr": math.nan}, r"train\.lr"),
    ({"train.adam_betas": [0.9, math.inf]}, r"train\.adam_betas\[1\]"),
    ({"objective.beta": math.inf}, r"objective\.beta"),
    ({"expect": {"eval/loss": [0.0, math.nan]}}, r"expect\.eval/loss\[1\]"),
    ({"data.eval_fraction": -math.inf}, r"data\.eval_fraction"),
])
def test_validate_recipe_checks_a_recipe_built_in_code(changes, key):
    validate_recipe(code_recipe())   # the unchanged recipe is valid
    with pytest.raises(ConfigError, match=rf"^recipe: '{key}' must be a finite number"):
        validate_recipe(code_recipe(**changes))


def test_recipe_from_dict_names_its_origin():
    data = {"model": {"path": "builtin:tiny-llama"}, "data": {"path": "synthetic:pairs"}, "roles": {"reference": {}},
            "train": {"warmup_ratio": float("nan")}}
    with pytest.raises(ConfigError, match=r"^ablation: 'train\.warmup_ratio' must be a finite number"):
        recipe_from_dict(data, origin="ablation")


def test_reward_source_weight_nan_in_code():
    from prefopt.config_schema import RewardRoleConfig, RewardSourceConfig
    recipe = load_recipe(GRPO)
    recipe.roles.reward = RewardRoleConfig(sources=[RewardSourceConfig(fn="a:b"), RewardSourceConfig(fn="a:c")])
    recipe.roles.reward.sources[1].weight = math.nan
    with pytest.raises(ConfigError, match=r"'roles\.reward\.sources\[1\]\.weight' must be a finite number"):
        validate_recipe(recipe)


# ----------------------------------------------------------------------------- 2. timeouts

@pytest.mark.parametrize("value", ["-1", "0", "-0.5"])
def test_call_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match=r"^override: 'ray\.call_timeout_s' must be > 0 \(seconds\)"):
        load_recipe(DPO, [f"ray.call_timeout_s={value}"])


def test_timeout_in_a_file_and_in_code(tmp_path):
    p = write(tmp_path, "t.yaml", BASE + "ray: {call_timeout_s: -5}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: 'ray\.call_timeout_s' must be > 0"):
        load_recipe(p)
    with pytest.raises(ConfigError, match=r"'ray\.call_timeout_s' must be > 0"):
        validate_recipe(code_recipe(ray=RayConfig(call_timeout_s=0)))


def test_any_field_named_timeout_is_checked():
    @dataclasses.dataclass
    class Inner:
        poll_timeout_s: Optional[float] = None
        timeout: int = 5

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        items: list = dataclasses.field(default_factory=list)

    check_values(Outer(), lambda key: "here")                       # None: unset, fine
    with pytest.raises(ConfigError, match=r"^here: 'inner\.poll_timeout_s' must be > 0 \(seconds\), got -1"):
        check_values(Outer(Inner(poll_timeout_s=-1)), lambda key: "here")
    with pytest.raises(ConfigError, match=r"'inner\.timeout' must be > 0"):
        check_values(Outer(Inner(timeout=0)), lambda key: "here")


# ----------------------------------------------------------------------------- 3. data ranges

@pytest.mark.parametrize("override, message", [
    ("data.eval_fraction=1", r"'data\.eval_fraction' must be in \[0, 1\), got 1\.0"),
    ("data.eval_fraction=-0.1", r"'data\.eval_fraction' must be in \[0, 1\), got -0\.1"),
    ("data.max_length=0", r"'data\.max_length' must be > 0, got 0"),
    ("data.max_prompt_length=-1", r"'data\.max_prompt_length' must be > 0, got -1"),
    ("data.max_eval_examples=-1", r"'data\.max_eval_examples' must be >= 0"),
])
def test_data_ranges_fail_at_load_time(override, message):
    with pytest.raises(ConfigError, match=rf"^override: {message}"):
        load_recipe(DPO, [override])


def test_data_ranges_in_code():
    validate_recipe(code_recipe(**{"data.eval_fraction": 0.0}))
    with pytest.raises(ConfigError, match=r"^recipe: 'data\.eval_fraction' must be in \[0, 1\)"):
        validate_recipe(code_recipe(**{"data.eval_fraction": 1.5}))


# ----------------------------------------------------------------------------- 4. ray.env

@pytest.mark.parametrize("yaml_value, message", [
    ("1", r"'ray\.env\.OMP_NUM_THREADS' must be a string, got int 1: quote it in YAML, "
          r"e\.g\. `ray\.env\.OMP_NUM_THREADS: '1'`"),
    ("1.5", r"'ray\.env\.OMP_NUM_THREADS' must be a string, got float 1\.5"),
    ("true", r"'ray\.env\.OMP_NUM_THREADS' must be a string, got bool True: .*'true'"),
    ("", r"'ray\.env\.OMP_NUM_THREADS' must be a string, got null"),
    ("{a: 1}", r"'ray\.env\.OMP_NUM_THREADS' must be a string .*got a mapping"),
    ("[1, 2]", r"'ray\.env\.OMP_NUM_THREADS' must be a string .*got a list"),
])
def test_non_string_env_value_in_yaml_is_refused(tmp_path, yaml_value, message):
    p = write(tmp_path, "env.yaml", BASE + f"ray: {{env: {{OMP_NUM_THREADS: {yaml_value}}}}}\n")
    with pytest.raises(ConfigError, match=rf"env\.yaml: {message}"):
        load_recipe(p)


def test_quoted_env_value_in_yaml_is_accepted(tmp_path):
    p = write(tmp_path, "env.yaml", BASE + "ray: {env: {OMP_NUM_THREADS: '1', EMPTY: ''}}\n")
    assert load_recipe(p).ray.env == {"OMP_NUM_THREADS": "1", "EMPTY": ""}


def test_env_override_keeps_the_text():
    r = load_recipe(DPO, ["ray.env.OMP_NUM_THREADS=1", "ray.env.FLAG=true", "ray.env.ZEROS=007",
                          "ray.env.QUOTED='x y'", "ray.env.EMPTY=", "ray.env.HEX=0x1F", "ray.env.PATHS=/a:/b"])
    assert r.ray.env == {"OMP_NUM_THREADS": "1", "FLAG": "true", "ZEROS": "007", "QUOTED": "x y", "EMPTY": "",
                         "HEX": "0x1F", "PATHS": "/a:/b"}


@pytest.mark.parametrize("override, message", [
    ("ray.env.X={a: 1}", r"'ray\.env\.X' must be a string .*got a mapping"),
    ("ray.env.X=[1]", r"'ray\.env\.X' must be a string .*got a list"),
    ("ray.env.X=null", r"'ray\.env\.X' must be a string, got null"),
    ("ray.env.A.B=1", r"'ray\.env\.A' must be a string .*got a mapping"),
    ("ray.env={X: 1}", r"'ray\.env\.X' must be a string, got int 1: set it as `ray\.env\.X=1`"),
    ("ray.env={'A=B': x}", r"'ray\.env\.A=B' is not a valid environment variable name"),
    ("ray.env={'': x}", r"'ray\.env\.' is not a valid environment variable name"),
    ("ray.env=5", r"'ray\.env' must be a mapping"),
    ("ray.env=[A]", r"'ray\.env' must be a mapping"),
])
def test_bad_env_override_is_refused(override, message):
    with pytest.raises(ConfigError, match=rf"^override: {message}"):
        load_recipe(DPO, [override])


def test_bad_env_in_code():
    with pytest.raises(ConfigError, match=r"^recipe: 'ray\.env\.OMP_NUM_THREADS' must be a string, got int 1"):
        validate_recipe(code_recipe(ray=RayConfig(env={"OMP_NUM_THREADS": 1})))
    with pytest.raises(ConfigError, match=r"'ray\.env\.A=B' is not a valid environment variable name"):
        validate_recipe(code_recipe(ray=RayConfig(env={"A=B": "1"})))


# ----------------------------------------------------------------------------- 5. list indices

def test_index_override_of_a_default_list_updates_the_default():
    assert load_recipe(DPO, ["train.adam_betas.0=0.8"]).train.adam_betas == [0.8, 0.999]
    assert load_recipe(DPO, ["train.adam_betas[1]=0.99"]).train.adam_betas == [0.9, 0.99]   # the key form errors use


def test_index_override_of_a_list_set_in_a_base_file(tmp_path):
    write(tmp_path, "base.yaml", BASE.replace("micro_batch_size: 4", "micro_batch_size: 4, adam_betas: [0.5, 0.6]"))
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\n")
    assert load_recipe(child, ["train.adam_betas.1=0.7"]).train.adam_betas == [0.5, 0.7]


@pytest.mark.parametrize("recipe, override, message", [
    (DPO, "train.adam_betas.5=0.1",
     r"^override: index 5 of 'train\.adam_betas' is out of range: 'train\.adam_betas' has 2 entries \(indices 0\.\.1\)"),
    (DPO, "roles.reward.sources.0.weight=2",
     r"^override: index 0 of 'roles\.reward\.sources' is out of range: 'roles\.reward\.sources' has 0 entries"),
    (DPO, "train.lr.0=1", r"^override: 'train\.lr' is not a list, so 'train\.lr\.0' cannot index it"),
    (DPO, "train.debug_nan_steps.0=1", r"'train\.debug_nan_steps' has 0 entries"),
    (GRPO, "objective.reward_clip.0=1", r"^override: 'objective\.reward_clip' is not a list, .*null"),
    (GRPO, "roles.reward.sources.x=1", r"^override: 'roles\.reward\.sources' is a list: .*'roles\.reward\.sources\.0'"),
    (GRPO, "roles.reward.sources.-1.weight=1", r"^override: 'roles\.reward\.sources' is a list"),
    (DPO, "expect.x.0=1", r"^override: 'expect\.x' is not a list"),
])
def test_bad_index_overrides(recipe, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe, [override])


def test_index_into_a_null_section(tmp_path):
    p = write(tmp_path, "r.yaml", BASE.replace("roles: {reference: {}}", "roles: {reference: {}, reward: }"))
    with pytest.raises(ConfigError, match=r"^override: index 0 of 'roles\.reward\.sources' is out of range"):
        load_recipe(p, ["roles.reward.sources.0.weight=2"])


# ----------------------------------------------------------------------------- 6. other bad inputs

@pytest.mark.parametrize("recipe, override, message", [
    (DPO, "train.batch_size=1e3", r"^override: invalid value for 'train\.batch_size'"),
    (DPO, "train.batch_size=true", r"^override: invalid value for 'train\.batch_size'"),
    (DPO, "train.batch_size=8.5", r"^override: invalid value for 'train\.batch_size'"),
    (DPO, "name=", r"^override: 'name' must not be null \(an override 'key=' with nothing after '=' sets null\)"),
    (DPO, "model.path=null", r"^override: 'model\.path' must not be null"),
    (DPO, "model.path=???", r"^override: required key 'model\.path' is not set"),
    (DPO, "objective.name=[a]", r"^override: 'objective\.name' must be a string naming an objective"),
    (DPO, "objective.name={a: 1}", r"^override: 'objective\.name' must be a string"),
    (DPO, "objective.name=null", r"^override: 'objective\.name' must be a string"),
    (DPO, "objective=5", r"^override: 'objective' must be a mapping"),
    (DPO, "objective.beta=[1]", r"^override: 'objective\.beta' must be a number, got \[1\]"),
    (DPO, "objective.beta=0", r"^override: objective\.beta must be > 0"),
    (DPO, "train.adam_betas=[1,2,3]", r"^override: 'train\.adam_betas' needs two values"),
    (DPO, "train.adam_betas=[0.9, 1.5]", r"^override: 'train\.adam_betas\[1\]' must be in \[0, 1\)"),
    (DPO, "train.adam_betas=5", r"^override: 'train\.adam_betas' must be a list, got 5"),
    (DPO, "train.adam_betas={a: 1}", r"^override: 'train\.adam_betas' is a list"),
    (DPO, "train.adam_betas=null", r"^override: 'train\.adam_betas' must not be null"),
    (DPO, "roles.learner.num_actors=-1", r"^override: 'roles\.learner\.num_actors' must be > 0, got -1"),
    (DPO, "roles.learner.num_cpus=-1", r"^override: 'roles\.learner\.num_cpus' must be >= 0"),
    (DPO, "roles.learner.resources={GPU: -1}", r"^override: 'roles\.learner\.resources\.GPU' must be >= 0"),
    (DPO, "roles.learner.resources=[1]", r"^override: 'roles\.learner\.resources' must be a mapping"),
    (DPO, "train=5", r"^override: 'train' must be a mapping of TrainConfig keys"),
    (DPO, "roles.reference=1", r"^override: 'roles\.reference' must be a mapping of ReferenceRoleConfig keys"),
    (DPO, "roles=null", r"^override: 'roles' must not be null"),
    (DPO, "roles.reference=null", r"^override: objective 'dpo' needs the 'reference' role"),
    (DPO, "roles.reference.num_actors=0", r"^override: 'roles\.reference\.num_actors' must be > 0"),
    (DPO, "expect=[1]", r"^override: 'expect' must be a mapping"),
    (DPO, "expect.x=[1]", r"^override: 'expect\.x' must be \[low, high\]"),
    (DPO, "train.lr=-1", r"^override: 'train\.lr' must be > 0"),
    (DPO, "train.warmup_ratio=1", r"^override: 'train\.warmup_ratio' must be in \[0, 1\)"),
    (DPO, "train.weight_decay=-0.1", r"^override: 'train\.weight_decay' must be >= 0"),
    (DPO, "train.adam_eps=0", r"^override: 'train\.adam_eps' must be > 0"),
    (DPO, "train.log_every=0", r"^override: 'train\.log_every' must be > 0"),
    (DPO, "train.eval_every=-1", r"^override: 'train\.eval_every' must be >= 0"),
    (DPO, "train.skip_grad_norm_above=0", r"^override: 'train\.skip_grad_norm_above' must be > 0"),
    (DPO, "train.debug_nan_steps=[-1]", r"^override: 'train\.debug_nan_steps\[0\]' must be >= 0"),
    (DPO, "output.keep_checkpoints=-1", r"^override: 'output\.keep_checkpoints' must be >= 0"),
    (DPO, "output.checkpoint_every=-2", r"^override: 'output\.checkpoint_every' must be >= 0"),
    (DPO, "output=5", r"^override: 'output' must be a mapping"),
    (DPO, "ray.num_cpus=-1", r"^override: 'ray\.num_cpus' must be >= 0"),
    (DPO, "data.synthetic.num_rows=0", r"^override: 'data\.synthetic\.num_rows' must be > 0"),
    (DPO, "resume=[1]", r"^override: 'resume' must be a string"),
    (DPO, "base=other.yaml", r"^override: 'base' names the recipe a recipe file extends"),
    (DPO, "train..lr=1", r"override 'train\.\.lr=1': 'train\.\.lr' is not a valid key"),
    (DPO, "train.adam_betas=[0.9,0.99],[0.8,0.9]", r"cannot parse override 'train\.adam_betas="),
    (DPO, "name={", r"cannot parse override 'name=\{'"),
    (GRPO, "roles.rollout.sampling.n=0", r"^override: 'roles\.rollout\.sampling\.n' must be > 0"),
    (GRPO, "train.prompts_per_iteration=0", r"^override: 'train\.prompts_per_iteration' must be > 0"),
    (GRPO, "train.iterations=0", r"^override: 'train\.iterations' must be > 0"),
    (GRPO, "roles.rollout.engines=0", r"^override: 'roles\.rollout\.engines' must be > 0"),
    (GRPO, "roles.rollout.sampling.top_p=0", r"^override: 'roles\.rollout\.sampling\.top_p' must be in \(0, 1\]"),
    (GRPO, "roles.rollout.gpu_memory_utilization=1.5", r"'roles\.rollout\.gpu_memory_utilization' must be in"),
    (GRPO, "roles.rollout.sampling.min_tokens=1000", r"^override: 'roles\.rollout\.sampling\.min_tokens' \(1000\)"),
    (GRPO, "roles.rollout.sampling.stop=5", r"^override: 'roles\.rollout\.sampling\.stop' must be a list"),
    (GRPO, "roles.rollout.max_restarts=-1", r"^override: 'roles\.rollout\.max_restarts' must be >= 0"),
    (GRPO, "roles.rollout=null", r"^override: objective 'ppo' needs the 'rollout' role"),
    (GRPO, "roles.reward.sources=[1]", r"^override: 'roles\.reward\.sources\[0\]' must be a mapping"),
    (GRPO, "roles.reward.sources.0=5", r"^override: 'roles\.reward\.sources\[0\]' must be a mapping"),
    (GRPO, "roles.reward.sources.0.num_gpus=-1", r"^override: 'roles\.reward\.sources\[0\]\.num_gpus' must be >= 0"),
    (GRPO, "objective.advantage=gaee", r"^override: 'objective\.advantage' must be one of .*did you mean 'gae'"),
    (GRPO, "roles.critic.lr=0", r"^override: 'roles\.critic\.lr' must be > 0"),
    (GRPO, "roles.critic.num_actors=0", r"^override: 'roles\.critic\.num_actors' must be > 0"),
    (NM, "objective.nelder_mead=5", r"^override: 'objective\.nelder_mead' must be a mapping"),
])
def test_adversarial_overrides_are_config_errors(recipe, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe, [override])


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=1", "train.lr.x=2"], r"override 'train\.lr\.x=2' conflicts with an earlier override of 'train\.lr'"),
    (["train.lr.x=2", "train.lr=1"], r"override 'train\.lr=1' conflicts with an earlier override of a key under"),
    (["roles.reward=null", "roles.reward.sources.0.weight=2"], r"conflicts with an earlier override of 'roles\.reward'"),
])
def test_conflicting_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(GRPO, overrides)


@pytest.mark.parametrize("text, message", [
    ("train: [1, 2]", r"'train' must be a mapping of TrainConfig keys"),
    ("objective: [dpo]", r"'objective' must be a mapping"),
    ("expect: {x: 5}", r"invalid value for 'expect\.x'"),
    ("roles: {learner: {resources: {GPU: x}}}", r"invalid value for 'roles\.learner\.resources\.GPU'"),
])
def test_bad_shapes_in_a_file_name_the_file(tmp_path, text, message):
    section = text.split(":")[0] + ":"
    kept = [line for line in BASE.splitlines() if not line.startswith(section)]
    p = write(tmp_path, "bad.yaml", "\n".join(kept + [text]) + "\n")
    with pytest.raises(ConfigError, match=rf"bad\.yaml: {message}"):
        load_recipe(p)


@pytest.mark.parametrize("changes, message", [
    ({"train.batch_size": "8"}, r"'train\.batch_size' must be an integer, got str '8'"),
    ({"train.adam_betas": (0.9, 0.99)}, r"'train\.adam_betas' must be a list"),
    ({"roles": None}, r"'roles' must be set, got null"),
    ({"objective": {"name": "dpo"}}, r"'objective' must be the Params dataclass of a registered objective"),
    ({"train.precision": 16}, r"'train\.precision' must be a string"),
])
def test_wrong_types_in_code_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=rf"^recipe: {message}"):
        validate_recipe(code_recipe(**changes))


def test_good_overrides_still_work():
    r = load_recipe(GRPO, [" train.lr =1e-3", "roles.reward.sources.0.weight=2 ", "ray.num_cpus=0",
                           "objective.reward_clip=[-1, 1]", "train.max_steps=-1"])
    assert r.train.lr == 1e-3 and r.roles.reward.sources[0].weight == 2.0
    assert r.objective.reward_clip == [-1.0, 1.0]


@pytest.mark.parametrize("override, key", [
    ("train.lr=1" + "0" * 400, r"train\.lr"),
    ("train.adam_betas=[1" + "0" * 400 + ", 0.9]", r"train\.adam_betas\[0\]"),
    ("roles.learner.resources={GPU: 1" + "0" * 400 + "}", r"roles\.learner\.resources\.GPU"),
    ("objective.beta=1" + "0" * 400, r"objective\.beta"),
])
def test_integer_too_large_for_a_float(override, key):
    with pytest.raises(ConfigError, match=rf"^override: '{key}' must be a finite number, got an integer too large"):
        load_recipe(DPO, [override])


@pytest.mark.parametrize("value", ["5", "[a.yaml]", "{a: 1}", "true"])
def test_non_string_base_names_the_file(tmp_path, value):
    p = write(tmp_path, "child.yaml", f"base: {value}\nname: child\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: 'base' must be the path or name of the recipe"):
        load_recipe(p)


def test_interpolated_non_finite_value_is_caught(tmp_path):
    p = write(tmp_path, "i.yaml", BASE.replace("micro_batch_size: 4", "micro_batch_size: 4, lr: '${oc.decode:\"nan\"}'"))
    with pytest.raises(ConfigError, match=r"'train\.lr' must be a finite number|invalid value for 'train\.lr'"):
        load_recipe(p)
