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
import shutil
import tempfile
import time
import uuid
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git", ".venv", "runs", ".cache", "**/__pycache__", "*.safetensors", ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RECIPE_ENV = "PREFOPT_JOB_RECIPE"
SECRETS_ENV = "PREFOPT_JOB_SECRETS"


def job_address(address: str | None) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def auth_token(token_file: str | None = None) -> str | None:
    """The Ray authentication token to send: ``token_file`` (``--token-file``), else ``RAY_AUTH_TOKEN``,
    else the file in ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token``."""
    from prefopt.errors import ConfigError
    if token_file is None and os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path is None and os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        path = str(Path.home() / ".ray" / "auth_token")
    if path is None:
        return None
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the Ray token file {path}: {e.strerror or e}") from None
    if not token:
        raise ConfigError(f"the Ray token file {path} is empty")
    return token


def client(address: str | None = None, *, token_file: str | None = None):
    """A job client; it sends the cluster's token (:func:`auth_token`) when there is one."""
    from ray.job_submission import JobSubmissionClient
    token = auth_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(job_address(address), headers=headers)


def submit(recipe, overrides=(), *, address: str | None = None, working_dir: str | Path = ".",
           env: dict[str, str] | None = None, submission_id: str | None = None,
           token_file: str | None = None) -> str:
    """Submit a recipe (a path plus ``overrides``, or a ``Recipe`` built in code); returns the job id.

    The recipe passes every check of ``prefopt train`` that does not need the cluster
    (:func:`prefopt.preflight.prepare` with ``remote=True``) before anything is sent. Secrets in
    ``ray.env`` never travel in the job's environment (Ray logs it): they go in a one-module package
    (``py_modules``, a file of mode 0600) that the job reads and deletes when it starts; the local
    copy is removed once the job is submitted.
    """
    import copy
    import json

    from prefopt.cluster import WORKER_ENV, secret_env
    from prefopt.config import load_recipe, recipe_to_dict, validate_recipe
    from prefopt.preflight import prepare
    from prefopt.secrets import redact

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, list(overrides))
    else:
        if overrides:
            raise ValueError("overrides apply to a recipe path; change a Recipe object in code instead")
        validate_recipe(recipe)
    prepare(copy.deepcopy(recipe), remote=True)
    job_id = submission_id or f"prefopt-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    text = _yaml(redact(recipe_to_dict(recipe)))
    jobs_dir = Path(working_dir) / ".prefopt" / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    (jobs_dir / f"{job_id}.yaml").write_text(text)   # what was submitted, for the user (secrets redacted)
    # the run's own ray.init adds the worker environment: let Ray merge it with the job's
    env_vars = {**WORKER_ENV, **(env or {}), RECIPE_ENV: text, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}
    secrets_dir = None
    if secret_env(recipe.ray):
        # a one-module package of its own (not the working directory, whose .gitignore may drop it)
        secrets_dir = Path(tempfile.mkdtemp(prefix="prefopt-job-"))
        module = f"prefopt_job_secrets_{uuid.uuid4().hex}"
        (secrets_dir / module).mkdir(mode=0o700)
        fd = os.open(secrets_dir / module / "__init__.py", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"SECRETS = {json.dumps(secret_env(recipe.ray))!r}\n")
        runtime_env["py_modules"] = [str(secrets_dir / module)]
        env_vars[SECRETS_ENV] = module
    c = client(address, token_file=token_file)
    deadline = time.monotonic() + 300.0
    try:
        while True:
            try:
                return c.submit_job(entrypoint=f"python -m prefopt.cli train env:{RECIPE_ENV}",
                                    submission_id=job_id, runtime_env=runtime_env,
                                    metadata={"prefopt_recipe": recipe.name, "objective": recipe.objective.name})
            except RuntimeError as e:   # a freshly started head answers before its job agent is up
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2.0)
    finally:
        if secrets_dir is not None:
            shutil.rmtree(secrets_dir, ignore_errors=True)


def job_secrets() -> dict[str, str]:
    """Inside a submitted job: the ``ray.env`` secrets :func:`submit` sent (its unpacked copy is
    deleted once read; the job's workers delete their nodes' copies as they start)."""
    import importlib
    import json
    name = os.environ.get(SECRETS_ENV)
    if not name:
        return {}
    from prefopt.cluster import remove_job_secrets_package
    secrets = {str(k): str(v) for k, v in json.loads(importlib.import_module(name).SECRETS).items()}
    remove_job_secrets_package()       # the workers' setup hook does the same on their nodes
    return secrets


def _yaml(data: dict) -> str:
    from omegaconf import OmegaConf
    return OmegaConf.to_yaml(OmegaConf.create(data))


def status(job_id: str, address: str | None = None, *, token_file: str | None = None) -> str:
    return str(client(address, token_file=token_file).get_job_status(job_id).value)


def logs(job_id: str, address: str | None = None, *, token_file: str | None = None) -> str:
    return client(address, token_file=token_file).get_job_logs(job_id)


def stop(job_id: str, address: str | None = None, *, wait_s: float = 60.0, token_file: str | None = None) -> str:
    """Ask the job to stop; waits (bounded) until it reaches a terminal state and returns it."""
    c = client(address, token_file=token_file)
    c.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        state = str(c.get_job_status(job_id).value)
        if state in TERMINAL:
            return state
        time.sleep(1.0)
    return str(c.get_job_status(job_id).value)


def follow(job_id: str, address: str | None = None, out=None, *, token_file: str | None = None) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    import asyncio
    import sys
    out = out or sys.stdout
    c = client(address, token_file=token_file)

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(job_id, address, timeout_s=60.0, token_file=token_file)


def wait(job_id: str, address: str | None = None, *, timeout_s: float = 3600.0, poll_s: float = 1.0,
         token_file: str | None = None) -> str:
    """Poll until the job is terminal (or ``timeout_s``); returns the status."""
    c = client(address, token_file=token_file)
    deadline = time.monotonic() + timeout_s
    while True:
        state = str(c.get_job_status(job_id).value)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def list_jobs(address: str | None = None, *, token_file: str | None = None) -> list[dict]:
    return [{"id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint}
            for j in client(address, token_file=token_file).list_jobs() if j.submission_id]
