"""Ray job submission: run a recipe on a (remote) Ray cluster through its Job Submission API.

``prefopt submit RECIPE [key=value ...] --address http://HEAD:8265 [--follow]`` validates the recipe
here (errors surface before anything is sent) and submits ``python -m prefopt.cli train
env:PREFOPT_JOB_RECIPE`` with the *resolved* recipe in that environment variable (a local copy goes to
``.prefopt/jobs/<id>.yaml``) and the working directory as the job's ``runtime_env`` (so relative data
paths and local reward modules travel with it; Ray skips what ``.gitignore`` lists). Inside the job
the recipe's ``ray.address: local`` joins the job's cluster (``RAY_ADDRESS``). Run outputs land under
``output.root`` on the cluster: point it at storage every node (and you) can read.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git", ".venv", "runs", ".cache", "**/__pycache__", "*.safetensors", ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RECIPE_ENV = "PREFOPT_JOB_RECIPE"


def job_address(address: str | None) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(job_address(address))


def submit(recipe, overrides=(), *, address: str | None = None, working_dir: str | Path = ".",
           env: dict[str, str] | None = None, submission_id: str | None = None) -> str:
    """Submit a recipe (a path plus ``overrides``, or a ``Recipe`` built in code); returns the job id."""
    from prefopt.cluster import WORKER_ENV
    from prefopt.config import load_recipe, recipe_to_yaml, validate_recipe

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, list(overrides))
    else:
        if overrides:
            raise ValueError("overrides apply to a recipe path; change a Recipe object in code instead")
        validate_recipe(recipe)
    job_id = submission_id or f"prefopt-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    text = recipe_to_yaml(recipe)
    record = Path(working_dir) / ".prefopt" / "jobs" / f"{job_id}.yaml"   # what was submitted, for the user
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(text)
    # the run's own ray.init adds the worker environment: let Ray merge it with the job's
    env_vars = {**WORKER_ENV, **(env or {}), RECIPE_ENV: text, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}
    c = client(address)
    deadline = time.monotonic() + 300.0
    while True:
        try:
            return c.submit_job(entrypoint=f"python -m prefopt.cli train env:{RECIPE_ENV}",
                                submission_id=job_id, runtime_env=runtime_env,
                                metadata={"prefopt_recipe": recipe.name, "objective": recipe.objective.name})
        except RuntimeError as e:   # a freshly started head answers before its job agent is up
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def status(job_id: str, address: str | None = None) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(job_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None = None, *, wait_s: float = 60.0) -> str:
    """Ask the job to stop; waits (bounded) until it reaches a terminal state and returns it."""
    c = client(address)
    c.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        state = str(c.get_job_status(job_id).value)
        if state in TERMINAL:
            return state
        time.sleep(1.0)
    return str(c.get_job_status(job_id).value)


def follow(job_id: str, address: str | None = None, out=None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    import asyncio
    import sys
    out = out or sys.stdout
    c = client(address)

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(job_id, address, timeout_s=60.0)


def wait(job_id: str, address: str | None = None, *, timeout_s: float = 3600.0, poll_s: float = 1.0) -> str:
    """Poll until the job is terminal (or ``timeout_s``); returns the status."""
    c = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        state = str(c.get_job_status(job_id).value)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def list_jobs(address: str | None = None) -> list[dict]:
    return [{"id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint}
            for j in client(address).list_jobs() if j.submission_id]
