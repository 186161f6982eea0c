"""`mplug finetune TASK` (train and evaluate a downstream task) and `mplug predict` (one image or video)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune.registry import TASKS


def register(subparsers: argparse._SubParsersAction) -> None:
    finetune = subparsers.add_parser(
        "finetune", help="fine-tune and evaluate a downstream task from a pretrained model package",
        description="Runs as one rank of a job (rank from torchrun / deepspeed / srun / Ray Train variables), or "
                    "--nproc-per-node starts N local ranks. Ends with the evaluation: OUTPUT/metrics.json.",
    )
    finetune.add_argument("task", choices=sorted(TASKS), help="the downstream task")
    finetune.add_argument("--init", required=True,
                          help="a model package folder, runs:/<run_id>/model or models:/<name>/<version>")
    finetune.add_argument("--data", required=True, help="a converter's output folder (one subfolder per split)")
    finetune.add_argument("--output", required=True, type=Path, help="checkpoints, package, metrics.json, MLflow")
    finetune.add_argument("--preset", help="an overlay on the task's preset, e.g. 'tiny' for the tiny model on a CPU")
    finetune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a value: image_size=384, epochs=2, train.lr=1e-5, task.beams=3 (repeatable)")
    finetune.add_argument("--max-steps", type=int, help="optimizer steps (default: from epochs over the train split)")
    finetune.add_argument("--nproc-per-node", type=int, help="start this many local ranks (torchrun)")
    finetune.add_argument("--resume", help="'auto' (the newest complete checkpoint under --output) or a path")
    finetune.add_argument("--eval-only", action="store_true", help="evaluate the init model without training")
    finetune.add_argument("--eval-batch-size", type=int, default=0, help="evaluation batch per rank")
    finetune.add_argument("--no-register", action="store_true", help="do not register the model in MLflow")
    finetune.set_defaults(handler=run_finetune)

    predict = subparsers.add_parser(
        "predict", help="one image or video in: an answer, a caption, a box, scored texts or action classes out",
        description="The package's task decides what it needs: an image model takes --image, a video model "
                    "(video_qa, video_caption, video_retrieval, action_classification) takes --video.")
    predict.add_argument("--model", required=True, help="a fine-tuned package folder, runs:/... or models:/...")
    media = predict.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", type=Path, help="an image file (JPEG, PNG, WebP)")
    media.add_argument("--video", type=Path, help="a video file (mp4, webm, avi, mkv, mov)")
    what = predict.add_mutually_exclusive_group(required=True)
    what.add_argument("--question", help="vqa / video_qa: the question to answer")
    what.add_argument("--task", choices=("caption", "classify"),
                      help="caption: caption the image or video; classify: the top-5 action classes of the video")
    what.add_argument("--expression", help="grounding: the referring expression to find")
    what.add_argument("--text", action="append", metavar="TEXT",
                      help="retrieval / video_retrieval: a candidate text to score (repeat for several)")
    predict.add_argument("--output", type=Path, help="where to put the image with the box drawn (grounding)")
    predict.set_defaults(handler=run_predict)

    from finetune.official_tasks import register as register_official_import
    from pretrain.cli import import_subcommands

    register_official_import(import_subcommands(subparsers))  # `mplug import official`

def forwarded_arguments(args: argparse.Namespace) -> list[str]:
    argv = ["finetune", args.task, "--init", args.init, "--data", args.data, "--output", str(args.output)]
    for flag, value in (("--preset", args.preset), ("--max-steps", args.max_steps), ("--resume", args.resume),
                        ("--eval-batch-size", args.eval_batch_size or None)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [flag for flag, on in (("--eval-only", args.eval_only), ("--no-register", args.no_register)) if on]
    for override in args.overrides:
        argv += ["--set", override]
    return argv

def run_finetune(args: argparse.Namespace) -> int:
    from finetune.config import load_finetune_config
    from finetune.registry import task_class

    load_finetune_config(task_class(args.task), args.preset, args.overrides)  # config errors before any launch
    if args.nproc_per_node:
        from pretrain.launch import launch_local

        return launch_local(args.nproc_per_node, "finetune.cli", forwarded_arguments(args))
    from finetune.run import finetune_this_rank

    return finetune_this_rank(args)

def run_predict(args: argparse.Namespace) -> int:
    from finetune.predict import predict_command

    return predict_command(args)

def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.cli finetune ...`: what each local rank of --nproc-per-node runs."""
    import logging

    from pretrain.config import ConfigError

    parser = argparse.ArgumentParser(prog="mplug")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"mplug: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
