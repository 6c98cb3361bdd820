"""Token authentication for every Ray cluster lmforge starts or joins (Ray's RAY_AUTH_MODE=token).

    lmforge launch --on ray configs/debug.yaml                        # local Ray: a fresh token per run
    RAY_AUTH_TOKEN_PATH=~/cluster.token lmforge launch --on ray configs/debug.yaml --address HEAD:6379
    lmforge launch --on ray configs/debug.yaml launch.ray_auth=disabled   # explicit, and warned about

Without a token, anyone who can reach a Ray head's port can run code as the job's user. A Ray
cluster lmforge starts gets a fresh random token in a 0600 file in a private (0700) directory on
node-local temporary storage, handed to Ray by path (RAY_AUTH_TOKEN_PATH), never by value in logs,
the run directory or a rendered batch script. slurm/ray.sbatch does the same in shell for a Slurm
job's nodes. An existing cluster's token comes from Ray's usual settings (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); the GCS is asked once, in a second, whether it accepts it,
so a missing or wrong token is one clear error instead of Ray's 20 s of retries. See docs/security.md.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from lmforge.launcher import LaunchError

MODE, TOKEN, TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")  # Ray's own default (ray get-auth-token)

DISABLED_WARNING = ("launch.ray_auth=disabled: this Ray cluster accepts anyone who can reach its head's port "
                    "and its nodes' ports, and runs their code as you, with your data and GPUs. Use it only "
                    "on a network nobody else can reach")


def new_token_file() -> Path:
    """A fresh random token in a new private directory (mkdtemp: 0700) under node-local temporary
    storage, the file itself 0600. The caller removes the directory (remove_token_file)."""
    directory = Path(tempfile.mkdtemp(prefix="lmforge-ray-auth-"))
    path = directory / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def remove_token_file(path: Path) -> None:
    shutil.rmtree(path.parent, ignore_errors=True)


def token_source() -> str | None:
    """Where Ray will read this process's token from (its order: env value, env path, default file)."""
    if os.environ.get(TOKEN):
        return f"${TOKEN}"
    if os.environ.get(TOKEN_PATH):
        return f"{TOKEN_PATH}={os.environ[TOKEN_PATH]}"
    if DEFAULT_TOKEN_FILE.expanduser().is_file():
        return str(DEFAULT_TOKEN_FILE)
    return None


def use_mode(ray_auth: str, log) -> None:
    """Set RAY_AUTH_MODE for this process and what it starts; the environment may not contradict
    launch.ray_auth (turning authentication off takes the explicit key)."""
    env = os.environ.get(MODE)
    if ray_auth == "token" and env is not None and env.lower() != "token":
        raise LaunchError(f"{MODE}={env} is set in the environment, but launch.ray_auth is token: unset it, or "
                          "set launch.ray_auth=disabled to run Ray without authentication (read its warning first)")
    if ray_auth == "disabled":
        log.warning(f"WARNING: {DISABLED_WARNING}")
    os.environ[MODE] = ray_auth


def start_local(log) -> Path:
    """Token settings for a local Ray that this process starts: a fresh token for this run only."""
    path = new_token_file()
    os.environ.pop(TOKEN, None)
    os.environ[TOKEN_PATH] = str(path)
    log.info(f"Ray token authentication: a fresh token for this run in {path} (0600)")
    return path


def check_accepted(address: str, ray_auth: str, timeout_s: float = 10.0) -> None:
    """Ask the cluster's GCS once whether it accepts this process's credentials (Ray's own
    authenticated gRPC channel; the answer comes in about a second)."""
    if ray_auth == "token" and token_source() is None:
        raise LaunchError(
            f"the Ray cluster at {address} needs its authentication token (launch.ray_auth=token), and none was "
            f"found: set {TOKEN_PATH} to the token file the cluster was started with (or {TOKEN}, or put it in "
            f"{DEFAULT_TOKEN_FILE}); `ray get-auth-token` on the head prints it")
    if address in ("auto", "local") or "://" in address:
        return  # ray:// goes through the Ray Client server, which ray.init checks itself
    code, details = gcs_status(address, timeout_s)
    if code != "UNAUTHENTICATED":
        return  # not ours to judge: ray.init reports it
    if ray_auth == "disabled":
        raise LaunchError(f"the Ray cluster at {address} uses token authentication, and launch.ray_auth=disabled "
                          f"sends no token: drop launch.ray_auth=disabled and set {TOKEN_PATH} to its token")
    raise LaunchError(f"the Ray cluster at {address} refused the token from {token_source()} ({details}): "
                      "it is not the token that cluster was started with")


def gcs_status(address: str, timeout_s: float = 10.0, wait_for_ready: bool = False) -> tuple[str, str]:
    """The status of one GetClusterId call to the GCS at `address` through Ray's own channel (which
    adds this process's token when RAY_AUTH_MODE=token): ("OK", ""), ("UNAUTHENTICATED", why), …
    `wait_for_ready` waits up to the timeout for a head that is still starting."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    # a channel of its own: no reconnect backoff inherited from earlier attempts on this address
    channel = init_grpc_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, wait_for_ready=wait_for_ready)
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    finally:
        channel.close()
