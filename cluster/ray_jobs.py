"""`mplug submit ray --address ADDR -- COMMAND...`: run a command as a job on a Ray cluster.

    mplug submit ray --address http://HEAD:8265 --follow -- \\
        mplug data download urls.parquet --output /shared/shards
    mplug submit ray --address http://HEAD:8265 --workers 16 --gpus-per-worker 1 --cpus-per-worker 8 -- \\
        mplug pretrain --config base --data /shared/shards --output /shared/runs/base --resume auto

The job goes through the Ray Jobs API (the dashboard's address, port 8265 by default) with a
runtime environment built from `--runtime-env FILE.yaml`, `--working-dir`, `--pip` and `--env`;
the submitting shell's MLFLOW_TRACKING_URI and NO_ALBUMENTATIONS_UPDATE=1 are passed by default.
The job id is printed on stdout; `--follow` streams the job's logs until it ends and exits with
its driver's exit code (1 when it failed without one).

With `--workers N` the job's driver is `python -m cluster.ray_train`: a Ray Train trainer whose
N workers each run COMMAND as one rank (see cluster/ray_train.py). Without it COMMAND itself is
the driver; `mplug data download` in a job downloads on the job's cluster.

COMMAND runs in the environment of the process that started Ray on the node (`ray start`):
`mplug` must be on its PATH (cluster/examples/ray-cluster.yaml installs the package on every
node), or the job runs a shipped checkout: `--working-dir . -- python -m cluster.cli ...`.

Authentication: a recent Ray (2.60 here) started with RAY_AUTH_MODE=token, or unset where
~/.ray/auth_token exists, answers the Jobs API only with that token. The token is sent from
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token when RAY_AUTH_MODE=token, and also
without it for a cluster on this machine, as `ray.init` does; RAY_AUTH_MODE=disabled sends none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

DEFAULT_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1"}  # img2dataset's albumentations calls home at import
PASSED_THROUGH = ("MLFLOW_TRACKING_URI",)  # copied from the submitting shell when set there
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's own, in its order
DEFAULT_DASHBOARD_PORT = 8265

AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
AUTHORIZATION_HEADER = "Authorization"

EXIT_FAILED = 1  # a job that failed or was stopped without a driver exit code
EXIT_INTERRUPTED = 130  # Ctrl-C while following: the job keeps running
STATUS_POLL_SECONDS = 0.5
JOB_SDK_LOGGER = "ray.dashboard.modules.job.sdk"
TRAIN_MODULE = "cluster.ray_train"
LOCAL_RANK_FLAG = "--nproc-per-node"  # starts local ranks itself: never under Ray Train


class SubmitError(RuntimeError):
    """The job cannot be submitted or followed; the message says what would work."""


def register(targets: argparse._SubParsersAction) -> None:
    ray = targets.add_parser(
        "ray", help="run a command as a Ray job (Ray Jobs API), or as N Ray Train workers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
    )
    ray.add_argument("--address", default=None,
                     help="the Ray Jobs API of the cluster: its dashboard, http://HEAD:8265 "
                          "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")
    ray.add_argument("--follow", action="store_true",
                     help="stream the job's logs until it ends; exit with its driver's exit code")
    ray.add_argument("--job-id", default=None, help="the submission id (default: one Ray makes up)")
    environment = ray.add_argument_group("runtime environment")
    environment.add_argument("--runtime-env", type=Path, metavar="FILE.yaml",
                             help="a Ray runtime_env in YAML; the flags below add to it and win")
    environment.add_argument("--working-dir", default=None,
                             help="a local folder (uploaded) or a remote zip URI the job runs in")
    environment.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                             help="a package (or requirements.txt) to install for the job (repeatable)")
    environment.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                             help="an environment variable of the job (repeatable); "
                                  f"{', '.join(PASSED_THROUGH)} is passed from this shell and "
                                  f"{', '.join(f'{k}={v}' for k, v in DEFAULT_ENV.items())} are set by default")
    train = ray.add_argument_group("Ray Train (training commands: each worker is one rank)")
    train.add_argument("--workers", type=int, default=None, help="run COMMAND as N ranks on Ray Train workers")
    train.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs of each worker (default: 0)")
    train.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs of each worker (default: 1)")
    ray.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...",
                     help="what the job runs, e.g. `-- mplug data download URLS --output DIR`")
    ray.set_defaults(handler=lambda args: run_submit_ray(ray, args))


def run_submit_ray(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from cluster.submit import command_after_dashes  # cluster.submit imports this module

    command = command_after_dashes(parser, args.command)
    try:
        entry = entrypoint(command, args.workers, args.gpus_per_worker, args.cpus_per_worker)
        runtime_env = build_runtime_env(args.runtime_env, args.working_dir, args.pip, args.env, os.environ)
        address = resolve_address(args.address, os.environ)
        client = connect(address, auth_headers(address, os.environ))
        job_id = submit(client, address, entry, runtime_env, args.job_id)
    except SubmitError as error:
        raise SystemExit(f"error: {error}") from None
    print(job_id, flush=True)
    print(f"submitted {job_id} to {address}: `ray job logs {job_id} --address {address} --follow` "
          f"shows its logs, `ray job stop {job_id} --address {address}` ends it", file=sys.stderr)
    if not args.follow:
        return 0
    try:
        return follow(client, job_id, sys.stdout)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (`ray job stop {job_id} --address {address}` "
              "ends it)", file=sys.stderr)
        return EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------------------
# What the job runs, and in which environment
# ---------------------------------------------------------------------------------------------


def entrypoint(command: list[str], workers: int | None, gpus_per_worker: float | None,
               cpus_per_worker: float | None) -> str:
    """The job's shell command: COMMAND itself, or the Ray Train entry running it on N workers."""
    if workers is None:
        if gpus_per_worker is not None or cpus_per_worker is not None:
            raise SubmitError("--gpus-per-worker and --cpus-per-worker size Ray Train workers: "
                              "give --workers N with them")
        return shlex.join(command)
    if workers < 1:
        raise SubmitError(f"--workers must be at least 1, got {workers}")
    gpus = 0.0 if gpus_per_worker is None else gpus_per_worker
    cpus = 1.0 if cpus_per_worker is None else cpus_per_worker
    if gpus < 0 or cpus <= 0:
        raise SubmitError(f"each worker needs CPUs > 0 and GPUs >= 0, got --cpus-per-worker {cpus} "
                          f"and --gpus-per-worker {gpus}")
    if any(word.split("=", 1)[0] == LOCAL_RANK_FLAG for word in command):
        raise SubmitError(f"{LOCAL_RANK_FLAG} starts local ranks itself, but under --workers each Ray "
                          f"Train worker is one rank: leave {LOCAL_RANK_FLAG} out of the command")
    train = ["python", "-m", TRAIN_MODULE, "--workers", str(workers), "--gpus-per-worker", f"{gpus:g}",
             "--cpus-per-worker", f"{cpus:g}", "--"]
    return shlex.join(train + command)


def parse_assignments(values: list[str]) -> dict[str, str]:
    """['KEY=VALUE', ...] -> {KEY: VALUE}; the value may hold '=' itself."""
    assignments = {}
    for value in values:
        key, equals, text = value.partition("=")
        if not equals or not key:
            raise SubmitError(f"--env expects KEY=VALUE, got {value!r}")
        assignments[key] = text
    return assignments


def load_runtime_env_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SubmitError(f"cannot read --runtime-env {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SubmitError(f"--runtime-env {path} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SubmitError(f"--runtime-env {path} must hold a mapping (env_vars:, pip:, working_dir:, ...), "
                          f"got a {type(loaded).__name__}")
    env_vars = loaded.get("env_vars", {})
    if not isinstance(env_vars, dict):
        raise SubmitError(f"env_vars in --runtime-env {path} must map names to values, got {env_vars!r}")
    return loaded


def pip_requirements(values: list[str]) -> list[str]:
    """--pip values: a requirements file contributes its lines, anything else is one requirement."""
    requirements = []
    for value in values:
        path = Path(value)
        if path.suffix == ".txt" and path.is_file():
            lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
            requirements += [line for line in lines if line]
        else:
            requirements.append(value)
    return requirements


def build_runtime_env(runtime_env_file: Path | None, working_dir: str | None, pip: list[str],
                      env: list[str], environ: Mapping[str, str]) -> dict[str, Any]:
    """The job's runtime_env: the file, then the flags; env_vars are merged, defaults first."""
    runtime_env = load_runtime_env_file(runtime_env_file) if runtime_env_file else {}
    env_vars = dict(DEFAULT_ENV)
    env_vars.update({name: environ[name] for name in PASSED_THROUGH if environ.get(name)})
    env_vars.update({str(k): str(v) for k, v in runtime_env.get("env_vars", {}).items()})
    env_vars.update(parse_assignments(env))
    runtime_env["env_vars"] = env_vars
    if working_dir is not None:
        if "://" not in working_dir and not Path(working_dir).is_dir():
            raise SubmitError(f"--working-dir {working_dir} is not a folder here; give a local folder "
                              "(it is uploaded) or a remote zip URI (s3://..., https://...)")
        runtime_env["working_dir"] = working_dir
    if pip:
        runtime_env["pip"] = pip_requirements(pip)
    return runtime_env


# ---------------------------------------------------------------------------------------------
# Where the job goes
# ---------------------------------------------------------------------------------------------


def resolve_address(address: str | None, environ: Mapping[str, str]) -> str:
    """--address, else Ray's own variables; an http URL (a bare host:port is taken as http)."""
    if not address:
        address = next((environ[name] for name in ADDRESS_VARIABLES if environ.get(name)), None)
    if not address:
        raise SubmitError(f"no Ray cluster given: pass --address http://HEAD:{DEFAULT_DASHBOARD_PORT} (the Jobs API "
                          f"of the head node's dashboard) or set {ADDRESS_VARIABLES[0]}")
    if "://" not in address:
        address = f"http://{address}"
    scheme = urlsplit(address).scheme
    if scheme not in ("http", "https"):
        raise SubmitError(f"--address {address} is not the Jobs API: give the dashboard's http://HEAD:"
                          f"{DEFAULT_DASHBOARD_PORT} (a {scheme}:// address is for ray.init)")
    return address.rstrip("/")


def is_this_machine(address: str) -> bool:
    """Whether `address` names a loopback address or one of this machine's network addresses."""
    import socket

    import psutil

    host = urlsplit(address).hostname or ""
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        return False
    if ip.is_loopback:
        return True
    own = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return str(ip) in own


def auth_token(environ: Mapping[str, str]) -> str | None:
    """The token Ray itself would use: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if environ.get(TOKEN_VARIABLE):
        return environ[TOKEN_VARIABLE].strip()
    path = Path(environ[TOKEN_PATH_VARIABLE]) if environ.get(TOKEN_PATH_VARIABLE) else DEFAULT_TOKEN_PATH
    try:
        return path.expanduser().read_text().strip() or None
    except OSError:
        if environ.get(TOKEN_PATH_VARIABLE):
            raise SubmitError(f"{TOKEN_PATH_VARIABLE}={path} cannot be read; point it at the file that holds "
                              f"the cluster's token, or set {TOKEN_VARIABLE}") from None
        return None


def auth_headers(address: str, environ: Mapping[str, str]) -> dict[str, str]:
    mode = environ.get(AUTH_MODE_VARIABLE, "").lower()
    if mode == "disabled":
        return {}
    token = auth_token(environ)
    if token is None:
        if mode == "token":
            raise SubmitError(f"{AUTH_MODE_VARIABLE}=token but no token: set {TOKEN_VARIABLE} to the cluster's "
                              f"token (`ray get-auth-token` on the head prints it), {TOKEN_PATH_VARIABLE} to a "
                              f"file holding it, or put it in {DEFAULT_TOKEN_PATH}")
        return {}
    if mode == "token" or is_this_machine(address):
        return {AUTHORIZATION_HEADER: f"Bearer {token}"}
    return {}


@contextlib.contextmanager
def _without(names: tuple[str, ...]) -> Iterator[None]:
    """Hide environment variables for a moment (Ray's client lets them override its address)."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, headers: dict[str, str]):
    """A JobSubmissionClient for `address`, or a SubmitError saying why there is none."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        with _without(ADDRESS_VARIABLES):
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as error:
        sent = "a token that is not the cluster's" if headers else "no token"
        raise SubmitError(
            f"the Ray cluster at {address} refused the request ({str(error).splitlines()[0]}): we sent {sent}. "
            f"The cluster uses token authentication: set {AUTH_MODE_VARIABLE}=token and {TOKEN_VARIABLE} to its "
            f"token (`ray get-auth-token` on the head prints it) or {TOKEN_PATH_VARIABLE} to a file holding it"
        ) from None
    except ConnectionError as error:
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {address} ({error}): is the head running, and is this its "
            f"dashboard address (http://HEAD:{DEFAULT_DASHBOARD_PORT} unless `ray start --head --dashboard-port` "
            "said otherwise; not the GCS port 6379)?"
        ) from None
    except RuntimeError as error:  # an answer that is not the Jobs API's
        raise SubmitError(f"{address} does not answer as a Ray Jobs API ({error}); give the head's dashboard "
                          f"address, http://HEAD:{DEFAULT_DASHBOARD_PORT}") from None


def submit(client, address: str, entry: str, runtime_env: dict[str, Any], job_id: str | None) -> str:
    try:
        return client.submit_job(entrypoint=entry, runtime_env=runtime_env, submission_id=job_id)
    except (RuntimeError, ValueError) as error:
        raise SubmitError(f"the Ray cluster at {address} did not take the job: {error}") from None


# ---------------------------------------------------------------------------------------------
# Following a job
# ---------------------------------------------------------------------------------------------


async def _stream_logs(client, job_id: str, out: TextIO) -> None:
    with warnings.catch_warnings():  # Ray's own call into aiohttp (ssl=None), nothing of ours
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray.dashboard")
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()


def follow(client, job_id: str, out: TextIO) -> int:
    """Stream the job's logs to `out` until it ends; its driver's exit code (EXIT_FAILED if unknown)."""
    from ray.job_submission import JobStatus

    logging.getLogger(JOB_SDK_LOGGER).setLevel(logging.WARNING)  # not "WebSocket closed" at the end
    try:
        asyncio.run(_stream_logs(client, job_id, out))
    except RuntimeError as error:  # the stream broke off; the job goes on
        print(f"the log stream of job {job_id} ended early ({error}); waiting for the job to end", file=sys.stderr)
    info = client.get_job_info(job_id)
    while not info.status.is_terminal():  # the log stream may close a moment before the status changes
        time.sleep(STATUS_POLL_SECONDS)
        info = client.get_job_info(job_id)
    message = (info.message or "").split(", last available logs", 1)[0]  # the logs were streamed above
    print(f"job {job_id} {info.status.value}: {message}", file=sys.stderr)
    code = info.driver_exit_code
    if info.status == JobStatus.SUCCEEDED:
        return 0 if code is None else code
    return code if code else EXIT_FAILED
