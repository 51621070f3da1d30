"""Secure defaults of the embedded local cluster: every listener on loopback, Ray's token
authentication on with a private per-cluster token, secrets kept out of Ray's logs and of
everything prefopt prints or writes; and a quiet console."""
import http.client
import ipaddress
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from prefopt.secrets import REDACTED, is_secret

ROOT = Path(__file__).resolve().parent.parent


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def listening(procs) -> set[tuple[str, str, int]]:
    """``(process name, ip, port)`` of every listening TCP/UDP socket of ``procs``."""
    out = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):   # TCP listen / bound UDP
                    out.add((p.name(), c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "MY_PASSWORD", "SSH_PRIVATE_KEY", "PGPASS",
                                  "GITHUB_AUTH", "AWS_CREDENTIALS", "AWS_SECRET_ACCESS_KEY", "OPENAI_KEY",
                                  "db_passwd", "hf-token"])
def test_secret_names(name):
    assert is_secret(name)


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "max_tokens", "micro_batch_tokens", "tokenizer", "AUTHOR",
                                  "KEYBOARD_LAYOUT", "monkey", "keep_checkpoints", "PYTHONPATH"])
def test_names_that_are_not_secrets(name):
    assert not is_secret(name)


def test_show_and_config_yaml_redact_every_secret(tmp_path, capsys):
    from prefopt.cli import main
    from prefopt.config import load_recipe
    from prefopt.io.run_dir import write_config
    secrets = {"SSH_PRIVATE_KEY": "sk-aaaa1", "PGPASS": "pg-bbbb2", "GITHUB_AUTH": "gh-cccc3",
               "AWS_CREDENTIALS": "aws-dddd4", "OPENAI_KEY": "oa-eeee5", "HF_TOKEN": "hf_ffff6"}
    overrides = [f"ray.env.{k}={v}" for k, v in secrets.items()] + ["ray.env.OMP_NUM_THREADS=1"]
    assert main(["show", "tiny_dpo", *overrides]) == 0
    shown = capsys.readouterr().out
    write_config(tmp_path, load_recipe("tiny_dpo", overrides))
    written = (tmp_path / "config.yaml").read_text()
    for text in (shown, written):
        assert not any(v in text for v in secrets.values()), text
        assert all(f"{k}: '{REDACTED}'" in text for k in secrets)
        assert "OMP_NUM_THREADS: '1'" in text and "micro_batch_tokens: null" in text   # not secrets: kept


def test_local_cluster_is_loopback_only_and_needs_its_token(ray_cluster):
    """The session's embedded cluster: its token file is private, its listeners are on loopback,
    and its agent's HTTP API refuses requests without the token (401) or with a wrong one (403)."""
    token_path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_path.parent.stat().st_mode) == 0o700
    token = token_path.read_text().strip()
    assert len(token) >= 32

    me = psutil.Process()
    sockets = listening(me.children(recursive=True))
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, names
    assert all(is_loopback(ip) for _, ip, _ in sockets), sorted(s for s in sockets if not is_loopback(s[1]))

    def codes(port):
        url = f"http://127.0.0.1:{port}/api/job_agent/jobs/none/logs"
        out = []
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Bearer {token}"}):
            try:
                out.append(urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30).status)
            except urllib.error.HTTPError as e:
                out.append(e.code)
            except (urllib.error.URLError, http.client.HTTPException, OSError):
                return None                  # not an HTTP port (the agent's gRPC one)
        return out

    port = ray_cluster._private.worker._global_node.dashboard_agent_listen_port
    if not port or port < 0:     # another Ray cluster on this machine holds the agent's HTTP port (52365)
        pytest.skip("the dashboard agent of this cluster has no HTTP port")
    assert codes(port) == [401, 403, 404]      # no token, wrong token, the token (then: no such job)


SECRET = "hf_s3cr3t-value-9f2c"

ACTOR_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import ray
    from prefopt.cluster import init_ray, shutdown_ray
    from prefopt.config_schema import RayConfig

    init_ray(RayConfig(num_cpus=1, env={"HF_TOKEN": "%s", "PREFOPT_PLAIN_VAR": "plain-visible-value"}),
             num_cpus_needed=1)

    @ray.remote(num_cpus=1)
    def inside():
        import my_rewards                          # beside the user, not installed
        return {"token": os.environ.get("HF_TOKEN"), "plain": os.environ.get("PREFOPT_PLAIN_VAR"),
                "reward": my_rewards.score(prompt="p", response="a b", row={})}

    out = ray.get(inside.remote())
    out["session"] = ray._private.worker._global_node.get_session_dir_path()
    out["token_path"] = os.environ["RAY_AUTH_TOKEN_PATH"]
    shutdown_ray()
    out["token_removed"] = not os.path.exists(out["token_path"])
    print("RESULT " + json.dumps(out))
""") % SECRET


def test_secrets_reach_actors_but_not_rays_logs_and_local_modules_import(tmp_path):
    """``ray.env`` secrets arrive in the actors through a setup hook, never in Ray's session logs
    (where the plain variables do land); a module in the working directory imports in an actor."""
    (tmp_path / "my_rewards.py").write_text("def score(prompt, response, row):\n    return len(response.split())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", ACTOR_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert result["token"] == SECRET and result["plain"] == "plain-visible-value" and result["reward"] == 2
    assert result["token_removed"]
    logs = Path(result["session"]) / "logs"
    texts = {p.name: p.read_bytes() for p in logs.rglob("*") if p.is_file()}
    assert any(b"plain-visible-value" in t for t in texts.values())     # the logs we search are the right ones
    assert not [name for name, t in texts.items() if SECRET.encode() in t]
    assert SECRET not in out.stderr


NOISE = ("DeepSpeed", "deepspeed", "untested", "shm", "Triton", "triton", "NUMA", "Loading safetensors",
         "Token authentication", "(pid=", "(LearnerWorker", "(RolloutWorker", "INFO", "WARNING", "Warning")


@pytest.mark.slow
def test_an_online_run_listens_on_loopback_only_and_keeps_the_console_quiet(tmp_path):
    """A real `prefopt train` (learner, reference actor, vLLM engine): every socket any of its
    processes listens on is loopback; the token file is private while it runs and gone after; the
    console shows status lines and the summary, and none of the third-party noise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    cmd = [sys.executable, "-m", "prefopt.cli", "train", "tiny_grpo", "train.iterations=3",
           f"output.root={tmp_path}", "output.save_model=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sockets, token_modes, token_path = set(), set(), None
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            root = psutil.Process(proc.pid)
            children = root.children(recursive=True)
            sockets |= listening([root, *children])
            for child in children if token_path is None else ():   # Ray's processes inherit the setting
                token_path = token_path or child.environ().get("RAY_AUTH_TOKEN_PATH")
            if token_path and os.path.exists(token_path):
                token_modes.add(stat.S_IMODE(os.stat(token_path).st_mode))
        except (psutil.NoSuchProcess, FileNotFoundError):
            pass
        time.sleep(0.3)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]

    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and any("RolloutWorker" in n for n in names) \
        and any("LearnerWorker" in n for n in names), names
    assert all(is_loopback(ip) for _, ip, _ in sockets), sorted(s for s in sockets if not is_loopback(s[1]))
    assert token_modes == {0o600} and not os.path.exists(token_path)

    assert "starting a local Ray cluster (3 CPUs, listening on 127.0.0.1 only, token authentication)" in stderr
    assert "starting 1 vLLM engine" in stderr and "placing 1 policy learner" in stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    noisy = [line for line in lines if not line.startswith("prefopt [") and any(n in line for n in NOISE)]
    other = [line for line in lines if not line.startswith(("prefopt [", "tiny-grpo: "))]
    assert not noisy and not other, (noisy, other)      # status lines and the progress bar only
    for row in ("mean reward (first -> last iteration)", "KL to the reference (first -> last)",
                "entropy (first -> last)", "response length (tokens) (first -> last)", "curves"):
        assert row in stdout, stdout
    run_dir = next(tmp_path.glob("tiny-grpo-*"))
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["kl_first"] == 0.0 and summary["entropy_first"] > 0 and summary["response_length_final"] > 0
