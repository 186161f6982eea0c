"""Training-step throughput and MFU on the real training path, and ZeRO-2 against plain DP.

What one step is: the body of `pretrain.trainer.Trainer`'s loop, less its logging. A `Trainer` builds the
DeepSpeed engine (`pretrain.engine.build_engine` around `MPLUGPretraining`, the project's AdamW
groups and schedule); one step is `train.grad_accumulation` micro-steps of `Trainer.micro_step`
(forward through the engine, the all-rank finiteness check, `engine.backward`, `engine.step`, the
losses read back with `.item()`), then `momentum_update` (temperature clamp and EMA copies).
The micro-step is written out here with timers between its forward, backward and optimizer
parts, in the trainer's order and with its calls; the one difference is that the all-rank
finiteness flag lives on the loss's device (the trainer's `all_finite` builds it on the CPU,
which gloo reduces but NCCL does not), so the same code runs on a GPU. A part's time, like the
step's, is the slowest rank's, so the parts need not add up to the step.

Where the batches come from: synthetic image-text shards (`data_prep.synthetic`) and a WordPiece
tokenizer trained on their captions are written to a temporary folder; each rank then reads a
few batches through `data_prep.loader.ShardLoader` with the trainer's own loader settings
(`Trainer.loader`: pretraining crop and flip, captions padded to `data.max_text_length`) before
any timing, moves them to the device and cycles through them. The step is timed alone: no data
loading, decoding or host-to-device copy is inside it. The model keeps its preset's vocabulary
size (the MLM and LM heads cost what they cost in the real model); only the special-token ids
come from the small tokenizer.

What is measured, each by launching this same script under `torch.distributed.run` in its
`--worker` mode (gloo on DeepSpeed's CPU accelerator without a GPU, NCCL with one):

- single rank, per preset: median step time, samples/s, and MFU = analytic training FLOPs per
  sample (`pretrain.flops.flops_per_sample(config, text_tokens=L)`) x samples/s / peak. The peak
  comes from `pretrain.flops.resolve_peak_flops`: `--peak-flops` when given, else the GPU's
  dense peak from the table, else none, and MFU is printed as "n/a" (a CPU has no standard peak);
- ZeRO-2 against plain data parallel on `--compare-ranks` ranks (2 CPU ranks by default, one
  thread each): the same model, global batch and batches, once with `train.zero_stage=0`
  (DeepSpeed's data-parallel gradient allreduce) and once with `train.zero_stage=2`. Both engines
  live in the same processes and run in blocks of `--steps` steps that alternate, in an order that
  rotates every repeat; `--warmup` steps of each engine come first and are not timed. A step's
  time is the slowest rank's. The ratio is the median over repeats of ZeRO-2's median step time
  over ZeRO-0's in the same repeat.

The development machines have 2 shared, noisy cores: read the ratio and the medians; absolute
speed and MFU mean something only on a GPU (`--device cuda --presets base large --dtype bf16`).

    .venv/bin/python bench/train_step.py [--peak-flops F] [--repeats 7] [--steps 3]
    .venv/bin/python bench/train_step.py --device cuda --presets base large --dtype bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "train_step.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
MARKER = "[train_step]"  # worker lines the launcher echoes; the rest goes to the log only
TOKENIZER_VOCAB = 200  # the synthetic captions need fewer words than this
SHARD_SIZE = 64
MIN_SCENES = 96
SCENE_SEED = 7
BASELINE_STAGE = 0  # plain data parallel: DeepSpeed's ZeRO-0 allreduces the gradients
ZERO_STAGE = 2
LOG_TAIL_CHARS = 6000
MS = 1e3
DTYPES = ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------
# Worker: one rank of a torchrun job
# ---------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"{MARKER} {text}", flush=True)


def bench_config(args: argparse.Namespace, preset: str, stage: int, tokenizer):
    """The preset with the bench's overrides, fitted to the tokenizer's special ids."""
    from pretrain.config import load_config

    overrides = [f"train.zero_stage={stage}", "data.workers=0", *args.overrides]
    if args.batch is not None:
        overrides.append(f"train.batch_size={args.batch}")
    if args.dtype is not None:
        overrides.append(f"train.precision={args.dtype}")
    config = load_config(preset, overrides)
    # The preset's vocabulary size stays: the heads over it are part of the model's cost. The
    # tokenizer's ids are all below it, and its special ids replace BERT's defaults.
    vocab = max(config.model.text.vocab_size, len(tokenizer))
    text = dataclasses.replace(
        config.model.text,
        vocab_size=vocab,
        pad_id=tokenizer.pad_token_id,
        cls_id=tokenizer.cls_token_id,
        sep_id=tokenizer.sep_token_id,
        mask_id=tokenizer.mask_token_id,
    )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, text=text))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepared_batches(trainer, count: int) -> list[dict[str, Any]]:
    """`count` batches from the trainer's own loader, on the device before any timing."""
    batches = []
    loader = trainer.loader(None)
    for batch in loader:
        batches.append(
            {k: v.to(trainer.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        )
        if len(batches) == count:
            break
    return batches


def timed_step(trainer, batches: list[dict[str, Any]], cursor: int) -> tuple[dict[str, float], int]:
    """One training step as the trainer runs it; seconds per part. Returns (times, next cursor).

    The micro-step is `Trainer.micro_step` written out, with a timer after the forward (and the
    finiteness check, which reads the loss) and after the backward.
    """
    from data_prep.batch import normalize
    from pretrain.engine import momentum_update

    engine, device = trainer.engine, trainer.device
    parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    skipped = 0
    torch.distributed.barrier()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(trainer.config.train.grad_accumulation):
        batch = batches[cursor % len(batches)]
        cursor += 1
        t0 = time.perf_counter()
        images = normalize(batch["images"].to(device)).to(trainer.dtype)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        image_ids = batch.get("image_ids")
        out = engine(
            images,
            ids,
            mask,
            image_ids=None if image_ids is None else image_ids.to(device),
            step=trainer.step,
        )
        finite = all_finite(out.loss)
        t1 = time.perf_counter()
        parts["forward"] += t1 - t0
        if not finite:
            skipped += 1
            break
        engine.backward(out.loss)
        synchronize(device)
        t2 = time.perf_counter()
        parts["backward"] += t2 - t1
        engine.step()
        _ = [out.loss.item(), *(v.item() for v in out.losses.values())]
        parts["optimizer"] += time.perf_counter() - t2
    t3 = time.perf_counter()
    if not skipped:
        momentum_update(trainer.model, trainer.config.train.zero_stage)
        trainer.step += 1
    synchronize(device)
    end = time.perf_counter()
    parts["optimizer"] += end - t3  # the momentum update is part of the optimizer step
    parts["step"] = end - start
    parts["skipped"] = float(skipped)
    return parts, cursor


def all_finite(loss: torch.Tensor) -> bool:
    """`pretrain.trainer.all_finite` with its flag on the loss's device (NCCL reduces no CPU tensor)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def slowest_rank(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def run_worker(args: argparse.Namespace) -> None:
    from pretrain.flops import flops_per_sample, resolve_peak_flops
    from pretrain.launch import init_distributed, place_from_environment
    from pretrain.models.weights import load_tokenizer
    from pretrain.trainer import RunOptions, Trainer

    place = place_from_environment()
    backend = init_distributed(place)
    tokenizer = load_tokenizer(args.data / "tokenizer")
    stages = args.stages
    trainers = {}
    for stage in stages:
        config = bench_config(args, args.preset, stage, tokenizer)
        options = RunOptions(
            data=str(args.data / "shards"), output=args.data / f"run-{stage}", max_steps=0
        )
        trainers[stage] = Trainer(config, options, place, tokenizer)
    first = trainers[stages[0]]
    batches = prepared_batches(first, args.batches)
    config = first.config
    text_tokens = int(batches[0]["input_ids"].shape[1])
    cursors = dict.fromkeys(stages, 0)
    if place.is_main:
        say(
            f"{args.preset}: {place.world_size} rank(s), ZeRO {stages}, micro-batch "
            f"{config.train.batch_size}, {config.train.precision}, {text_tokens} text tokens"
        )

    for stage in stages:  # warm-up: allocations, first-call paths, alpha > 0 (distillation on)
        for _ in range(args.warmup):
            _, cursors[stage] = timed_step(trainers[stage], batches, cursors[stage])

    parts = ("step", "forward", "backward", "optimizer", "skipped")
    times: dict[int, dict[str, list[float]]] = {s: {p: [] for p in parts} for s in stages}
    for repeat in range(args.repeats):
        shift = repeat % len(stages)  # rotate, so neither stage always runs first
        for stage in stages[shift:] + stages[:shift]:
            for _ in range(args.steps):
                step, cursors[stage] = timed_step(trainers[stage], batches, cursors[stage])
                for p in parts:
                    times[stage][p].append(step[p])
        if place.is_main:
            say(f"{args.preset}: repeat {repeat + 1}/{args.repeats}")

    # The step of a data-parallel job lasts as long as its slowest rank's.
    for stage in stages:
        for p in parts:
            times[stage][p] = slowest_rank(times[stage][p], first.device)

    device = first.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = resolve_peak_flops(device_name, config.train.precision, args.peak_flops)
    flops = flops_per_sample(config, text_tokens=text_tokens)
    parameters = sum(p.numel() for p in first.model.model.parameters() if p.requires_grad)
    if not place.is_main:
        torch.distributed.barrier()
        return
    report = {
        "preset": args.preset,
        "world_size": place.world_size,
        "backend": backend,
        "device": str(device),
        "device_name": device_name,
        "precision": config.train.precision,
        "micro_batch": config.train.batch_size,
        "grad_accumulation": config.train.grad_accumulation,
        "global_batch": config.train.batch_size * config.train.grad_accumulation * place.world_size,
        "text_tokens": text_tokens,
        "image_size": config.model.vision.image_size,
        "vocab_size": config.model.text.vocab_size,
        "grad_checkpointing": config.model.grad_checkpointing,
        "trained_parameters": parameters,
        "model_gflop_per_sample": flops.model_gflop,
        "hardware_gflop_per_sample": flops.hardware_gflop,
        "peak_flops": peak,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "threads_per_rank": torch.get_num_threads(),
        "deepspeed": __import__("deepspeed").__version__,
        "stages": {str(s): {p: times[s][p] for p in parts} for s in stages},
    }
    args.worker_output.write_text(json.dumps(report, indent=2) + "\n")
    torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def write_data(folder: Path, scenes: int, image_size: int) -> None:
    """Synthetic image-text shards with a manifest, and a tokenizer trained on their captions."""
    from data_prep.manifest import ShardInfo, write_manifest
    from data_prep.shard_writer import Sample, ShardWriter, encode_jpeg
    from data_prep.synthetic import make_scenes, vocabulary_texts
    from data_prep.tokenizer import train_wordpiece

    made = make_scenes(scenes, seed=SCENE_SEED, size=image_size)
    with ShardWriter(str(folder / "shards"), shard_size=SHARD_SIZE) as writer:
        for index, scene in enumerate(made):
            writer.write(Sample(f"{index:06d}", encode_jpeg(scene.image), text=scene.caption))
    counts = [min(SHARD_SIZE, scenes - i * SHARD_SIZE) for i in range(len(writer.shards))]
    infos = [ShardInfo(u, c) for u, c in zip(writer.shards, counts, strict=True)]
    write_manifest(str(folder / "shards"), infos)
    texts = vocabulary_texts() + [s.caption for s in made]
    train_wordpiece(texts, folder / "tokenizer", vocab_size=TOKENIZER_VOCAB)


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU run stays on the CPU on a GPU machine too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def launch(args: argparse.Namespace, preset: str, ranks: int, stages: list[int], data: Path) -> dict:
    """Run `ranks` workers under torchrun; returns rank 0's report."""
    from pretrain.launch import DEFAULT_MASTER_ADDR, free_port

    output = data / f"worker-{preset}-{ranks}-{'-'.join(map(str, stages))}.json"
    log_path = output.with_suffix(".log")
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
        f"--master-addr={DEFAULT_MASTER_ADDR}", f"--master-port={free_port()}",
        str(Path(__file__).resolve()), "--worker", "--preset", preset,
        "--stages", *map(str, stages), "--data", str(data), "--worker-output", str(output),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--steps", str(args.steps),
        "--batches", str(args.batches), "--device", args.device,
    ]  # fmt: skip
    for flag, value in (("--batch", args.batch), ("--dtype", args.dtype),
                        ("--peak-flops", args.peak_flops)):  # fmt: skip
        if value is not None:
            command += [flag, str(value)]
    for override in args.overrides:
        command += ["--set", override]
    print(f"{preset}: {ranks} rank(s), ZeRO stage(s) {stages} ...", flush=True)
    with open(log_path, "w") as log, subprocess.Popen(
        command, env=worker_env(args), cwd=REPO_ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as process:  # fmt: skip
        for line in process.stdout:
            log.write(line)
            if line.startswith(MARKER):
                print("  " + line[len(MARKER):].strip(), flush=True)
    if process.returncode != 0 or not output.exists():
        tail = log_path.read_text()[-LOG_TAIL_CHARS:]
        raise SystemExit(f"worker run failed (exit {process.returncode}):\n{tail}")
    return json.loads(output.read_text())


def summarise(report: dict, stage: int) -> dict:
    """Medians of one stage's timed steps: step time, parts, samples/s, MFU and HFU per rank."""
    times = report["stages"][str(stage)]
    step_s = statistics.median(times["step"])
    samples_per_s = report["global_batch"] / step_s
    per_rank = samples_per_s / report["world_size"]
    peak = report["peak_flops"]
    row = {
        "preset": report["preset"],
        "ranks": report["world_size"],
        "zero_stage": stage,
        "device": report["device_name"] or report["device"],
        "precision": report["precision"],
        "global_batch": report["global_batch"],
        "median_step_ms": step_s * MS,
        "min_step_ms": min(times["step"]) * MS,  # other jobs only ever add time
        "median_part_ms": {p: statistics.median(times[p]) * MS
                           for p in ("forward", "backward", "optimizer")},  # fmt: skip
        "samples_per_s": samples_per_s,
        "samples_per_s_per_rank": per_rank,
        "model_gflop_per_sample": report["model_gflop_per_sample"],
        "achieved_gflops_per_rank": report["model_gflop_per_sample"] * per_rank,
        "peak_flops_per_rank": peak,
        "mfu": None if peak is None else report["model_gflop_per_sample"] * 1e9 * per_rank / peak,
        "hfu": None if peak is None else report["hardware_gflop_per_sample"] * 1e9 * per_rank / peak,
        "skipped_steps": int(sum(times["skipped"])),
        "step_ms": [t * MS for t in times["step"]],
    }
    return row


def zero_ratio(report: dict) -> dict:
    """ZeRO-2 over ZeRO-0 step time: the median over repeats of the per-repeat median ratio."""
    steps = report["steps_per_repeat"]

    def per_repeat(stage: int) -> list[float]:
        times = report["stages"][str(stage)]["step"]
        return [statistics.median(times[i : i + steps]) for i in range(0, len(times), steps)]

    zero, plain = per_repeat(ZERO_STAGE), per_repeat(BASELINE_STAGE)
    ratios = [z / p for z, p in zip(zero, plain, strict=True)]
    return {
        "preset": report["preset"],
        "ranks": report["world_size"],
        "global_batch": report["global_batch"],
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "ratio_of_medians": statistics.median(report["stages"][str(ZERO_STAGE)]["step"])
        / statistics.median(report["stages"][str(BASELINE_STAGE)]["step"]),
    }


def machine(device: str) -> dict:
    info = {"device": device, "platform": platform.platform(), "cpu_count": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        info["cpu"] = names[0] if names else platform.processor()
    return info


def run(args: argparse.Namespace) -> dict:
    from pretrain.config import load_config

    configs = {p: load_config(p, args.overrides) for p in args.presets}
    biggest_batch = max(args.batch or c.train.batch_size for c in configs.values())
    scenes = max(MIN_SCENES, biggest_batch * max(args.compare_ranks, 1) * args.batches)
    image_size = max(c.model.vision.image_size for c in configs.values())
    single, compare, reports = [], [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        data = Path(tmp)
        print(f"writing {scenes} synthetic pairs at {image_size} px and a tokenizer ...", flush=True)
        write_data(data, scenes, image_size)
        for preset in args.presets:
            own_stage = configs[preset].train.zero_stage
            report = launch(args, preset, 1, [own_stage], data)
            reports.append(report)
            single.append(summarise(report, own_stage))
            if args.compare_ranks > 1:
                stages = [BASELINE_STAGE, ZERO_STAGE]
                report = launch(args, preset, args.compare_ranks, stages, data)
                reports.append(report)
                compare.extend(summarise(report, s) for s in stages)
                compare[-1]["zero2_over_zero0"] = zero_ratio(report)
    info = machine(args.device)
    if args.device == "cuda":  # from the workers: this process opens no CUDA context of its own
        info["gpu"] = reports[0]["device_name"]
    return {
        "benchmark": "training step (DeepSpeed engine, MPLUGPretraining)",
        "machine": info,
        "torch": torch.__version__,
        "deepspeed": reports[0]["deepspeed"],
        "batches": "prepared before timing by ShardLoader from synthetic shards, on the device",
        "threads_per_rank": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "overrides": args.overrides,
        "single_rank": single,
        "zero_comparison": compare,
        "workers": [{k: v for k, v in r.items() if k != "stages"} for r in reports],
        "wall_s": time.perf_counter() - started,
    }


def fmt_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def print_table(report: dict) -> None:
    print(
        f"\nTraining step (fwd + bwd + optimizer + momentum update), batches prepared beforehand, "
        f"{report['threads_per_rank']} CPU thread(s) per rank, "
        f"median of {report['repeats']} x {report['steps_per_repeat']} steps:"
    )
    print(
        "| preset | ranks | ZeRO | precision | global batch | median step ms | fwd / bwd / opt ms "
        "| samples/s | GFLOP/sample | MFU | HFU |"
    )
    print("|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|")
    for r in report["single_rank"] + report["zero_comparison"]:
        parts = " / ".join(f"{r['median_part_ms'][p]:.0f}" for p in ("forward", "backward", "optimizer"))
        print(
            f"| {r['preset']} | {r['ranks']} | {r['zero_stage']} | {r['precision']} "
            f"| {r['global_batch']} | {r['median_step_ms']:.1f} | {parts} "
            f"| {r['samples_per_s']:.1f} | {r['model_gflop_per_sample']:.3f} "
            f"| {fmt_mfu(r['mfu'])} | {fmt_mfu(r['hfu'])} |"
        )
    for r in report["zero_comparison"]:
        if "zero2_over_zero0" in r:
            z = r["zero2_over_zero0"]
            spread = ", ".join(f"{x:.2f}" for x in z["ratios"])
            print(
                f"\n{z['preset']}, {z['ranks']} ranks, global batch {z['global_batch']}: ZeRO-2 / "
                f"ZeRO-0 step time = {z['ratio']:.2f} (median of per-repeat ratios: {spread})"
            )
    skipped = sum(r["skipped_steps"] for r in report["single_rank"] + report["zero_comparison"])
    if skipped:
        print(f"warning: {skipped} timed step(s) had a non-finite loss and skipped the update")
    print("MFU and samples/s per rank against one rank's peak; n/a: no peak known (give --peak-flops)")


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # write then rename: no half-written results
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="model presets to time")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="train.precision (default: the preset's)")
    parser.add_argument("--batch", type=int, help="micro-batch per rank (default: the preset's)")
    parser.add_argument("--peak-flops", type=float,
                        help="peak FLOP/s of one rank's device for MFU (default: the GPU table; "
                             "none on a CPU)")  # fmt: skip
    parser.add_argument("--compare-ranks", type=int,
                        help="ranks for ZeRO-2 vs ZeRO-0 (default 2 on the CPU, 0 = skip on cuda)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per engine first")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per engine per repeat")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled per rank")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for every run (repeatable)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    worker = parser.add_argument_group("worker mode (what each torchrun rank runs)")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--preset", help=argparse.SUPPRESS)
    worker.add_argument("--stages", type=int, nargs="+", help=argparse.SUPPRESS)
    worker.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    worker.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compare_ranks is None:
        args.compare_ranks = 2 if args.device == "cpu" else 0
    if args.repeats < 1 or args.steps < 1 or args.warmup < 1 or args.batches < 1:
        parser.error("need --repeats, --steps, --batches >= 1 and --warmup >= 1 (distillation "
                     "turns on after the first step)")  # fmt: skip
    if args.compare_ranks == 1 or args.compare_ranks < 0:
        parser.error(f"--compare-ranks must be 0 (skip) or >= 2, got {args.compare_ranks}")
    if args.device == "cuda" and not args.worker:
        if not torch.cuda.is_available():
            parser.error("--device cuda given, but torch sees no CUDA device")
        if args.compare_ranks > torch.cuda.device_count():
            parser.error(f"--compare-ranks {args.compare_ranks} needs as many GPUs; "
                         f"{torch.cuda.device_count()} visible")  # fmt: skip
    if args.worker and not (args.preset and args.stages and args.data and args.worker_output):
        parser.error("--worker needs --preset, --stages, --data and --worker-output")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    report = run(args)
    print_table(report)
    write_json(report, args.output)


if __name__ == "__main__":
    main()
