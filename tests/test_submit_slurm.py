"""`mplug submit slurm`: the batch script it writes, run under fake Slurm variables, and real jobs on
a private single-node Slurm cluster (tests/slurm_cluster.py): a tiny pretraining with 2 tasks, a job
preempted, requeued and resumed from its checkpoint, and Ray started on a job's nodes.

The rank wiring is checked by executing the whole `--dry-run` script with bash: sbatch's variables
for the allocation its own #SBATCH lines ask for, `scontrol show hostnames` for real (it only needs
a slurm.conf naming a cluster), and a stand-in `srun` that runs the task once per rank as srun
numbers them (block distribution), so the command each task would run prints its place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
from slurm_cluster import cluster_or_skip

from cluster.cli import main
from cluster.sbatch_script import master_port_for_job
from data_prep.synthetic import vocabulary_texts
from data_prep.tokenizer import train_wordpiece
from pretrain.launch import free_port

REPO = Path(__file__).resolve().parents[1]
RAY_SCRIPT = REPO / "cluster" / "scripts" / "ray_on_slurm.sbatch"
PRINT_PLACE = ["sh", "-c", 'echo "place $RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT"']
MINIMAL_SLURM_CONF = "ClusterName=fake\nSlurmctldHost=localhost\n"  # enough for `scontrol show hostnames`
FAKE_SRUN = """#!/bin/bash
# srun on a pretend allocation: the task once per rank, node by node, numbered as srun numbers them
while [[ "$1" == --* ]]; do shift; done
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  for ((local = 0; local < SLURM_NTASKS_PER_NODE; local++)); do
    SLURM_PROCID=$((node * SLURM_NTASKS_PER_NODE + local)) SLURM_LOCALID=$local SLURM_NODEID=$node "$@" || exit
  done
done
"""
FAKE_MPLUG = '#!/bin/bash\nprintf "%s\\n" "$@"\n'  # prints the words it was run with
PLACE_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")

TRAIN_STEPS = 12
PREEMPTED_STEPS = 40
SIGNAL_AFTER_STEP = 3
JOB_TIMEOUT_S = 900  # a failsafe only: a busy machine can hold a job's start for minutes
RAY_JOB_TIMEOUT_S = 600
POLL_S = 0.5


def mplug(capsys, *args: str) -> tuple[int, str, str]:
    """`mplug ARGS` in this process (the command's imports take seconds): exit code, stdout, stderr."""
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dry_run(capsys, *args: str) -> str:
    code, out, err = mplug(capsys, "submit", "slurm", "--dry-run", *args)
    assert code == 0, err
    return out


def sbatch_options(script: str) -> dict[str, str | None]:
    """The script's `#SBATCH --key[=value]` lines as a dict."""
    options = {}
    for key, _, value in re.findall(r"^#SBATCH --([a-z-]+)(=(.*))?$", script, flags=re.MULTILINE):
        options[key] = value if _ else None
    return options


def run_as_batch_job(script: str, tmp_path: Path, nodelist: str, job_id: int) -> subprocess.CompletedProcess:
    """Run `script` as sbatch would start it on the allocation its #SBATCH lines ask for, with FAKE_SRUN."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed: apt-get install slurm-client (or `make system-deps`)")
    options = sbatch_options(script)
    nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    (tmp_path / "slurm.conf").write_text(MINIMAL_SLURM_CONF)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in PLACE_VARIABLES}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_CONF=str(tmp_path / "slurm.conf"), SLURM_JOB_ID=str(job_id),
               SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
               SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NTASKS=str(nodes * per_node))
    (tmp_path / "job.sbatch").write_text(script)
    result = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def places(output: str) -> list[tuple[int, int, int, str, int]]:
    """(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that each task printed."""
    found = []
    for line in output.splitlines():
        if line.startswith("place "):
            rank, world, local, addr, port = line.split()[1:]
            found.append((int(rank), int(world), int(local), addr, int(port)))
    return found


# -- the script, under fake Slurm variables (about 1 s each) -------------------------------------------------

@pytest.mark.parametrize(("args", "nodelist", "job_id", "expected_addr", "nodes", "per_node"), [
    (["--gpus-per-node", "1"], "gpu-a7", 77, "gpu-a7", 1, 1),
    (["--nodes", "4", "--gpus-per-node", "2"], "node[03-06]", 123456, "node03", 4, 2),
], ids=["1-node", "4-nodes"])
def test_every_task_gets_its_rank_and_the_rendezvous_on_the_first_node(capsys, tmp_path, args, nodelist, job_id,
                                                                        expected_addr, nodes, per_node):
    script = dry_run(capsys, *args, "--", *PRINT_PLACE)
    result = run_as_batch_job(script, tmp_path, nodelist, job_id)
    world = nodes * per_node
    port = master_port_for_job(job_id)
    assert places(result.stdout) == [(rank, world, rank % per_node, expected_addr, port) for rank in range(world)]


def test_master_port_option_replaces_the_port_from_the_job_id(capsys, tmp_path):
    script = dry_run(capsys, "--nodes", "2", "--master-port", "23456", "--", *PRINT_PLACE)
    result = run_as_batch_job(script, tmp_path, "cn[1,5]", 99)
    assert {(addr, port) for *_, addr, port in places(result.stdout)} == {("cn1", 23456)}


def test_jobs_with_different_ids_rendezvous_on_different_ports():
    assert master_port_for_job(1000) != master_port_for_job(1001)
    assert all(19999 < master_port_for_job(job_id) < 32768 for job_id in (0, 1, 9999, 10000, 2**31 - 1))


def test_sbatch_lines_ask_for_one_task_per_gpu_a_requeue_and_the_preemption_signal(capsys, tmp_path):
    script = dry_run(capsys, "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "12", "--partition", "gpu",
                     "--account", "vision", "--time", "2-00:00:00", "--job-name", "pretrain-large",
                     "--log-dir", str(tmp_path / "logs"), "--signal-before", "600",
                     "--sbatch-option", "mem=0", "--sbatch-option", "exclusive", "--", "true")
    assert sbatch_options(script) == {
        "job-name": "pretrain-large", "nodes": "4", "ntasks-per-node": "8", "gpus-per-node": "8",
        "cpus-per-task": "12", "partition": "gpu", "account": "vision", "time": "2-00:00:00",
        "output": f"{tmp_path / 'logs'}/pretrain-large-%j.out", "open-mode": "append", "requeue": None,
        "signal": "B:USR1@600", "mem": "0", "exclusive": None}


def test_without_gpus_a_node_runs_one_task(capsys):
    assert sbatch_options(dry_run(capsys, "--nodes", "3", "--", "true"))["ntasks-per-node"] == "1"


def test_the_environment_of_this_mplug_is_activated_unless_env_setup_replaces_it(capsys):
    assert f"source {sys.prefix}/bin/activate" in dry_run(capsys, "--", "true").splitlines()
    replaced = dry_run(capsys, "--env-setup", "module load cuda/12", "--env-setup", "conda activate mplug", "--",
                       "true")
    assert "module load cuda/12\nconda activate mplug\n" in replaced
    assert "bin/activate" not in replaced


def fake_mplug_words(capsys, tmp_path: Path, command: list[str]) -> tuple[list[str], str]:
    """The words the task's `mplug` is run with (a stand-in that prints them), and what submit said."""
    bin_dir = tmp_path / "fake-mplug"
    bin_dir.mkdir()
    (bin_dir / "mplug").write_text(FAKE_MPLUG)
    (bin_dir / "mplug").chmod(0o755)
    code, script, said = mplug(capsys, "submit", "slurm", "--dry-run", "--env-setup", f'export PATH={bin_dir}:"$PATH"',
                               "--", *command)
    assert code == 0, said
    printed = run_as_batch_job(script, tmp_path, "n1", 5).stdout.splitlines()
    return [line for line in printed if not line.startswith("mplug: ")], said


def test_a_training_command_gets_resume_auto_so_a_requeued_job_continues(capsys, tmp_path):
    words, said = fake_mplug_words(capsys, tmp_path, ["mplug", "pretrain", "--config", "tiny", "--data", "shards/a b",
                                              "--output", "out"])
    assert words == ["pretrain", "--config", "tiny", "--data", "shards/a b", "--output", "out", "--resume", "auto"]
    assert "added `--resume auto`" in said


def test_a_command_with_its_own_resume_is_run_as_given(capsys, tmp_path):
    words, said = fake_mplug_words(capsys, tmp_path, ["mplug", "finetune", "vqa", "--resume", "ckpt/step_00000010"])
    assert words == ["finetune", "vqa", "--resume", "ckpt/step_00000010"]
    assert "--resume auto" not in said


@pytest.mark.parametrize(("args", "message"), [
    (["--sbatch-option", "time=1:00:00", "--", "true"], "--sbatch-option time is set by `mplug submit slurm` "
                                                        "itself: use --time"),
    (["--sbatch-option", "mem 64G", "--", "true"], "not an sbatch long option name"),
    (["--gpus-per-node", "-1", "--", "true"], "--gpus-per-node must be at least 0, got -1"),
    (["--", "mplug", "pretrain", "--nproc-per-node", "2"], "drop --nproc-per-node"),
    ([], "no command to run"),
], ids=["managed-option", "bad-option", "negative-gpus", "nproc-per-node", "no-command"])
def test_a_job_that_cannot_be_written_is_refused_saying_why(capsys, args, message):
    code, _, said = mplug(capsys, "submit", "slurm", "--dry-run", *args)
    assert code == 2
    assert message in said


# -- a real single-node Slurm cluster -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm():
    with cluster_or_skip() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm-tokenizer")
    train_wordpiece(vocabulary_texts(), folder, vocab_size=200)
    return folder


def submit_pretraining(capsys, monkeypatch, slurm, task_shards, tokenizer_dir: Path, folder: Path, steps: int,
                       checkpoint_every: int) -> tuple[str, Path, Path]:
    """`mplug submit slurm --ntasks-per-node 2 -- mplug pretrain ...` from `folder`; returns the job id, the
    run's output folder and the job's log. The job gets this environment: sbatch passes it on."""
    output = folder / "out"
    monkeypatch.chdir(folder)
    for name, value in {"SLURM_CONF": slurm.env["SLURM_CONF"], "OMP_NUM_THREADS": "1",
                        "MLFLOW_TRACKING_URI": f"sqlite:///{output}/mlflow.db"}.items():
        monkeypatch.setenv(name, value)
    code, said, err = mplug(capsys, "submit", "slurm", "--ntasks-per-node", "2", "--job-name", "tiny", "--", "mplug",
                            "pretrain", "--config", "tiny", "--data", str(task_shards.caption / "train"),
                            "--output", str(output), "--tokenizer", str(tokenizer_dir), "--max-steps", str(steps),
                            "--set", "train.log_every=1", "--set", f"train.checkpoint_every={checkpoint_every}")
    assert code == 0, err
    job_id, log = re.search(r"submitted Slurm job (\d+) \(tiny\); log: (\S+)", said).groups()
    assert Path(log) == folder / "slurm-logs" / f"tiny-{job_id}.out"
    return job_id, output, Path(log)


def logged_steps(output: Path, key: str = "loss") -> list[int]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sorted(point.step for point in client.get_metric_history(run.info.run_id, key))


@pytest.mark.slow
def test_pretraining_job_with_2_tasks_completes_and_logs_every_step(capsys, monkeypatch, slurm, task_shards,
                                                                     tokenizer_dir, tmp_path):
    # about 65 s on 2 CPU cores
    job_id, output, log = submit_pretraining(capsys, monkeypatch, slurm, task_shards, tokenizer_dir, tmp_path,
                                             TRAIN_STEPS, 6)
    job = slurm.wait_for_job(job_id, ("COMPLETED",), JOB_TIMEOUT_S, log=log)
    assert (job["NumTasks"], job["Restarts"]) == ("2", "0")
    assert logged_steps(output) == list(range(1, TRAIN_STEPS + 1))
    assert (output / "package" / "model.safetensors").exists()


def wait_for_metrics_step(output: Path, step: int, job_id: str, slurm) -> None:
    """Until the run's metrics journal has reached `step` (training is under way)."""
    journal = output / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (journal.exists() and any(json.loads(line).get("step", 0) >= step
                                        for line in journal.read_text().splitlines() if line.strip())):
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state} before step {step}"
        assert time.monotonic() < deadline, f"job {job_id} has not reached step {step} in {JOB_TIMEOUT_S} s"
        time.sleep(POLL_S)


@pytest.mark.slow
def test_preempted_job_checkpoints_is_requeued_and_resumes_from_its_checkpoint(capsys, monkeypatch, slurm, task_shards,
                                                                              tokenizer_dir, tmp_path):
    # about 110 s: two starts of the job and the requeue delay
    job_id, output, log = submit_pretraining(capsys, monkeypatch, slurm, task_shards, tokenizer_dir, tmp_path,
                                             PREEMPTED_STEPS, PREEMPTED_STEPS)
    wait_for_metrics_step(output, SIGNAL_AFTER_STEP, job_id, slurm)
    # what `#SBATCH --signal=B:USR1@S` does S seconds before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm.env, check=True)
    # requeued, it waits for its begin time: requeue + the credential lifetime (slurm.conf AuthInfo=cred_expire,
    # 120 s by default, 20 s in the test cluster); forcing StartTime=now fails the launch ("Job credential revoked")
    requeued = slurm.wait_for_job(job_id, ("PENDING",), JOB_TIMEOUT_S, reason="BeginTime", log=log)
    assert requeued["Restarts"] == "1"

    slurm.wait_for_job(job_id, ("COMPLETED",), JOB_TIMEOUT_S, log=log)
    text = log.read_text()
    stopped_at = int(re.search(r"stopped by signal \S+ at step (\d+)", text).group(1))
    assert SIGNAL_AFTER_STEP <= stopped_at < PREEMPTED_STEPS
    assert re.search(rf"resumed from \S+/step_{stopped_at:08d} at step {stopped_at}\n", text)
    assert logged_steps(output) == list(range(1, PREEMPTED_STEPS + 1))  # one MLflow run, every step once


@pytest.fixture
def ray_temp_dir():
    """Ray's session folder: short (its socket paths must fit in 107 bytes) and ours alone."""
    folder = Path(tempfile.mkdtemp(prefix="ray-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_ray_script_starts_a_head_on_the_first_node_and_runs_the_command_against_it(slurm, tmp_path, ray_temp_dir):
    # about 30 s; ports of our own: other tests may run a Ray head on this machine at the same time
    ray_env = {**slurm.env, "MPLUG_ENV_SETUP": f"source {sys.prefix}/bin/activate", "RAY_PORT": str(free_port()),
               "RAY_DASHBOARD_PORT": str(free_port()),
               "RAY_START_ARGS": f"--ray-client-server-port={free_port()} "
                                 f"--dashboard-agent-listen-port={free_port()} --temp-dir={ray_temp_dir}"}
    probe = ("import ray, os; ray.init(address='auto'); "
             "print('nodes', len(ray.nodes()), 'cpus', int(ray.cluster_resources()['CPU']), os.environ['RAY_ADDRESS'])")
    result = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/ray-%j.out", str(RAY_SCRIPT), "python",
                             "-c", probe], env=ray_env, capture_output=True, text=True, cwd=tmp_path, check=True)
    job_id = result.stdout.strip()
    log = tmp_path / f"ray-{job_id}.out"
    slurm.wait_for_job(job_id, ("COMPLETED",), RAY_JOB_TIMEOUT_S, log=log)
    assert f"nodes 1 cpus {slurm.cpus} 127.0.0.1:{ray_env['RAY_PORT']}" in log.read_text()
