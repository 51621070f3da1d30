"""Recipes: every shipped recipe validates; bad recipes give errors that name the key/file."""
from pathlib import Path

import pytest

from prefopt.config import load_recipe, recipe_from_dict, recipe_to_yaml
from prefopt.errors import ConfigError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("**/*.yaml"))


def test_recipes_exist():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.objective.name
    # the resolved YAML loads back to the same recipe
    assert "objective:" in recipe_to_yaml(recipe)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
name: base
model: {path: builtin:tiny-llama}
data: {path: synthetic:pairs}
objective: {name: dpo, beta: 0.2}
roles: {reference: {}}
train: {batch_size: 8, micro_batch_size: 4}
"""


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\ntrain: {lr: 1.0e-4}\n")
    r = load_recipe(child, ["train.batch_size=16", "objective.label_smoothing=0.1"])
    assert r.name == "child"
    assert r.train.lr == pytest.approx(1e-4)
    assert r.train.batch_size == 16 and r.train.micro_batch_size == 4
    assert r.objective.beta == pytest.approx(0.2) and r.objective.label_smoothing == pytest.approx(0.1)


def test_child_switching_objective_drops_base_objective_params(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "base: base.yaml\nobjective: {name: simpo, gamma: 0.5}\n")
    r = load_recipe(child)
    assert r.objective.name == "simpo" and r.objective.gamma == pytest.approx(0.5)


def test_mistyped_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, "bad.yaml", BASE + "\n" + "train2: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'train2' \(did you mean 'train'\?\)"):
        load_recipe(p)
    p = write(tmp_path, "bad2.yaml", BASE.replace("batch_size: 8", "bach_size: 8"))
    with pytest.raises(ConfigError, match=r"unknown key 'train.bach_size' \(did you mean 'train.batch_size'\?\)"):
        load_recipe(p)


def test_mistyped_override_is_reported_as_override(tmp_path):
    p = write(tmp_path, "ok.yaml", BASE)
    with pytest.raises(ConfigError, match=r"override: unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_recipe(p, ["train.lrr=0.1"])


def test_a_replaced_key_says_what_replaces_it(tmp_path):
    p = write(tmp_path, "ok.yaml", BASE)
    with pytest.raises(ConfigError, match=r"unknown key 'output.tensorboard' \(replaced by output.loggers.*"
                                          r"output.loggers: \[\]\)"):
        load_recipe(p, ["output.tensorboard=false"])


def test_objective_params_checked_against_the_chosen_objective(tmp_path):
    p = write(tmp_path, "ok.yaml", BASE)
    with pytest.raises(ConfigError, match=r"unknown key 'objective.gama'"):
        load_recipe(p, ["objective.gama=0.5"])
    with pytest.raises(ConfigError, match=r"unknown objective.name 'dpoo' \(did you mean 'dpo'\?\)"):
        load_recipe(p, ["objective.name=dpoo"])


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "ok.yaml", BASE)
    with pytest.raises(ConfigError, match=r"train.batch_size"):
        load_recipe(p, ["train.batch_size=eight"])


def test_missing_recipe_file_and_base(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe file not found: .*nope\.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    p = write(tmp_path, "child.yaml", "base: missing_base.yaml\n")
    with pytest.raises(ConfigError, match=r"missing_base\.yaml \(referenced from .*child\.yaml\)"):
        load_recipe(p)


def test_missing_required_role_is_an_error_before_ray(tmp_path):
    p = write(tmp_path, "norole.yaml", BASE.replace("roles: {reference: {}}", ""))
    with pytest.raises(ConfigError, match=r"objective 'dpo' needs the 'reference' role"):
        load_recipe(p)


def test_missing_required_value(tmp_path):
    with pytest.raises(ConfigError, match=r"required key 'model.path'"):
        recipe_from_dict({"data": {"path": "x.jsonl"}, "roles": {"reference": {}}})


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=-8", r"'train.batch_size' must be > 0"),
    ("train.batch_size=10", r"must be a multiple of"),
    ("roles.learner.zero_stage=4", r"'roles.learner.zero_stage' must be one of 0, 1, 2, 3"),
    ("train.lr_scheduler=cosin", r"did you mean 'cosine'"),
    ("objective.beta=0", r"beta"),
])
def test_bad_values(tmp_path, override, message):
    p = write(tmp_path, "ok.yaml", BASE)
    with pytest.raises(ConfigError, match=message):
        load_recipe(p, [override])


@pytest.mark.parametrize("overrides, message", [
    (["objective.old_logprobs=engine"], r"objective.old_logprobs must be 'learner' or 'rollout'"),
    (["objective.old_logprobs=rollout", "roles.rollout.sampling.logprobs=false"],
     r"old_logprobs: rollout needs roles.rollout.sampling.logprobs: true"),
    (["objective.old_logprobs=rollout", "objective.temperature=0.7"], r"needs objective.temperature: 1.0"),
    (["objective.name=constrained_ppo", "objective.old_logprobs=rollout", "roles.rollout.sampling.logprobs=false",
      "roles.reward.sources.0.constraint=ge", "roles.reward.sources.0.threshold=0.5"],
     r"old_logprobs: rollout needs roles.rollout.sampling.logprobs"),
    (["objective.name=constrained_ppo", "objective.multiplier_kp=-1", "roles.reward.sources.0.constraint=ge",
      "roles.reward.sources.0.threshold=0.5"], r"multiplier_kp and objective.multiplier_kd must be >= 0"),
])
def test_bad_online_values(overrides, message):
    from prefopt.config import validate_recipe
    with pytest.raises(ConfigError, match=message):
        validate_recipe(load_recipe("recipes/tiny_grpo.yaml", overrides))


def test_malformed_override(tmp_path):
    p = write(tmp_path, "ok.yaml", BASE)
    with pytest.raises(ConfigError, match=r"not of the form key=value"):
        load_recipe(p, ["train.lr"])


def test_cli_validate_and_show(capsys):
    from prefopt.cli import main
    assert main(["validate", "recipes/tiny_dpo.yaml", "train.lr=1e-3"]) == 0     # models, data, resources too
    assert "ok: recipes/tiny_dpo.yaml (tiny-dpo: objective dpo, 512 / 128 train / held-out pairs)" \
        in capsys.readouterr().out
    # a paper recipe names a hub model this offline machine cannot have: its recipe alone validates
    assert main(["validate", "--recipe-only", str(RECIPES[0])]) == 0
    assert "recipe only" in capsys.readouterr().out
    assert main(["validate", str(RECIPES[0])]) == 2     # its GPUs, or (with GPUs) its hub model, are not here
    err = capsys.readouterr().err
    assert "but this machine has 0 GPU(s)" in err or "model.path: 'gpt2' is not a local folder" in err
    assert main(["show", str(RECIPES[0]), "train.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert main(["show", str(RECIPES[0]), "train.lrr=0.5"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err


def test_override_indexes_a_list_element():
    recipe = load_recipe("recipes/tiny_grpo.yaml", ["roles.reward.sources.0.weight=2.5", "train.lr=1e-3"])
    assert recipe.roles.reward.sources[0].weight == 2.5
    assert recipe.roles.reward.sources[0].fn.endswith("good_word_fraction")   # the rest of the element kept
    assert recipe.train.lr == 1e-3


@pytest.mark.parametrize("override,message", [
    ("roles.reward.sources.3.weight=1", r"has 1 entries \(indices 0..0\)"),
    ("roles.reward.sources.0.wieght=1", r"unknown key 'roles.reward.sources\[0\].wieght' \(did you mean"),
    ("train.lr.0=1", "is not a list"),
])
def test_bad_list_index_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("recipes/tiny_grpo.yaml", [override])
