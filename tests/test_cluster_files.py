"""The cluster launch files in cluster/: they parse, have the keys their tools need, keep the
dashboard private, carry no secrets or real addresses, and the SLURM script's control flow works
(against stand-in `srun` / `scontrol` / `ray` / `prefopt`). Fast: no Ray, no SLURM, no Kubernetes."""
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from prefopt.cluster import PASSTHROUGH_ENV, WORKER_ENV

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
SBATCH = CLUSTER / "slurm.sbatch"
YAML_FILES = sorted(CLUSTER.glob("*.yaml"))
ALL_FILES = sorted(p for p in CLUSTER.iterdir() if p.is_file())
BASH = shutil.which("bash")


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def code_lines(text):
    """Lines of a shell script without comments (the #SBATCH directives are kept)."""
    return [line for line in text.splitlines()
            if line.strip() and (not line.lstrip().startswith("#") or line.startswith("#SBATCH"))]


# ----------------------------------------------------------------------------------- the files

def test_the_cluster_folder_has_every_launch_file():
    names = {p.name for p in ALL_FILES}
    assert {"ray-cluster.yaml", "runtime_env.yaml", "rayjob.yaml", "slurm.sbatch", "README.md"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_file_parses(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_ray_cluster_config_has_the_launcher_keys():
    cfg = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert cfg.get(key), key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all("min_workers" in t and "max_workers" in t for t in workers)
    # prefopt is installed pinned (a tag in a git URL or a file), with the repo's constraints
    setup = " ".join(cfg["setup_commands"])
    assert "prefopt" in setup and "constraints.txt" in setup and "@" in setup
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def test_ray_cluster_config_matches_rays_own_schema():
    """The schema `ray up` validates against, read from the installed Ray (without importing it)."""
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    schema_path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip("this Ray has no autoscaler schema")
    jsonschema.validate(load("ray-cluster.yaml"), json.loads(schema_path.read_text()))


def test_ray_cluster_dashboard_stays_on_loopback():
    cfg = load("ray-cluster.yaml")
    head = " ".join(cfg["head_start_ray_commands"])
    assert re.findall(r"--dashboard-host[= ](\S+)", head) == ["127.0.0.1"]
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "0.0.0.0" not in cmd


def test_runtime_env_ships_the_checkout_without_runs_or_environments():
    env = load("runtime_env.yaml")
    assert env["working_dir"] == "."
    excludes = {e.rstrip("/") for e in env["excludes"]}
    assert {"runs", ".venv", ".cache", ".git"} <= excludes


def _check_job_env_vars(env_vars):
    """prefopt's ray.init(runtime_env=...) sets these for its actors; inside a job Ray refuses to
    merge them with job env_vars of the same names unless RAY_OVERRIDE_JOB_RUNTIME_ENV=1."""
    shared = set(env_vars or {}) & (set(WORKER_ENV) | set(PASSTHROUGH_ENV))
    if shared:
        assert str(env_vars.get("RAY_OVERRIDE_JOB_RUNTIME_ENV")) == "1", shared
    assert all(isinstance(v, str) for v in (env_vars or {}).values())   # Ray wants strings


def test_job_runtime_envs_can_be_merged_with_prefopts_actor_env():
    _check_job_env_vars(load("runtime_env.yaml").get("env_vars"))
    _check_job_env_vars(yaml.safe_load(load("rayjob.yaml")["spec"]["runtimeEnvYAML"]).get("env_vars"))


def test_rayjob_manifest():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "prefopt train" in spec["entrypoint"]
    assert "output.root=/runs" in spec["entrypoint"]
    # KubeRay pastes the entrypoint into a shell line of the submitter: keep it one plain command
    assert not re.search(r"[;&|<>`]|\$\(", spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert "dashboard-host" in head["rayStartParams"]
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers[0]["image"]
    groups = cluster["workerGroupSpecs"]
    assert len(groups) >= 1
    for group in groups:
        containers = group["template"]["spec"]["containers"]
        assert containers[0]["image"]
        res = containers[0]["resources"]
        assert "nvidia.com/gpu" in res["limits"] and "nvidia.com/gpu" in res["requests"]
    # the shared run volume is mounted at /runs in the head and in every worker group
    for pod in [head] + groups:
        mounts = {m["mountPath"] for c in pod["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert "/runs" in mounts
        claims = [v for v in pod["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims


def test_sbatch_script_is_valid_bash_with_the_expected_steps():
    if BASH is None:
        pytest.skip("no bash")
    out = subprocess.run([BASH, "-n", str(SBATCH)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash")
    code = "\n".join(code_lines(text))
    assert re.search(r"^#SBATCH --nodes=\d+", code, re.M)
    assert "#SBATCH --gpus-per-node" in code and "#SBATCH --exclusive" in code
    assert "set -euo pipefail" in code
    assert "ray start --head" in code and "--dashboard-host=127.0.0.1" in code
    assert re.search(r"ray start --address=", code)
    assert "prefopt train" in code and "ray.address=auto" in code and "output.root=" in code
    assert "ray stop" in code and "trap cleanup EXIT" in code
    assert "0.0.0.0" not in code


# --------------------------------------------------------------------- no secrets, no addresses

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                        # AWS access key id
    re.compile(r"-----BEGIN"),                              # PEM keys / certificates
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),            # GitHub tokens
    re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),           # Slack tokens
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[A-Za-z0-9/+]{20,}"),
]
# `token: value`, `password=value`, `RAY_AUTH_TOKEN=value`, ... with a value that is not a placeholder
ASSIGNMENT = re.compile(r"""(?ix)(?:^|[\s"',(]|(?<!\$)\{)(?:[\w.-]*_)?(token|password|passwd|secret|api_?key)["']?\s*[:=]\s*["']?
                            (?P<value>[^\s"',}#)]*)""")
PLACEHOLDER = re.compile(r"^$|^<[^>]*>|^\$|^\{\{|^\*+$")
IP = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
ALLOWED_IPS = {"127.0.0.1", "0.0.0.0"}


def find_secrets(text):
    hits = [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]
    hits += [m.group(0).strip() for m in ASSIGNMENT.finditer(text) if not PLACEHOLDER.match(m.group("value"))]
    return hits


def find_ips(text):
    return [ip for ip in IP.findall(text) if ip not in ALLOWED_IPS]


def test_the_detectors_detect():
    assert find_secrets("aws_access_key_id: AKIAABCDEFGHIJKLMNOP")
    assert find_secrets("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert find_secrets("token: 3f9a1c2b7d")
    assert find_secrets("export RAY_AUTH_TOKEN=3f9a1c2b7d")
    assert find_secrets('"password": "hunter2"')
    assert not find_secrets("token: <RAY_TOKEN>")
    assert not find_secrets('RAY_AUTH_TOKEN=$(kubectl get secret "$c" -o jsonpath=x)')
    assert not find_secrets("authOptions:\n  mode: token\n")
    assert not find_secrets('[[ -z "${RAY_AUTH_TOKEN:-}" ]]')
    assert not find_secrets('"~/.ray/auth_token": "~/.ray/auth_token"')
    assert find_ips("ray start --address=10.0.3.7:6379") == ["10.0.3.7"]
    assert find_ips("--dashboard-host=127.0.0.1 --dashboard-host=0.0.0.0 ray==2.60.0") == []


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_no_secrets_and_no_real_addresses(path):
    text = path.read_text()
    assert find_secrets(text) == []
    assert find_ips(text) == []


# --------------------------------------------------------- the SLURM script, with stand-in tools

FAKES = {
    # srun [options] command...: log, drop the options, run the command here
    "srun": r"""#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in -w|-N|-n|--nodelist) shift 2 ;; *) shift ;; esac
done
exec "$@"
""",
    "scontrol": r"""#!/bin/bash
for i in $(seq 1 "$FAKE_NODES"); do echo "node$i"; done
""",
    "hostname": r"""#!/bin/bash
echo "fe80::1 192.0.2.10"
""",
    # ray start ... --block: stay up until killed; ray status: one alive node per `ray start` so
    # far (at most $FAKE_ALIVE)
    "ray": r"""#!/bin/bash
echo "ray $*" >> "$FAKE_LOG"
case "$1" in
    start) exec "$REAL_SLEEP" 60 ;;
    status)
        alive=$(grep -c '^ray start' "$FAKE_LOG")
        if [[ -n "${FAKE_ALIVE:-}" && "$alive" -gt "$FAKE_ALIVE" ]]; then alive=$FAKE_ALIVE; fi
        echo "Node status"; echo "Active:"
        for ((i = 1; i <= alive; i++)); do echo " 1 node_$i"; done
        echo "Pending:"; echo " (no pending nodes)" ;;
    get-auth-token) mkdir -p "$HOME/.ray"; echo fake > "$HOME/.ray/auth_token" ;;
esac
exit 0
""",
    # the script's polling interval, shortened
    "sleep": r"""#!/bin/bash
exec "$REAL_SLEEP" 0.1
""",
    "prefopt": r"""#!/bin/bash
echo "prefopt $*" >> "$FAKE_LOG"
exit "${FAKE_PREFOPT_RC:-0}"
""",
}


def run_sbatch(tmp_path, *args, nodes=3, **env):
    if BASH is None:
        pytest.skip("no bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in FAKES.items():
        f = bin_dir / name
        f.write_text(body)
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text("")
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.write_text("")
    full_env = {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home),
        "FAKE_LOG": str(log), "FAKE_NODES": str(nodes), "VENV": str(venv), "RUNS": str(tmp_path / "runs"),
        "SLURM_JOB_NODELIST": f"node[1-{nodes}]", "SLURM_SUBMIT_DIR": str(tmp_path),
        "REAL_SLEEP": shutil.which("sleep") or "/bin/sleep", "SLURM_CPUS_PER_TASK": "8", "SLURM_GPUS_PER_NODE": "a100:4", "RAY_START_TIMEOUT": "20",
    }
    full_env.update(env)
    out = subprocess.run([BASH, str(SBATCH), *args], capture_output=True, text=True, env=full_env,
                         cwd=tmp_path, timeout=120)
    return out, log.read_text().splitlines()


def test_sbatch_starts_head_and_workers_runs_the_recipe_and_stops_ray(tmp_path):
    out, calls = run_sbatch(tmp_path, "train.lr=1e-6", nodes=3, FAKE_PREFOPT_RC="0")
    assert out.returncode == 0, out.stdout + out.stderr
    head = [c for c in calls if c.startswith("srun") and "ray start --head" in c]
    assert len(head) == 1 and "-w node1" in head[0]
    assert "--dashboard-host=127.0.0.1" in head[0] and "--node-ip-address=192.0.2.10" in head[0]
    assert "--num-cpus=8" in head[0] and "--num-gpus=4" in head[0]
    workers = [c for c in calls if c.startswith("srun") and "ray start --address=192.0.2.10:6379" in c]
    assert sorted(re.search(r"-w (\S+)", c).group(1) for c in workers) == ["node2", "node3"]
    train = [c for c in calls if c.startswith("prefopt train")]
    assert train == [f"prefopt train recipes/tiny_grpo.yaml ray.address=auto output.root={tmp_path}/runs "
                     "train.lr=1e-6"]
    assert calls.index(train[0]) > max(calls.index(c) for c in head + workers)
    assert any(c.startswith("ray stop") for c in calls[calls.index(train[0]):])
    assert (tmp_path / "home" / ".ray" / "auth_token").exists()     # token auth by default


def test_sbatch_returns_the_runs_exit_status_and_still_stops_ray(tmp_path):
    out, calls = run_sbatch(tmp_path, nodes=2, FAKE_PREFOPT_RC="3", RECIPE="recipes/tiny_dpo.yaml",
                            RAY_AUTH_MODE="disabled")
    assert out.returncode == 3
    assert any(c.startswith("prefopt train recipes/tiny_dpo.yaml") for c in calls)
    assert any(c.startswith("ray stop") for c in calls)
    assert not any(c.startswith("ray get-auth-token") for c in calls)


def test_sbatch_gives_up_when_nodes_do_not_join(tmp_path):
    out, calls = run_sbatch(tmp_path, nodes=3, FAKE_ALIVE="1", RAY_START_TIMEOUT="2")
    assert out.returncode == 1
    assert "only 1/3 Ray nodes" in out.stderr
    assert not any(c.startswith("prefopt") for c in calls)
    assert any(c.startswith("ray stop") for c in calls)
