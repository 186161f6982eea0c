"""Each task's metric against its baseline, fine-tuned from a pretrained and from a random model.

What it runs, all through the `mplug` command as a user would, on the synthetic dataset
(`data_prep.synthetic_task_shards`: coloured shapes with captions, VQA v2 questions and RefCOCO
expressions, converted by the real converters):

1. a WordPiece tokenizer, then `mplug pretrain --config tiny` for `--pretrain-steps` steps on the
   training captions (all four objectives), tracked in a local MLflow store;
2. a random model package of the same config (`mplug pretrain --max-steps 0`);
3. `mplug finetune TASK --preset tiny` for vqa, caption, retrieval and grounding, once from the
   pretraining run's `runs:/<id>/model` and once from the random package, each ending with its
   evaluation (`metrics.json`).

It prints a table (task, metric, baseline, from random init, from pretraining, ratios to the
baseline) and writes it as JSON (`--json`). Quality, not speed: the numbers do not depend on the
machine's load, only on the seeds (and the tokenizer, whose ids vary between processes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from data_prep.synthetic import vocabulary_texts
from data_prep.synthetic_task_shards import TASK_DATA, write_task_shards
from data_prep.tokenizer import train_wordpiece

RESULTS = Path(__file__).parent / "results" / "finetune_tasks.json"


def mplug(*args: str, store: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    env.pop("RANK", None)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"mplug {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    print(f"  mplug {args[0]} {args[1]}: {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench-finetune"))
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--tasks", nargs="+", default=list(TASK_DATA))
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    out = args.output.resolve()
    store = f"sqlite:///{out}/mlflow.db"
    data = write_task_shards(out / "data", scenes=args.scenes)
    train_wordpiece(vocabulary_texts(), out / "tokenizer", vocab_size=200)
    common = ["--config", "tiny", "--data", str(data.caption / "train"), "--tokenizer", str(out / "tokenizer"),
              "--set", "train.log_every=50", "--set", "train.checkpoint_every=1000"]
    mplug("pretrain", *common, "--output", str(out / "pretrain"), "--max-steps", str(args.pretrain_steps), store=store)
    mplug("pretrain", *common, "--output", str(out / "random"), "--max-steps", "0", store=store)
    run_id = json.loads((out / "pretrain" / "package" / "package.json").read_text())["run_id"]
    inits = {"pretrained": f"runs:/{run_id}/model", "random": str(out / "random" / "package")}
    rows = []
    for task in args.tasks:
        row: dict = {"task": task}
        for name, init in inits.items():
            folder = out / f"{task}-{name}"
            mplug("finetune", task, "--init", init, "--data", str(data.for_task(task)), "--output",
                  str(folder), "--preset", "tiny", "--no-register", store=store)
            metrics = json.loads((folder / "metrics.json").read_text())
            row.update(metric=metrics["metric"], baseline=metrics["baseline"], count=metrics["metrics"]["count"])
            row[name] = metrics["value"]
        rows.append(row)
    print(f"\n{'task':<10} {'metric':<9} {'n':>5} {'baseline':>9} {'random':>9} {'pretrained':>11} "
          f"{'random/base':>12} {'pre/base':>9}")
    for r in rows:
        print(f"{r['task']:<10} {r['metric']:<9} {int(r['count']):>5} {r['baseline']:>9.3f} {r['random']:>9.3f} "
              f"{r['pretrained']:>11.3f} {r['random'] / r['baseline']:>12.2f} {r['pretrained'] / r['baseline']:>9.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"scenes": args.scenes, "pretrain_steps": args.pretrain_steps, "preset": "tiny",
                                     "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
