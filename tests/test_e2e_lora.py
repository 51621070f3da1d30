"""LoRA end to end on real Ray + DeepSpeed (+ vLLM): DPO and GRPO learn, the reference is the adapter-free
model, the engines sample the trained policy (merged weights or the served adapter; not the initial one),
exports are the merged model and the adapter. LoRA's exact resume: test_e2e_resume.py (online DPO with LoRA, async rollouts)."""
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


@pytest.mark.parametrize("lora_sync", ["merged", "adapter"])
def test_lora_grpo_learns_with_the_adapter_free_reference_and_exact_sync(ray_cluster, tmp_path, lora_sync):
    """No reference actor: the KL reference is the learners' model with adapters off; after the last
    sync the engine's greedy outputs equal the learner's policy, whether the engine got the merged
    weights or serves the adapter itself (so the engines do not keep sampling the initial policy: the
    reward could not rise otherwise either)."""
    result = run("tiny_grpo_lora", tmp_path, "train.iterations=25", "output.save_model=false",
                 f"roles.rollout.lora_sync={lora_sync}")
    r = [h["reward/mean"] for h in result.train_history]
    assert sum(r[-3:]) / 3 > r[0] + 0.3, r
    placement = json.loads((result.run_dir / "placement.json").read_text())
    assert {p["role"] for p in placement} == {"policy", "rollout"}
    assert result.train_history[-1]["kl"] > 0.1
    assert result.final_train["greedy_match"] == 1.0 and result.final_train["logp_max_abs_diff"] < 1e-4
    assert max(h["rollout/logp_abs_diff"] for h in result.train_history) < 1e-4
