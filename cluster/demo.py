"""`mplug demo`: the main job on its embedded default.

For now it pretrains the tiny model for a few steps on synthetic image-caption pairs, with a
tokenizer trained on the spot, and prints every loss: a check that the installed package builds
and trains the model with all four objectives on this machine.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from data_prep.batch import image_tensor, tokenize
from data_prep.synthetic import make_scenes, vocabulary_texts
from data_prep.tokenizer import train_wordpiece
from pretrain.config import load_config, to_dict
from pretrain.config.tokens import with_tokenizer
from pretrain.objectives.pretraining import MPLUGPretraining


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="pretrain the tiny model on synthetic pairs and print the losses")
    demo.add_argument("--output", type=Path, default=Path("demo-output"), help="where the tokenizer and report go")
    demo.add_argument("--steps", type=int, default=60, help="optimizer steps")
    demo.add_argument("--pairs", type=int, default=256, help="synthetic image-caption pairs to sample from")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a value of the tiny preset (repeatable)")
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    config = load_config("tiny", args.overrides)
    size = config.model.vision.image_size
    scenes = make_scenes(args.pairs, seed=args.seed, size=size)
    captions = [scene.caption for scene in scenes]
    tokenizer = train_wordpiece(vocabulary_texts() + captions, args.output / "tokenizer", vocab_size=config.model.text.vocab_size)
    config = with_tokenizer(config, tokenizer)
    images = torch.stack([image_tensor(scene.image, size) for scene in scenes])
    print(f"{len(scenes)} synthetic pairs, e.g. {captions[0]!r}; tokenizer of {len(tokenizer)} word pieces")

    model = MPLUGPretraining(config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay)
    batch_size = config.train.batch_size
    history, started = [], time.perf_counter()
    for step in range(args.steps):
        index = rng.sample(range(len(scenes)), batch_size)
        text = tokenize(tokenizer, [captions[i] for i in index], config.data.max_text_length)
        out = model(images[index], text["input_ids"], text["attention_mask"],
                    image_ids=torch.tensor(index), step=step)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
        optimizer.step()
        model.after_optimizer_step()
        losses = {name: round(value.item(), 4) for name, value in out.losses.items()}
        history.append({"step": step, "loss": round(out.loss.item(), 4), **losses})
        print(f"step {step:4d}  loss {out.loss.item():7.4f}  "
              + "  ".join(f"{k} {v:6.3f}" for k, v in losses.items()), flush=True)
    seconds = time.perf_counter() - started
    report = {"config": to_dict(config), "steps": history, "seconds": round(seconds, 2)}
    (args.output / "report.json").write_text(json.dumps(report, indent=2))
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"{args.steps} steps in {seconds:.1f}s: total loss {first:.3f} -> {last:.3f}; report in {args.output / 'report.json'}")
    return 0
