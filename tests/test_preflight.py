"""Every bad input is refused before Ray starts, by `prefopt validate` and `prefopt train` alike:
resources beyond what a local cluster may offer, models that cannot load, reward functions that
fail or return no float, data of the wrong kind; and a refused run leaves no folder behind."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.config import load_recipe
from prefopt.errors import ConfigError
from prefopt.preflight import prepare

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1


def validate(capsys, *args) -> tuple[int, str]:
    code = main(["validate", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_more_learners_than_a_local_cluster_may_offer_are_refused(capsys):
    code, text = validate(capsys, "tiny_dpo", "roles.learner.num_actors=100", "train.batch_size=800")
    assert code == 2
    assert (f"the run needs CPU=100 (roles.learner 100 x 1), but this machine has {CORES} cores and a local "
            f"cluster may offer at most ray.oversubscribe=2 x {CORES} = {2 * CORES:g} logical CPUs") in text


def test_the_oversubscription_factor_is_the_recipes_to_set(capsys):
    n = 3 * CORES
    ok = ["tiny_dpo", f"roles.learner.num_actors={n}", f"train.batch_size={8 * n}", "ray.oversubscribe=3"]
    assert validate(capsys, *ok)[0] == 0
    code, text = validate(capsys, "tiny_dpo", "ray.num_cpus=64")
    assert code == 2 and "ray.num_cpus=64, but this machine has" in text


@pytest.mark.parametrize("override,message", [
    ("roles.learner.num_gpus=1", r"the run needs GPU=2 \(roles.learner 2 x 1\), but this machine has 0 GPU"),
    ("roles.learner.resources.node_x=1", r"roles.learner asks for the custom resource\(s\) node_x"),
])
def test_resources_a_local_cluster_lacks_are_refused(override, message):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        prepare(load_recipe("tiny_dpo", [override]))


def test_a_model_folder_without_safetensors_is_refused_before_ray(tmp_path):
    from prefopt.models.tiny import builtin_model_path
    model = tmp_path / "my-model"
    shutil.copytree(builtin_model_path("tiny-llama"), model)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    out = subprocess.run([sys.executable, "-m", "prefopt.cli", "train", "tiny_dpo", f"model.path={model}",
                          f"output.root={tmp_path}/runs"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "model.path" in out.stderr and "safetensors" in out.stderr and "pytorch_model.bin" in out.stderr
    assert "starting a local Ray cluster" not in out.stderr     # refused before Ray
    assert not (tmp_path / "runs").exists()                    # and before the run folder


def test_a_builtin_typo_gets_the_builtin_names(capsys):
    code, text = validate(capsys, "tiny_dpo", "model.path=bultin:tiny-llama")
    assert code == 2 and "did you mean 'builtin:tiny-llama'?" in text


def test_flash_attention_cannot_run_without_a_gpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, text = validate(capsys, "tiny_dpo", "model.attn_implementation=flash_attention_2")
    assert code == 2 and "model.attn_implementation" in text and "sdpa" in text


REWARDS = '''
def good(prompt, response, row):
    return 0.5

def as_dict(prompt, response, row):
    return {"score": 1.0}

def broken(prompt, response, row):
    raise KeyError("answer")

def not_finite(prompt, response, row):
    return float("nan")

def steps_ok(prompt, steps, row):
    return [0.1] * len(steps)

def steps_short(prompt, steps, row):
    return [0.1]
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A user's working directory holding a reward module (`my_rewards_<test>.py`)."""
    name = f"user_rewards_{os.getpid()}_{len(list(tmp_path.parent.iterdir()))}"
    (tmp_path / f"{name}.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_a_reward_module_beside_the_user_imports_and_is_called_once(capsys, user_dir):
    code, text = validate(capsys, "tiny_grpo", f"roles.reward.sources.0.fn={user_dir}:good")
    assert code == 0 and "ok: tiny_grpo (tiny-grpo: objective ppo, 256 prompts)" in text


@pytest.mark.parametrize("fn,message", [
    ("as_dict", r"must return a float, but returned dict"),
    ("broken", r"raised KeyError: 'answer' when called on the first prompt row"),
    ("not_finite", r"returned nan on the first prompt row"),
    ("nope", r"has no function 'nope'"),
])
def test_a_bad_reward_function_is_named_with_its_source(capsys, user_dir, fn, message):
    import re
    code, text = validate(capsys, "tiny_grpo", f"roles.reward.sources.0.fn={user_dir}:{fn}")
    assert code == 2 and re.search(message, text), text
    assert f"roles.reward.sources[0]" in text or "reward fn" in text
    if fn != "nope":
        assert f"{user_dir}.py:" in text                     # the function's file and line


def test_process_reward_functions_are_probed(capsys, user_dir):
    base = ["tiny_prm"]
    assert validate(capsys, *base, f"roles.reward.process.fn={user_dir}:steps_ok")[0] == 0
    code, text = validate(capsys, *base, f"roles.reward.process.fn={user_dir}:steps_short")
    assert code == 2 and "must return one float per step" in text


def test_data_of_the_wrong_kind_is_refused(capsys):
    code, text = validate(capsys, "tiny_dpo", "data.path=synthetic:lists")
    assert code == 2 and "objective 'dpo' trains on pairs" in text


def test_a_users_folder_is_never_written_into(tmp_path):
    folder = tmp_path / "my-notes"
    folder.mkdir()
    (folder / "config.yaml").write_text("mine: true\n")
    (folder / "notes.txt").write_text("do not touch\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = subprocess.run([sys.executable, "-m", "prefopt.cli", "train", "tiny_dpo", f"output.run_dir={folder}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "prefopt did not create" in out.stderr and "Traceback" not in out.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_validate_takes_overrides_like_train_and_set_as_an_alias(capsys):
    assert validate(capsys, "tiny_dpo", "--set", "train.lr=1e-3", "objective.beta=0.2")[0] == 0
    code, text = validate(capsys, "tiny_dpo", "train.lr=nan")
    assert code == 2 and "'train.lr' must be a finite number" in text


TINY = sorted(p.name for p in (ROOT / "recipes").glob("tiny_*.yaml"))


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """An output root with a finished run of each recipe that another recipe names with `run:NAME`
    (tiny_rm_grpo, tiny_prm_model, tiny_prm_implicit, tiny_reverse_*): builtin models standing in for the
    trained ones."""
    import json
    import shutil

    from prefopt.io.run_dir import MARKER
    from prefopt.models.tiny import resolve_model_path
    root = tmp_path_factory.mktemp("runs")
    reward, policy = resolve_model_path("builtin:tiny-reward"), resolve_model_path("builtin:tiny-llama")
    for name, source, meta in [("tiny-rm-lists", reward, {"kind": "outcome", "heads": ["reward"]}),
                               ("tiny-prm-train", reward, {"kind": "process", "heads": ["step_correct"],
                                                           "step_delimiter": "."}),
                               ("tiny-dpo", policy, None), ("tiny-reverse-sft", policy, None)]:
        run = root / f"{name}-20260101-000000"
        shutil.copytree(source, run / "model")
        if meta is not None:
            config = json.loads((run / "model" / "config.json").read_text())
            (run / "model" / "config.json").write_text(json.dumps({**config, "prefopt_reward": meta}))
        (run / MARKER).write_text("{}")
        (run / "summary.json").write_text(json.dumps({"name": name}))
    return root


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_recipe_passes_the_pre_flight(name, stage_runs):
    pre = prepare(load_recipe(name, [f"output.root={stage_runs}"]))
    assert (pre.prompts if pre.prompts is not None else pre.data.train)


def test_the_python_api_example_works_from_any_folder(tmp_path, monkeypatch):
    import prefopt
    monkeypatch.chdir(tmp_path)
    recipe = prefopt.load_recipe("recipes/tiny_dpo.yaml", ["objective.beta=0.05"])
    assert recipe.objective.beta == 0.05 and recipe.name == "tiny-dpo"
    with pytest.raises(ConfigError, match=r"did you mean 'tiny_dpo.yaml'\?"):
        prefopt.load_recipe("tiny_dpp.yaml")


@pytest.mark.parametrize("override,message", [
    ("output.log_level=loud", r"'output.log_level' must be one of debug, info, warning"),
    ("ray.oversubscribe=0", r"'ray.oversubscribe' must be > 0"),
])
def test_console_and_oversubscription_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("tiny_dpo", [override])
