"""prefopt.models.check.check_model: a model that cannot load is refused on the driver with one
clear ConfigError naming the recipe key, the path and the fix (fake model folders in tmp_path)."""
import json
import shutil
import time
from pathlib import Path

import pytest

from prefopt.errors import ConfigError
from prefopt.models import check as check_mod
from prefopt.models.check import check_model
from prefopt.models.tiny import builtin_model_path

BUILTINS = "builtin:tiny-llama"


@pytest.fixture(scope="module")
def tiny() -> Path:
    return builtin_model_path("tiny-llama")


@pytest.fixture(scope="module")
def tiny_reward() -> Path:
    return builtin_model_path("tiny-reward")


@pytest.fixture
def model_dir(tmp_path, tiny) -> Path:
    """A valid copy of the builtin tiny model, to break."""
    return Path(shutil.copytree(tiny, tmp_path / "m"))


def refused(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        check_model(*args, **kwargs)
    err = info.value
    assert err.__cause__ is None and err.__suppress_context__ or err.__context__ is None  # no chained traceback
    return str(err)


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------- valid models

def test_builtin_and_copied_folder_pass(tiny, model_dir, monkeypatch):
    assert check_model(BUILTINS) == str(tiny)
    assert check_model(str(model_dir)) == str(model_dir)
    monkeypatch.chdir(model_dir.parent)
    assert check_model("m") == str(model_dir)            # relative paths come back absolute
    assert check_model("./m", tokenizer=BUILTINS) == str(model_dir)


def test_check_is_cheap_and_never_loads_weights(tiny, monkeypatch):
    import safetensors
    import transformers

    def boom(*a, **k):
        raise AssertionError("check_model loaded weights")

    check_model(BUILTINS)   # warm: imports, tokenizer built
    for auto in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification"):
        monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", boom)
    monkeypatch.setattr(safetensors, "safe_open", boom)
    start = time.perf_counter()
    check_model(BUILTINS)
    assert time.perf_counter() - start < 1.0


def test_reward_and_critic_heads_pass(tiny, tiny_reward):
    what = "roles.reward.sources[0].model"
    assert check_model("builtin:tiny-reward", head="sequence_classification", what=what) == str(tiny_reward)
    assert check_model(BUILTINS, head="token_classification", what="roles.critic.path") == str(tiny)


def test_unknown_head_is_a_programming_error():
    with pytest.raises(ValueError, match="head"):
        check_model(BUILTINS, head="value")


# ------------------------------------------------------------------------------- 1. files

def test_pickled_weights_only(model_dir):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    msg = refused(str(model_dir))
    assert "model.path" in msg and str(model_dir) in msg and "pytorch_model.bin" in msg
    assert "safetensors only" in msg and "save_pretrained(dir, safe_serialization=True)" in msg


def test_no_weights_at_all(model_dir):
    (model_dir / "model.safetensors").unlink()
    msg = refused(str(model_dir), what="roles.critic.path", head="token_classification")
    assert "roles.critic.path" in msg and str(model_dir) in msg and "no model weights" in msg


def test_safetensors_under_another_name(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "consolidated.safetensors")
    msg = refused(str(model_dir))
    assert "consolidated.safetensors" in msg and "model.safetensors.index.json" in msg


def test_no_config_json(model_dir):
    (model_dir / "config.json").unlink()
    msg = refused(str(model_dir))
    assert "model.path" in msg and str(model_dir) in msg and "no config.json" in msg and BUILTINS in msg


def test_run_directory_points_at_its_model_folder(tmp_path, tiny):
    run = tmp_path / "run"
    shutil.copytree(tiny, run / "model")
    msg = refused(str(run))
    assert "no config.json" in msg and str(run / "model") in msg


def test_missing_shard_is_named(model_dir):
    weights = model_dir / "model.safetensors"
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
    weights.rename(model_dir / shard1)
    index = {"metadata": {}, "weight_map": {n: (shard1 if i % 2 else shard2) for i, n in enumerate(names)}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = refused(str(model_dir))
    assert "model.path" in msg and shard2 in msg and shard1 not in msg.split("missing:")[1] and "missing" in msg
    shutil.copy(model_dir / shard1, model_dir / shard2)
    assert check_model(str(model_dir)) == str(model_dir)    # complete again


def test_git_lfs_pointer_and_truncated_weights(model_dir):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    msg = refused(str(model_dir))
    assert str(weights) in msg and "truncated" in msg
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    msg = refused(str(model_dir))
    assert str(weights) in msg and "git lfs pull" in msg


# ------------------------------------------------------------------------------- 2. tokenizer

def _drop_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def test_no_tokenizer(model_dir):
    _drop_tokenizer(model_dir)
    msg = refused(str(model_dir))
    assert "model.path" in msg and str(model_dir) in msg and "no tokenizer files" in msg
    assert "model.tokenizer" in msg
    # model.tokenizer fixes it; a critic needs no tokenizer of its own
    assert check_model(str(model_dir), tokenizer=BUILTINS) == str(model_dir)
    assert check_model(str(model_dir), head="token_classification", what="roles.critic.path") == str(model_dir)


def test_reward_model_without_tokenizer(tmp_path, tiny_reward):
    folder = Path(shutil.copytree(tiny_reward, tmp_path / "rm"))
    _drop_tokenizer(folder)
    what = "roles.reward.sources[0].model"
    msg = refused(str(folder), head="sequence_classification", what=what)
    assert what in msg and str(folder) in msg and "tokenizer.save_pretrained" in msg


def test_tokenizer_that_does_not_load(model_dir):
    (model_dir / "tokenizer.json").write_text("{ not json")
    msg = refused(str(model_dir))
    assert "model.path" in msg and str(model_dir) in msg and "AutoTokenizer cannot load" in msg
    assert "\n" not in msg


def test_bad_model_tokenizer(model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = refused(str(model_dir), tokenizer=str(empty))
    assert "model.tokenizer" in msg and str(empty) in msg and "no tokenizer files" in msg
    msg = refused(str(model_dir), tokenizer="bultin:tiny-llama")
    assert "model.tokenizer" in msg and "did you mean 'builtin:tiny-llama'" in msg


def test_tokenizer_larger_than_the_vocabulary(model_dir):
    edit_config(model_dir, vocab_size=100)
    msg = refused(str(model_dir), tokenizer=BUILTINS)
    assert "model.tokenizer" in msg and "vocab_size 100" in msg


# ------------------------------------------------------------------------------- 3. names

@pytest.mark.parametrize("name", ["bultin:tiny-llama", "builtin:tiny-lama", "builtins:tiny-llama",
                                  "builtin-tiny-llama", "tiny-llama"])
def test_builtin_typos(name):
    msg = refused(name)
    assert "model.path" in msg and name in msg and "did you mean 'builtin:tiny-llama'?" in msg
    assert "builtin:llama-30m" in msg          # the list of builtin names


@pytest.mark.parametrize("name", ["a b", "org//name", "org/name/extra/x"])
def test_invalid_hub_names(name):
    msg = refused(name, what="roles.critic.path", head="token_classification")
    assert "roles.critic.path" in msg and f"'{name}'" in msg and "not a valid hub name" in msg
    assert BUILTINS in msg


def test_dotdot_is_not_a_model(tmp_path, monkeypatch):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    msg = refused("..")
    assert "model.path" in msg and str(tmp_path / "a") in msg and "no config.json" in msg and BUILTINS in msg


def test_missing_local_path(tmp_path):
    msg = refused(str(tmp_path / "nope"))
    assert "model.path" in msg and str(tmp_path / "nope") in msg and "does not exist" in msg


def test_hub_name_offline_not_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    msg = refused("org/name")
    assert "model.path" in msg and "'org/name'" in msg and "not in the hub cache" in msg
    assert "HF_HUB_OFFLINE" in msg and "not a local folder" in msg


def test_hub_name_offline_cached(tmp_path, tiny, monkeypatch):
    from huggingface_hub import constants
    hub = tmp_path / "hub"
    repo = hub / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = Path(shutil.copytree(tiny, repo / "snapshots" / ("0" * 40)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert check_model("org/name") == str(snapshot)


def test_hub_name_online_is_left_to_load_time(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert check_model("org/name") == "org/name"
    assert "did you mean 'builtin:tiny-llama'?" in refused("tiny-llama")   # a typo, online or not


# ------------------------------------------------------------------------------- 4. remote code

def _custom(folder: Path, **auto_map) -> None:
    edit_config(folder, model_type="x-custom", auto_map=auto_map or {"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (folder / "modeling_x.py").write_text("# checkpoint code: must not run without trust_remote_code\n")


def test_remote_code_needs_trust_remote_code(model_dir):
    _custom(model_dir)
    msg = refused(str(model_dir))
    assert "model.path" in msg and str(model_dir) in msg and "model.trust_remote_code: true" in msg
    assert "modeling_x.XForCausalLM" in msg and "Traceback" not in msg


def test_remote_code_with_trust_checks_auto_map(model_dir):
    _custom(model_dir)
    msg = refused(str(model_dir), trust_remote_code=True)   # no AutoConfig entry: cannot build its config
    assert "AutoConfig" in msg and str(model_dir) in msg
    _custom(model_dir, AutoConfig="configuration_x.XConfig", AutoModelForCausalLM="modeling_y.YForCausalLM")
    (model_dir / "configuration_x.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n    model_type = 'x-custom'\n")
    msg = refused(str(model_dir), trust_remote_code=True)
    assert "modeling_y.py" in msg and "not in the folder" in msg


def test_trusted_remote_code_passes(model_dir):
    # runs configuration_x.py (as loading would), copied by transformers into its modules cache
    _custom(model_dir, AutoConfig="configuration_x.XConfig", AutoModelForCausalLM="modeling_x.XForCausalLM")
    (model_dir / "configuration_x.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n    model_type = 'x-custom'\n")
    assert check_model(str(model_dir), trust_remote_code=True) == str(model_dir)
    assert "model.trust_remote_code: true" in refused(str(model_dir))


def test_known_model_type_with_auto_map_needs_no_trust(model_dir):
    # like many hub checkpoints (phi3, ...): transformers has the class, so the shipped code is not used
    edit_config(model_dir, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    assert check_model(str(model_dir)) == str(model_dir)


def test_unknown_model_type_without_code(model_dir):
    edit_config(model_dir, model_type="lama")
    msg = refused(str(model_dir))
    assert "model.path" in msg and "'lama'" in msg and "did you mean 'llama'?" in msg


def test_model_type_without_the_head(model_dir):
    edit_config(model_dir, model_type="t5")
    msg = refused(str(model_dir))
    assert "model.path" in msg and "AutoModelForCausalLM" in msg


def test_causal_lm_is_not_a_reward_model(tiny):
    what = "roles.reward.sources[0].model"
    msg = refused(BUILTINS, head="sequence_classification", what=what)
    assert what in msg and str(tiny) in msg and "LlamaForCausalLM" in msg and "random" in msg


def test_reward_model_with_several_heads_is_served_only_with_head_weights(tmp_path, tiny_reward):
    from prefopt.config_schema import RewardRoleConfig, RewardSourceConfig
    from prefopt.rewards.sources import check_sources
    folder = Path(shutil.copytree(tiny_reward, tmp_path / "rm"))
    edit_config(folder, id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
    assert check_model(str(folder), head="sequence_classification") == str(folder)
    with pytest.raises(ConfigError, match=r"2 heads \(bad, good\): set roles.reward.sources\[0\].attribute_weights"):
        check_sources(RewardRoleConfig(sources=[RewardSourceConfig(model=str(folder))]))
    with pytest.raises(ConfigError, match="attribute_weights names nice, but .* has the heads bad, good"):
        check_sources(RewardRoleConfig(sources=[RewardSourceConfig(model=str(folder), attribute_weights={"nice": 1})]))
    check_sources(RewardRoleConfig(sources=[RewardSourceConfig(model=str(folder), attribute_weights={"good": 1})]))


def test_unreadable_config(model_dir):
    (model_dir / "config.json").write_text("{ nope")
    msg = refused(str(model_dir))
    assert "model.path" in msg and "config.json" in msg and "JSON" in msg


# ------------------------------------------------------------------------------- 5. attention

def test_flash_attention_without_cuda(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for impl in ("flash_attention_2", "flash_attention_3"):
        msg = refused(BUILTINS, attn_implementation=impl)
        assert "model.attn_implementation" in msg and impl in msg and "CUDA" in msg and "sdpa" in msg


def test_flash_attention_without_the_package(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check_mod, "_has_module", lambda name: False)
    msg = refused(BUILTINS, attn_implementation="flash_attention_2")
    assert "model.attn_implementation" in msg and "flash-attn" in msg and "sdpa" in msg
    monkeypatch.setattr(check_mod, "_has_module", lambda name: True)
    assert check_model(BUILTINS, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("impl,hint", [("spda", "sdpa"), ("flash_attention", "flash_attention_2"),
                                       ("eagre", "eager")])
def test_unknown_attention(impl, hint):
    msg = refused(BUILTINS, attn_implementation=impl)
    assert "model.attn_implementation" in msg and f"'{impl}'" in msg and f"did you mean '{hint}'?" in msg


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention"])
def test_attention_that_runs_here(impl):
    assert check_model(BUILTINS, attn_implementation=impl)
