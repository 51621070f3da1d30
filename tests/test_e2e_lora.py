"""LoRA end to end on real Ray + DeepSpeed (+ vLLM): SFT, DPO, a reward model (ZeRO-3), GRPO and PPO with
a critic learn; the reference is the adapter-free model; the engines sample the trained policy (merged
weights or the served adapter; not the initial one); exports are the merged model and the adapter.
LoRA's exact resume: test_e2e_resume.py (online DPO with LoRA, async rollouts, adapter sync)."""
import json

import pytest

from prefopt.config import load_recipe
from prefopt.train import train

pytestmark = pytest.mark.slow


def run(recipe_name, root, *overrides):
    return train(load_recipe(f"recipes/{recipe_name}.yaml", [f"output.root={root}", "output.progress_bar=false",
                                                             *overrides]), quiet=True)


def test_lora_dpo_learns_and_exports_the_merged_model_and_the_adapter(ray_cluster, tmp_path):
    import torch
    from safetensors.torch import load_file
    result = run("tiny_dpo_lora", tmp_path)
    first, last = result.eval_history[0], result.eval_history[-1]
    assert first["rewards/accuracy"] == 0.5 and last["rewards/accuracy"] >= 0.85
    model = result.run_dir / "model"
    adapter = json.loads((model / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
    merged, lora = load_file(model / "model.safetensors"), load_file(model / "adapter" / "adapter_model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in merged) and all("lora_" in k for k in lora)
    from pathlib import Path

    from prefopt.models.tiny import resolve_model_path
    base = load_file(Path(resolve_model_path("builtin:tiny-llama")) / "model.safetensors")
    assert set(merged) == set(base)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])   # frozen
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])                      # adapted


@pytest.mark.parametrize("lora_sync, learners", [
    ("merged", ["roles.learner.num_actors=1"]),
    ("adapter", ["roles.learner.num_actors=2", "roles.learner.zero_stage=3", "train.micro_batch_size=8"])])
def test_lora_grpo_learns_with_the_adapter_free_reference_and_exact_sync(ray_cluster, tmp_path, lora_sync, learners):
    """No reference actor: the KL reference is the learners' model with adapters off; after the last
    sync the engine's greedy outputs equal the learner's policy, whether the engine got the merged
    weights or serves the adapter itself (here gathered from 2 ZeRO-3 learners), so the engines do not
    keep sampling the initial policy (the reward could not rise otherwise either)."""
    result = run("tiny_grpo_lora", tmp_path, "train.iterations=25", "output.save_model=false",
                 f"roles.rollout.lora_sync={lora_sync}", *learners)
    r = [h["reward/mean"] for h in result.train_history]
    assert sum(r[-3:]) / 3 > r[0] + 0.3, r
    placement = json.loads((result.run_dir / "placement.json").read_text())
    assert {p["role"] for p in placement} == {"policy", "rollout"}
    engine = next(p for p in placement if p["role"] == "rollout")       # which sync ran: vLLM LoRA or not
    assert engine["lora_rank"] == (16 if lora_sync == "adapter" else None)
    assert result.train_history[-1]["kl"] > 0.1
    assert result.final_train["greedy_match"] == 1.0 and result.final_train["logp_max_abs_diff"] < 1e-4
    assert max(h["rollout/logp_abs_diff"] for h in result.train_history) < 1e-4


ALL_LINEAR = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]"


def placement_of(result, role):
    return next(p for p in json.loads((result.run_dir / "placement.json").read_text()) if p["role"] == role)


def test_lora_sft_learns_and_trains_only_the_adapters(ray_cluster, tmp_path):
    result = run("tiny_sft", tmp_path, f"model.lora={{r: 16, alpha: 32, target_modules: {ALL_LINEAR}}}",
                 "train.lr=1e-2")
    first, last = result.eval_history[0]["loss"], result.eval_history[-1]["loss"]
    assert first > 6.0 and last < 3.7, (first, last)        # full SFT: 6.25 -> 3.3 (the data's entropy ~3.0)
    policy = placement_of(result, "policy")
    assert 0 < policy["trainable_parameters"] < policy["num_parameters"] / 4
    assert (result.run_dir / "model" / "adapter" / "adapter_model.safetensors").exists()


def test_lora_reward_model_under_zero3_trains_its_head_fully_and_exports_it(ray_cluster, tmp_path):
    """2 learners, ZeRO-3 (adapters and head partitioned, gathered for the exports); the score head is a
    fully trained module (peft's modules_to_save), saved with the adapter and in the merged model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    result = run("tiny_rm", tmp_path, "model.lora={r: 16, alpha: 32}", "train.lr=1e-2", "roles.learner.zero_stage=3")
    first, last = result.eval_history[0]["accuracy"], result.eval_history[-1]["accuracy"]
    assert first <= 0.7 and last >= 0.85, (first, last)
    adapter = load_file(result.run_dir / "model" / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in adapter and any("lora_A" in k for k in adapter)
    merged = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model", use_safetensors=True)
    assert torch_equal(merged.score.weight, adapter["base_model.model.score.weight"])
    assert json.loads((result.run_dir / "model" / "config.json").read_text())["prefopt_reward"]["heads"] == ["reward"]


def test_lora_ppo_critic_and_policy_learn_without_a_reference_actor(ray_cluster, tmp_path):
    result = run("tiny_ppo_gae", tmp_path, f"model.lora={{r: 16, alpha: 32, target_modules: {ALL_LINEAR}}}",
                 "train.lr=1e-2", "train.iterations=20", "roles.reference.placement=learner",
                 "roles.rollout.verify_sync_prompts=8", "output.save_model=false")
    r = [h["reward/mean"] for h in result.train_history]
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.3, r
    loss = [h["critic/value_loss"] for h in result.train_history]
    assert sum(loss[-5:]) / 5 < loss[0] / 4, loss           # the LoRA critic fits the returns (0.05 -> ~0.005)
    critic = placement_of(result, "critic")
    assert 0 < critic["trainable_parameters"] < critic["num_parameters"] / 4
    assert {p["role"] for p in json.loads((result.run_dir / "placement.json").read_text())} == \
        {"policy", "critic", "rollout"}
    assert result.final_train["greedy_match"] == 1.0 and result.final_train["logp_max_abs_diff"] < 1e-4


def torch_equal(a, b):
    import torch
    return torch.equal(a.detach().cpu(), b.cpu())
