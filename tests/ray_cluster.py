"""A private local Ray head for tests: `ray start --head --block` on loopback.

    with RayHead(tmp_dir, num_cpus=2) as head:
        head.address          # http://127.0.0.1:PORT, the Jobs API (dashboard)
        head.client_env()     # what a client needs to reach it: the head's auth token

Every port the head opens is picked free (several sessions may run a Ray on this machine), its
files live under a temp dir of its own, and it uses token authentication with a token of its
own (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), so it neither reads nor writes ~/.ray. It stops by
ending the `ray start --block` process, which takes its Ray processes with it, then kills any
process still naming its temp dir, by pid; never `ray stop`, which ends every Ray of the user
on the machine. The head's PATH starts with this Python's bin folder, so a job's `mplug` and
`python` are this checkout's, as in an activated virtual environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

RAY = Path(sys.executable).with_name("ray")
LOOPBACK = "127.0.0.1"
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port")
OBJECT_STORE_BYTES = 200 * 2**20  # jobs here pass file names, not data
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0  # the head drains for up to 30 s on SIGTERM
POLL_S = 0.5
TOKEN_BYTES = 32


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on loopback (held together while picked, so no two are equal)."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind((LOOPBACK, 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class RayHead:
    def __init__(self, root: Path, num_cpus: int = 2):
        self.root = Path(root)
        self.num_cpus = num_cpus
        self.token = secrets.token_hex(TOKEN_BYTES)
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        # Ray's unix sockets live under the temp dir: keep its path short (108 bytes at most).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.log = self.root / "ray-head.log"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['--dashboard-port']}"

    def client_env(self) -> dict[str, str]:
        """Variables a client of this head sets (on top of os.environ)."""
        return {"RAY_AUTH_TOKEN": self.token}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        # No draining on SIGTERM: it waits up to 30 s for leases that a test's head has no use for.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, OMP_NUM_THREADS="1",
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
        return env

    def start(self) -> RayHead:
        command = [str(RAY), "start", "--head", "--block", "--node-ip-address", LOOPBACK,
                   "--dashboard-host", LOOPBACK, "--num-cpus", str(self.num_cpus), "--num-gpus", "0",
                   "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", str(self.temp_dir),
                   "--disable-usage-stats"]
        for flag, port in self.ports.items():
            command += [flag, str(port)]
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                            start_new_session=True)
        try:
            self._wait_until_jobs_api_answers()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_jobs_api_answers(self) -> None:
        request = urllib.request.Request(f"{self.address}/api/jobs/",
                                         headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(request, timeout=POLL_S * 4):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(POLL_S)
        raise RuntimeError(f"the Ray head's Jobs API did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:] if self.log.exists() else ""

    def _leftovers(self) -> list[psutil.Process]:
        """Processes of this head still alive (workers naming its temp dir) and their children."""
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["cmdline"]):
            if str(self.temp_dir) in " ".join(process.info["cmdline"] or []):
                found[process.pid] = process
                try:
                    found.update({child.pid: child for child in process.children(recursive=True)})
                except psutil.Error:
                    continue
        return list(found.values())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for process in self._leftovers():
            try:
                process.kill()
            except psutil.Error:
                continue
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
