"""How long `mplug demo` takes on this machine, stage by stage, and what it reaches.

Runs the README's main job exactly as `make demo` does (`mplug demo --output DIR`, its embedded
default: 300 synthetic scenes, 300 pretraining steps on 2 ranks, every task fine-tuned with the
tiny preset), then reads the stage timings and each task's metric from `DIR/report.json`. It
prints a table and writes it as JSON with the machine's CPU count and load average beside it: the
target is the whole pipeline within 20 minutes on 2 CPU cores, and on a shared machine a high
load average explains a slow run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "demo.json"
TARGET_MINUTES = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench-demo"), help="the demo's folder")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "RANK")}
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "demo", "--output", str(args.output)],
                            env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"mplug demo failed ({result.returncode}):\n{result.stderr[-4000:]}")
    report = json.loads((args.output / "report.json").read_text())
    stages = report["stage_seconds"]
    print(f"{'stage':<22}{'seconds':>9}")
    for stage, seconds in stages.items():
        print(f"{stage:<22}{seconds:>9.1f}")
    print(f"{'total (wall)':<22}{wall:>9.1f}   target {TARGET_MINUTES * 60:.0f}")
    print(f"\n{'task':<12}{'metric':<10}{'value':>8}{'baseline':>10}")
    for task, row in report["tasks"].items():
        print(f"{task:<12}{row['metric']:<10}{row['value']:>8.2f}{row['baseline']:>10.2f}")
    load_after = os.getloadavg()
    print(f"\nload average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    record = {
        "wall_seconds": round(wall, 1),
        "target_seconds": TARGET_MINUTES * 60,
        "stage_seconds": stages,
        "tasks": {task: {key: row[key] for key in ("metric", "value", "baseline")}
                  for task, row in report["tasks"].items()},
        "settings": report["settings"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": load_after},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
