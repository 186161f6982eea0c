"""A real `mlflow server` on loopback for the tests that track to one (fixture `server`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).parent / "mlflow"
SERVER_START_TIMEOUT_S = 120  # importing mlflow and migrating a new store take ~25 s on 2 busy cores
SERVER_STOP_TIMEOUT_S = 15


@dataclass
class Server:
    """`mlflow server` as a subprocess in its own process group (the CLI and its uvicorn worker)."""

    port: int
    store: Path
    artifacts: Path
    log: Path
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.store}", "--serve-artifacts",
                   "--artifacts-destination", str(self.artifacts)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        began_at = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        code = self.process.poll()
        self.stop()
        state = (f"exited with code {code}" if code is not None
                 else f"did not answer within {SERVER_START_TIMEOUT_S} s")
        with open(self.log, "rb") as log:
            log.seek(began_at)
            output = log.read().decode(errors="replace")[-4000:]
        pytest.fail(f"`mlflow server` on {self.uri} {state}; its output:\n{output}")

    def stop(self) -> None:
        """Terminate the server's process group, killing it if it has not ended within the timeout."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """End the server at once, as a crash would: in-flight requests get no answer."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
