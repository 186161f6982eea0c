"""The pretraining loop: DeepSpeed engine, shard loader, checkpoints, model packages, MLflow.

One process per rank runs `Trainer(...).run()`. A step is `grad_accumulation` micro-batches and
one optimizer step, then the EMA update. With `video_data` (mPLUG-2), every micro-batch is one
image batch and one video batch, each from its own resumable loader. Around it:
- a non-finite loss on any rank skips that micro-batch on every rank and is counted; after
  `max_nonfinite` in a row the run checkpoints and stops, saying so;
- SIGTERM or SIGUSR1 (preemption) sets a flag the ranks agree on after the step: they
  checkpoint and exit cleanly, and `--resume auto` continues;
- every `checkpoint_every` steps a resumable checkpoint, every `package_every` steps and at the
  end a model package (consolidated weights, config, tokenizer), logged to MLflow as `model/`;
- rank 0 logs losses, learning rates, gradient norm, samples/s, tokens/s, MFU and peak memory.
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_prep.batch import normalize
from data_prep.loader import LoaderConfig, ShardLoader
from pretrain.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from pretrain.config import to_dict
from pretrain.config.schema import Config
from pretrain.engine import build_engine, input_dtype, momentum_update
from pretrain.flops import flops_per_sample, resolve_peak_flops
from pretrain.launch import ProcessPlace
from pretrain.objectives.pretraining import MPLUGPretraining
from pretrain.package import export_state_dict
from pretrain.tracking import Tracker

log = logging.getLogger("mplug.pretrain")
PACKAGE = "package"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class RunOptions:
    data: str | list[str]
    output: Path
    max_steps: int
    resume: str | None = None  # "auto", a checkpoint folder, or None for a fresh run
    config_name: str = ""
    peak_flops: float | None = None  # for MFU where the device is not in pretrain.flops' table
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags, e.g. the --init package
    video_data: str | list[str] | None = None  # video shards: every step also draws a batch of clips


class StopRequest:
    """Remembers a preemption signal until the ranks agree to act on it after the current step."""

    def __init__(self):
        self.signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (the flag lives on the loss's device: NCCL needs CUDA tensors)."""
    flag = torch.isfinite(loss.detach()).all().float().reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    tensor /= torch.distributed.get_world_size()
    return dict(zip(names, tensor.tolist(), strict=True))


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Trainer:
    """The pretraining run; fine-tuning subclasses it and replaces `loader`, `forward`, `tags` and `finish`."""

    stage = "pretrain"  # the MLflow stage tag

    def __init__(self, config: Config, options: RunOptions, place: ProcessPlace, tokenizer,
                 model: MPLUGPretraining | None = None):
        self.config, self.options, self.place, self.tokenizer = config, options, place, tokenizer
        torch.manual_seed(config.train.seed + place.rank)
        self.model = model if model is not None else MPLUGPretraining(config)
        self.engine, self.optimizer, self.scheduler = build_engine(self.model, config, place.world_size)
        self.device = self.engine.device
        self.dtype = input_dtype(config)
        self.step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        peak = resolve_peak_flops(torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                  config.train.precision, options.peak_flops)
        self.peak_flops = peak
        self.run_id: str | None = None  # the MLflow run, once tracking started (rank 0)
        self.loss_names: list[str] = []
        self.videos: ShardLoader | None = None  # the video loader of an image + video run

    # -- state ---------------------------------------------------------------------------------

    def resume(self) -> dict[str, Any]:
        path = resolve_resume(self.options.output, self.options.resume)
        if path is None:
            return {}
        self.step, rank_state = load_checkpoint(self.engine, path, self.place.rank, self.place.world_size)
        self.nonfinite_total = int(rank_state.get("nonfinite_total", 0))
        log.info("resumed from %s at step %d", path, self.step)
        return rank_state

    def checkpoint(self, loader: ShardLoader) -> Path:
        state = {"loader": loader.state_dict(), "nonfinite_total": self.nonfinite_total}
        if self.videos is not None:
            state["video_loader"] = self.videos.state_dict()
        path = save_checkpoint(self.engine, self.options.output, self.step, self.place.rank, self.place.world_size,
                               state, self.config.train.keep_checkpoints)
        if self.place.is_main:
            log.info("checkpoint at step %d: %s", self.step, path)
        return path

    def export_package(self) -> Path | None:
        """Consolidated weights on rank 0 (gathered from the ZeRO-3 partitions when needed)."""
        if self.config.train.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if self.place.is_main else None
        torch.distributed.barrier()
        if not self.place.is_main:
            return None
        model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        folder = self.options.output / PACKAGE
        export_state_dict(folder, model_state, self.config, self.tokenizer, step=self.step, run_id=self.run_id,
                          extra=self.package_extra(), files=self.package_files(state))
        return folder

    def package_extra(self) -> dict[str, Any]:
        """What the package's package.json records beside the weights (fine-tuning adds its task)."""
        return {}

    def package_files(self, state: dict[str, torch.Tensor]) -> dict[str, bytes]:
        """Files written beside the weights, by name, from the whole module's state (a task's head)."""
        return {}

    # -- the loop ------------------------------------------------------------------------------

    def loader(self, state: dict[str, Any] | None) -> ShardLoader:
        data, train = self.config.data, self.config.train
        loader_config = LoaderConfig(
            batch_size=train.batch_size, image_size=self.config.model.vision.image_size, mode="resampled",
            augment="pretrain", randaugment=data.randaugment, workers=data.workers,
            shuffle_buffer=data.shuffle_buffer, seed=train.seed, max_text_length=data.max_text_length,
            pad_to_max=True,  # ITC/ITM gather text across ranks: same shapes everywhere
        )
        return ShardLoader(self.options.data, loader_config, tokenizer=self.tokenizer, rank=self.place.rank,
                           world_size=self.place.world_size, state=state)

    def video_loader(self, state: dict[str, Any] | None) -> ShardLoader | None:
        """The clips of an image + video run (None without `video_data`): `data.frames` frames per clip."""
        if self.options.video_data is None:
            return None
        data, train = self.config.data, self.config.train
        loader_config = LoaderConfig(
            batch_size=data.video_batch_size or train.batch_size, image_size=self.config.model.vision.image_size,
            mode="resampled", augment="pretrain", randaugment=data.randaugment, workers=data.workers,
            shuffle_buffer=data.shuffle_buffer, seed=train.seed, max_text_length=data.max_text_length,
            pad_to_max=True, frames=data.frames,
        )
        return ShardLoader(self.options.video_data, loader_config, tokenizer=self.tokenizer, rank=self.place.rank,
                           world_size=self.place.world_size, state=state)

    def pairs_on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A loader batch's pixels (normalised, compute dtype), token ids, mask and image ids on the device."""
        out = {"images": normalize(batch["images"].to(self.device)).to(self.dtype),
               "input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}
        if batch.get("image_ids") is not None:
            out["image_ids"] = batch["image_ids"].to(self.device)
        return out

    def forward(self, batch: dict[str, Any], micro: int):
        """One micro-batch through the engine; the result has `loss` and the named `losses`."""
        pairs = self.pairs_on_device(batch)
        video = self.pairs_on_device(batch["video"]) if "video" in batch else None
        return self.engine(pairs["images"], pairs["input_ids"], pairs["attention_mask"],
                           image_ids=pairs.get("image_ids"), step=self.step, micro=micro, video=video)

    def samples_per_step(self) -> int:
        """Pairs of one optimizer step over all ranks: images, plus clips in an image + video run."""
        config = self.config
        per_micro = config.train.batch_size
        if self.videos is not None:
            per_micro += config.data.video_batch_size or config.train.batch_size
        return per_micro * config.train.grad_accumulation * self.place.world_size

    def tags(self) -> dict[str, str]:
        """Extra MLflow tags of the run."""
        return dict(self.options.tags)

    def finish(self, tracker, package: Path | None) -> None:
        """After the last step and the final package (on every rank; `package` is None off rank 0)."""
        if package is not None:
            tracker.log_model_package(package)

    def micro_step(self, batch: dict[str, Any], micro: int = 0) -> tuple[dict[str, float], bool]:
        out = self.forward(batch, micro)
        self.loss_names = list(out.losses)
        if not all_finite(out.loss):
            return {}, False
        self.engine.backward(out.loss)
        self.engine.step()
        values = {name: value.item() for name, value in out.losses.items()}
        if hasattr(out, "alpha"):
            values["alpha"] = out.alpha
        return {"loss": out.loss.item(), **values}, True

    def run(self) -> int:
        """Train to `max_steps`; returns the process exit code (0 also when stopped by a signal)."""
        config, options, place = self.config, self.options, self.place
        options.output.mkdir(parents=True, exist_ok=True)
        rank_state = self.resume()
        loader = self.loader(rank_state.get("loader"))
        self.videos = self.video_loader(rank_state.get("video_loader"))
        clips = iter(self.videos) if self.videos is not None else None
        stop = StopRequest()
        tracker = Tracker.start(options.output, to_dict(config), config_name=options.config_name or config.name,
                                stage=self.stage, tags=self.tags(), rank=place.rank)
        self.run_id = getattr(tracker, "run_id", None)
        batches = iter(loader)
        status, code = "FINISHED", 0
        started, window_start, window_samples, window_tokens = time.perf_counter(), time.perf_counter(), 0, 0
        try:
            while self.step < options.max_steps:
                values, tokens, skipped = {}, 0, False
                for index in range(config.train.grad_accumulation):
                    batch = next(batches)
                    if clips is not None:
                        batch["video"] = next(clips)
                    micro, finite = self.micro_step(batch, index)
                    if not finite:
                        skipped = True
                        break
                    tokens += int(batch["attention_mask"].sum())
                    if clips is not None:
                        tokens += int(batch["video"]["attention_mask"].sum())
                    for name, value in micro.items():
                        values[name] = values.get(name, 0.0) + value / config.train.grad_accumulation
                if skipped:
                    self.nonfinite_in_row += 1
                    self.nonfinite_total += 1
                    log.warning("non-finite loss at step %d: skipped (%d in a row, %d in all)", self.step,
                                self.nonfinite_in_row, self.nonfinite_total)
                    if self.nonfinite_in_row >= config.train.max_nonfinite:
                        self.checkpoint(loader)
                        log.error("stopping: %d non-finite losses in a row at step %d; checkpoint saved, lower "
                                  "train.lr or check the data, then --resume auto", self.nonfinite_in_row, self.step)
                        status, code = "FAILED", 3
                        break
                    continue
                self.nonfinite_in_row = 0
                momentum_update(self.model, config.train.zero_stage)
                self.step += 1
                window_samples += self.samples_per_step()
                window_tokens += tokens
                if self.step % config.train.log_every == 0 or self.step == options.max_steps:
                    self.report(tracker, values, window_samples, window_tokens, time.perf_counter() - window_start,
                                started)
                    window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
                if stop.agreed(self.device):
                    path = self.checkpoint(loader)
                    tracker.set_checkpoint_location(str(path))
                    log.warning("stopped by signal %s at step %d after saving %s; continue with --resume auto",
                                stop.signal, self.step, path)
                    status = "KILLED"
                    return code
                if self.step % config.train.checkpoint_every == 0:
                    tracker.set_checkpoint_location(str(self.checkpoint(loader)))
                if self.step % config.train.package_every == 0 and self.step < options.max_steps:
                    self.export_package()
            else:
                if self.step % config.train.checkpoint_every:  # the last periodic one is older
                    tracker.set_checkpoint_location(str(self.checkpoint(loader)))
                self.finish(tracker, self.export_package())
            return code
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if place.is_main:
                print(file=sys.stderr)
            tracker.close(status)

    def report(self, tracker, values: dict[str, float], samples: int, tokens: int, seconds: float,
               started: float) -> None:
        metrics = mean_over_ranks(values, self.device)
        tokens_total = torch.tensor([float(tokens)], device=self.device)
        torch.distributed.all_reduce(tokens_total)
        samples_per_s = samples / max(seconds, 1e-9)
        metrics.update({
            "samples_per_s": samples_per_s,
            "tokens_per_s": tokens_total.item() / max(seconds, 1e-9),
            "peak_memory_bytes": float(peak_memory_bytes()),
            "nonfinite_skipped": float(self.nonfinite_total),
        })
        for index, group in enumerate(self.optimizer.param_groups):
            metrics[f"lr/{group.get('name', index)}"] = group["lr"]
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.peak_flops and self.videos is None:  # the FLOP count is of image-text pairs only
            text_tokens = self.config.data.max_text_length
            per_rank = samples_per_s / self.place.world_size
            metrics["mfu"] = flops_per_sample(self.config, text_tokens=text_tokens).mfu(per_rank, self.peak_flops)
        tracker.log_metrics(self.step, metrics)
        if self.place.is_main:
            self.print_progress(metrics, started)

    def print_progress(self, metrics: dict[str, float], started: float) -> None:
        elapsed = time.perf_counter() - started
        remaining = (self.options.max_steps - self.step) * elapsed / max(self.step, 1)
        losses = "  ".join(f"{k} {metrics[k]:.3f}" for k in ("loss", *self.loss_names) if k in metrics)
        mfu = f"  mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
        line = (f"step {self.step}/{self.options.max_steps}  {losses}  {metrics['samples_per_s']:.1f} samples/s"
                f"{mfu}  eta {remaining / 60:.1f} min")
        end = "\r" if sys.stderr.isatty() else "\n"
        print(line, end=end, file=sys.stderr, flush=True)
