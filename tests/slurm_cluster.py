"""A private single-node Slurm cluster for tests: munged, slurmctld and slurmd in a temp folder.

`with SlurmCluster() as cluster:` starts its own munged (own key and socket), writes a
slurm.conf with its own ports, state and spool folders, starts slurmctld and slurmd (one node,
`localhost`, this machine's CPUs) and waits until the node is idle. `cluster.env` holds
SLURM_CONF for every Slurm command (sbatch, scontrol, ...) and the jobs they start. On exit it
cancels the cluster's jobs and stops only the daemons it started, by their process ids.

There is no slurmdbd (no sacct): jobs are followed with `scontrol show job`, and MinJobAge keeps
finished jobs visible. `cluster_or_skip()` skips a test with the reason when the Debian packages
(slurmctld slurmd slurm-client munge) are missing or the tests do not run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")
INSTALL_HINT = "apt-get install slurmctld slurmd slurm-client munge (or `make system-deps`)"
MUNGE_USER = "munge"
MUNGE_KEY_BYTES = 128  # munge accepts 32..1024
NODE = "localhost"  # resolves everywhere: the rendezvous address of jobs on this node
MIN_JOB_AGE_S = 3600  # how long slurmctld keeps finished jobs (there is no accounting database)
# A requeued job may start again only after its begin time, requeue + the credential lifetime (120 s by
# default): a launch while the old credential is still revoked fails ("Job credential revoked").
CRED_EXPIRE_S = 20
SCHED_INTERVAL_S = 2  # how often pending jobs are looked at (Slurm's default, 60 s, would slow requeued jobs)
START_TIMEOUT_S = 60.0
POLL_S = 0.5
STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 5000
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED")
PUBLIC_DIR = 0o755  # munged (as the munge user) must reach its socket; slurmd reads the key path

SLURM_CONF = """\
ClusterName=mplugtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire_s}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval={sched_interval_s},bf_interval={sched_interval_s}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge={min_job_age}
JobRequeue=1
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def missing_requirements() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return f"Slurm/munge programs missing: {', '.join(missing)}; install with {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (slurmd runs jobs, munged runs as the munge user)"
    try:
        pwd.getpwnam(MUNGE_USER)
    except KeyError:
        return f"no {MUNGE_USER} user: install the munge package ({INSTALL_HINT})"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    def __init__(self, cpus: int | None = None):
        self.cpus = cpus or max(os.cpu_count() or 1, 2)
        self.root = Path(tempfile.mkdtemp(prefix="mplug-slurm-"))
        self.root.chmod(PUBLIC_DIR)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    # -- start and stop -------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            socket_path = self.start_munged()
            self.write_conf(socket_path)
            self.start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self.start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", NODE])
            self.wait_until_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start_munged(self) -> Path:
        """A munged of our own: its key, socket, pid and log under root/munge, run as the munge user."""
        munge = pwd.getpwnam(MUNGE_USER)
        folder = self.root / "munge"
        folder.mkdir(mode=PUBLIC_DIR)
        os.chown(folder, munge.pw_uid, munge.pw_gid)
        key = folder / "munge.key"
        key.write_bytes(os.urandom(MUNGE_KEY_BYTES))
        key.chmod(0o400)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        socket_path = folder / "munge.socket"
        self.start("munged", ["munged", "--foreground", f"--socket={socket_path}", f"--key-file={key}",
                              f"--log-file={folder / 'munged.log'}", f"--pid-file={folder / 'munged.pid'}",
                              f"--seed-file={folder / 'munged.seed'}"], user=munge)
        self.wait_for(socket_path.exists, f"munged's socket {socket_path}")
        return socket_path

    def write_conf(self, munge_socket: Path) -> None:
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir()
        self.conf.write_text(SLURM_CONF.format(
            node=NODE, ctld_port=free_port(), slurmd_port=free_port(), munge_socket=munge_socket, root=self.root,
            min_job_age=MIN_JOB_AGE_S, cpus=self.cpus, sched_interval_s=SCHED_INTERVAL_S,
            cred_expire_s=CRED_EXPIRE_S))

    def start(self, name: str, command: list[str], user: pwd.struct_passwd | None = None) -> None:
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        with open(self.root / f"{name}.out", "wb") as log:  # the daemon keeps its own copy of the descriptor
            self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                   **as_user))

    def wait_until_idle(self) -> None:
        def idle() -> bool:
            result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            return result.stdout.strip() == "idle"

        self.wait_for(idle, "the node to be idle in sinfo")

    def wait_for(self, condition, what: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited ({process.returncode}) while waiting for {what}: "
                                       f"{self.daemon_logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f} s: {self.daemon_logs()}")
            time.sleep(POLL_S)

    def daemon_logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
                         for path in sorted(self.root.glob("*.out")) + sorted(self.root.glob("log/*.log")))

    def stop(self) -> None:
        """Cancel the cluster's jobs, then stop slurmd, slurmctld and munged (what we started, newest first)."""
        if any(p.args[0] == "slurmctld" and p.poll() is None for p in self.processes):
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- jobs ------------------------------------------------------------------------------------

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as fields: JobState, Reason, Restarts, ExitCode, ..."""
        result = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True,
                                env=self.env, check=True)
        return dict(word.split("=", 1) for word in result.stdout.split() if "=" in word)

    def wait_for_job(self, job_id: str, states: tuple[str, ...], timeout: float, reason: str | None = None,
                     log: Path | None = None) -> dict[str, str]:
        """Poll until the job is in one of `states` (and pending for `reason`, when given); returns its fields.
        Fails at once when the job ends in another state; the tail of `log` goes into the error."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            state = fields["JobState"]
            if state in states and reason in (None, fields["Reason"]):
                return fields
            ended = state in FINAL_STATES
            if ended or time.monotonic() > deadline:
                why = "ended" if ended else f"still, after {timeout:.0f} s,"
                tail = log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log and log.exists() else ""
                raise AssertionError(f"job {job_id} {why} {state} (reason {fields['Reason']}, restarts "
                                     f"{fields['Restarts']}), waiting for {'/'.join(states)}"
                                     f"{f' ({reason})' if reason else ''}\n{tail}")
            time.sleep(POLL_S)


def cluster_or_skip() -> SlurmCluster:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    return SlurmCluster()
