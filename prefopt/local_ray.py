"""The embedded single-node Ray cluster of ``ray.address: local``: loopback only, with a token.

Ray's servers (GCS, raylet, object manager, workers, dashboard and runtime-env agents) bind the
node's IP address. prefopt starts its own cluster in Ray's single-machine mode
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the mode Ray uses on laptops), where that address is
127.0.0.1, so nothing listens beyond loopback. Ray's token authentication stays on
(``RAY_AUTH_MODE=token``) with a fresh random token per cluster in a file only this user can read
(mode 0600, in a private temporary folder); the file is removed when the cluster stops. A cluster
named in ``ray.address`` (or ``RAY_ADDRESS``) is joined as it is.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile

LOOPBACK = "127.0.0.1"
_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
_state: dict = {}


def start(*, num_cpus: int, include_dashboard: bool = False, runtime_env: dict | None = None,
          log_to_driver: bool = False, logging_level: str = "WARNING") -> str:
    """Start the embedded cluster; returns the path of its token file."""
    import ray

    cleanup()   # a cluster of this process that was not stopped through cleanup()
    token_dir = tempfile.mkdtemp(prefix="prefopt-ray-")          # mode 0700
    token_path = os.path.join(token_dir, "auth_token")
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    _state.update(token_dir=token_dir, saved={k: os.environ.get(k) for k in _ENV})
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path,
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    _set_single_machine(True)
    _refresh_auth()
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                 dashboard_host=LOOPBACK, runtime_env=runtime_env, log_to_driver=log_to_driver,
                 logging_level=logging_level, configure_logging=True)
    except BaseException:
        cleanup()
        raise
    return token_path


def token_path() -> str | None:
    """The token file of the running embedded cluster (None when there is none)."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") if _state else None


def cleanup() -> None:
    """Undo :func:`start`'s settings and remove the token (after ``ray.shutdown()``)."""
    if not _state:
        return
    for key, value in _state["saved"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(_state["token_dir"], ignore_errors=True)
    _state.clear()
    _set_single_machine(os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1") == "0")
    _refresh_auth()


def _set_single_machine(on: bool) -> None:
    # ray_constants read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when first imported; the node address
    # is looked up through the module attribute at ray.init time
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = not on


def _refresh_auth() -> None:
    """Make this process's Ray core read RAY_AUTH_MODE / the token file again."""
    from ray._raylet import AuthenticationTokenLoader, Config
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
