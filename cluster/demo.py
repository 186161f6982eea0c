"""`mplug demo`: the whole pipeline on this machine, from a URL list to evaluated fine-tuned models.

Each stage runs the `mplug` command a user would type (printed before it runs), so the demo is
also a walkthrough:

 1. synthetic data: coloured-shape images, a URL list and annotations in the official formats
 2. download: the URL list, served on loopback, through img2dataset on a local Ray into shards
 3. tokenizer: a WordPiece vocabulary from the shard captions and the task texts
 4. pretrain: the tiny model, all four objectives, DeepSpeed ZeRO on 2 local ranks, MLflow
 5. task data: the caption, VQA and RefCOCO annotations converted into task shards
 6. fine-tune and evaluate every task from the pretraining run's `runs:/<id>/model`

It ends with a table of each task's metric beside its chance baseline and writes
`OUTPUT/report.json`. Runs are tracked in `MLFLOW_TRACKING_URI` when set, else in
`OUTPUT/mlflow.db`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_prep.serve import LoopbackServer
from data_prep.synthetic import vocabulary_texts
from data_prep.synthetic_export import write_synthetic
from data_prep.synthetic_task_shards import TASK_DATA, convert_task_shards
from pretrain.tracking import RUN_RECORD_NAME, local_tracking_uri

MARKER = ".mplug-demo"  # marks a folder the demo wrote, so a rerun may clear it


@dataclass(frozen=True)
class DemoSettings:
    """The embedded default: about 10 minutes on 2 CPU cores."""

    scenes: int = 300  # synthetic images (80/10/10 train/val/test): 1,200 captions, 1,200 questions
    image_size: int = 64  # the tiny model's resolution; the images are drawn at it
    vocab_size: int = 200  # WordPiece entries: the synthetic language is small
    pretrain_steps: int = 300
    pretrain_ranks: int = 2
    zero_stage: int = 2
    finetune_preset: str = "tiny"
    tasks: tuple[str, ...] = tuple(TASK_DATA)
    seed: int = 0


@dataclass
class Progress:
    """Prints each stage as it starts and how long it took; keeps the timings for the report."""

    total: int
    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    _index: int = 0

    def stage(self, name: str, what: str) -> _Timer:
        self._index += 1
        elapsed = time.perf_counter() - self.started
        print(f"\n== [{self._index}/{self.total}] {name}: {what}  (at {elapsed:.0f}s)", flush=True)
        return _Timer(self, name)


@dataclass
class _Timer:
    progress: Progress
    name: str
    start: float = field(default_factory=time.perf_counter)

    def __enter__(self) -> _Timer:
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.start
        self.progress.seconds[self.name] = round(seconds, 1)
        if exc[0] is None:
            print(f"== {self.name} done in {seconds:.0f}s", flush=True)


class StageFailed(RuntimeError):
    pass


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoSettings()
    demo = subparsers.add_parser(
        "demo", help="the whole pipeline on this machine: synthetic URLs -> shards -> pretraining -> every task",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--output", type=Path, default=Path("demo-output"),
                      help="where everything goes (default: %(default)s); a folder a previous demo wrote is cleared")
    demo.add_argument("--scenes", type=int, default=defaults.scenes, help="synthetic images (default: %(default)s)")
    demo.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps,
                      help="pretraining steps (default: %(default)s)")
    demo.add_argument("--tasks", nargs="+", choices=tuple(TASK_DATA), default=list(defaults.tasks),
                      help="tasks to fine-tune (default: all)")
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    settings = DemoSettings(scenes=args.scenes, pretrain_steps=args.pretrain_steps, tasks=tuple(args.tasks),
                            seed=args.seed)
    try:
        output = prepare_output(args.output)
    except ValueError as error:
        print(f"mplug demo: {error}", file=sys.stderr)
        return 2
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri(output)
    try:
        report = run_pipeline(output, settings, tracking_uri)
    except StageFailed as error:
        print(f"\nmplug demo: {error}", file=sys.stderr)
        return 1
    (output / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report, output)
    return 0


def prepare_output(output: Path) -> Path:
    """An empty folder for the demo: created, or cleared when a previous demo wrote it."""
    output = output.resolve()
    if output.exists() and any(output.iterdir()):
        if not (output / MARKER).exists():
            raise ValueError(f"{output} is not empty and was not written by `mplug demo`; give an empty "
                             "or new folder with --output")
        print(f"clearing the previous demo in {output}")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).touch()
    return output


def run_pipeline(output: Path, settings: DemoSettings, tracking_uri: str) -> dict[str, Any]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "NO_ALBUMENTATIONS_UPDATE": "1"}
    progress = Progress(total=5 + len(settings.tasks))
    synthetic_dir, shards, tokenizer = output / "synthetic", output / "shards", output / "tokenizer"
    synthetic_dir.mkdir()
    with LoopbackServer(synthetic_dir) as server:
        with progress.stage("synthetic data", f"{settings.scenes} images, URL list and annotations"):
            synthetic = write_synthetic(synthetic_dir, settings.scenes, seed=settings.seed,
                                        image_size=settings.image_size, base_url=server.base_url)
            print(f"{synthetic.urls_parquet} lists {settings.scenes} URLs served at {server.base_url}")
        with progress.stage("download", "img2dataset on a local Ray into webdataset shards"):
            mplug(env, "data", "download", str(synthetic.urls_parquet), "--output", str(shards),
                  "--image-size", str(settings.image_size), "--processes", "2", "--shard-size", "64")
    with progress.stage("tokenizer", "WordPiece from the shard captions and the task vocabulary"):
        words = output / "task_vocabulary.txt"
        words.write_text("\n".join(vocabulary_texts()) + "\n")
        mplug(env, "data", "tokenizer", str(words), "--shards", str(shards), "--output", str(tokenizer),
              "--vocab-size", str(settings.vocab_size))
    with progress.stage("pretrain", f"tiny model, {settings.pretrain_steps} steps, ITC+ITM+MLM+PrefixLM, "
                        f"DeepSpeed ZeRO-{settings.zero_stage} on {settings.pretrain_ranks} ranks"):
        mplug(env, "pretrain", "--config", "tiny", "--data", str(shards), "--output", str(output / "pretrain"),
              "--tokenizer", str(tokenizer), "--max-steps", str(settings.pretrain_steps),
              "--nproc-per-node", str(settings.pretrain_ranks), "--set", f"train.zero_stage={settings.zero_stage}",
              "--set", "train.log_every=25", "--set", "train.checkpoint_every=100",
              "--set", f"train.package_every={settings.pretrain_steps}")
        run_id = json.loads((output / "pretrain" / RUN_RECORD_NAME).read_text())["run_id"]
        print(f"pretraining run {run_id}: its model is runs:/{run_id}/model")
    with progress.stage("task data", "caption, VQA and RefCOCO annotations into task shards"):
        task_shards = convert_task_shards(synthetic, output / "tasks")
    tasks: dict[str, Any] = {}
    for task in settings.tasks:
        with progress.stage(f"finetune {task}", f"from runs:/{run_id}/model, then evaluate"):
            data = task_shards.for_task(task)
            mplug(env, "finetune", task, "--init", f"runs:/{run_id}/model", "--data", str(data),
                  "--output", str(output / task), "--preset", settings.finetune_preset)
            metrics = json.loads((output / task / "metrics.json").read_text())
            tasks[task] = {key: metrics[key] for key in ("metric", "value", "baseline", "run_id", "registered")}
    return {
        "tasks": tasks,
        "pretrain_run_id": run_id,
        "tracking_uri": tracking_uri,
        "browse": browse_command(tracking_uri),
        "seconds": round(time.perf_counter() - progress.started, 1),
        "stage_seconds": progress.seconds,
        "settings": asdict(settings),
    }


def mplug(env: dict[str, str], *args: str) -> None:
    """Run `mplug ARGS` as its own process, its output streaming to ours; StageFailed if it fails."""
    print("$ mplug " + " ".join(args), flush=True)
    code = subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env).returncode
    if code != 0:
        raise StageFailed(f"`mplug {' '.join(args)}` exited with {code}; its output is above")


def browse_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def print_report(report: dict[str, Any], output: Path) -> None:
    rows = [(task, r["metric"], f"{r['value']:.2f}", f"{r['baseline']:.2f}",
             f"{r['value'] / r['baseline']:.1f}x" if r["baseline"] else "-") for task, r in report["tasks"].items()]
    header = ("task", "metric", "value", "baseline", "ratio")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print(f"\nmplug demo finished in {report['seconds'] / 60:.1f} min")
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"\npretraining run {report['pretrain_run_id']}; every run is in {report['tracking_uri']}")
    print(f"browse them: {report['browse']}")
    print(f"report: {output / 'report.json'}")
