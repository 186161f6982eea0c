"""`mplug finetune` refuses what it cannot start from, with errors that say what to give instead.

Every task fine-tuned from a pretraining run's runs:/ URI against a real `mlflow server`, its
lineage and `mplug predict` are specified by the demo's tests (test_demo.py), which run exactly that."""

from __future__ import annotations

import os
import subprocess
import sys


def mplug(*args: str, store: str, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": store}
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def test_an_init_uri_that_does_not_exist_is_a_clear_error(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    result = mplug("finetune", "vqa", "--init", "runs:/0123456789abcdef/model", "--data", str(tmp_path),
                   "--output", str(tmp_path / "out"), "--preset", "tiny", store=store, check=False)
    assert result.returncode == 2
    assert "no run '0123456789abcdef' in the tracking store" in result.stderr
    result = mplug("finetune", "vqa", "--init", str(tmp_path / "nowhere"), "--data", str(tmp_path),
                   "--output", str(tmp_path / "out"), "--preset", "tiny", store=store, check=False)
    assert result.returncode == 2
    assert "does not exist; give a model package folder" in result.stderr


def test_an_unknown_task_setting_is_a_configuration_error_naming_the_valid_keys(tmp_path):
    result = mplug("finetune", "vqa", "--init", str(tmp_path), "--data", str(tmp_path), "--output", str(tmp_path),
                   "--set", "task.beam=3", store=f"sqlite:///{tmp_path}/mlflow.db", check=False)
    assert result.returncode == 2
    assert "task has no key 'beam'" in result.stderr and "beams" in result.stderr
