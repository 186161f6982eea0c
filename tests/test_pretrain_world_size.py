"""Data parallelism does not change the mathematics: one global batch, one or two ranks, one loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.shard_writer import Sample, ShardWriter, encode_jpeg
from data_prep.synthetic import make_scenes, vocabulary_texts
from data_prep.tokenizer import train_wordpiece

STEPS = 20
GLOBAL_BATCH = 8

# Every rank reads the same global batches in one fixed order (one reader, no shuffle, no
# augmentation) and keeps its own rows: the two runs see identical data, so any difference in
# their losses comes from the engine or the objectives.
SAME_GLOBAL_BATCHES = """
import sys
from pathlib import Path
from pretrain.launch import init_distributed, place_from_environment, use_cpu_accelerator_without_gpu
use_cpu_accelerator_without_gpu()
from data_prep.loader import LoaderConfig, ShardLoader
from pretrain.config import load_config
from pretrain.config.tokens import with_tokenizer
from pretrain.models.weights import load_tokenizer
from pretrain.trainer import RunOptions, Trainer

data, output, steps, global_batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

class RowsOfOneGlobalBatch:
    def __init__(self, loader, rank, rows):
        self.loader, self.rank, self.rows = loader, rank, rows

    def __iter__(self):
        start, stop = self.rank * self.rows, (self.rank + 1) * self.rows
        for batch in self.loader:
            yield {key: value[start:stop] for key, value in batch.items()}

    def state_dict(self):
        return {}

class SameGlobalBatches(Trainer):
    def loader(self, state):
        config = LoaderConfig(batch_size=global_batch, image_size=self.config.model.vision.image_size,
                              augment="eval", workers=0, shuffle_buffer=0, seed=0, pad_to_max=True,
                              max_text_length=self.config.data.max_text_length)
        shared = ShardLoader(str(data / "shards"), config, tokenizer=self.tokenizer, rank=0, world_size=1)
        return RowsOfOneGlobalBatch(shared, self.place.rank, global_batch // self.place.world_size)

place = place_from_environment()
init_distributed(place)
tokenizer = load_tokenizer(data / "tokenizer")
overrides = ["objectives.itc=false", "objectives.itm=false", "objectives.distill=false", "train.zero_stage=2",
             "train.precision=fp32", f"train.batch_size={global_batch // place.world_size}", "train.log_every=1",
             "train.checkpoint_every=1000", "train.package_every=1000"]
config = with_tokenizer(load_config("tiny", overrides), tokenizer)
options = RunOptions(data=str(data / "shards"), output=output, max_steps=steps)
sys.exit(SameGlobalBatches(config, options, place, tokenizer).run())
"""


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("world-size-data")
    scenes = make_scenes(48, seed=5, size=64)
    with ShardWriter(str(root / "shards"), shard_size=16) as writer:
        for index, scene in enumerate(scenes):
            writer.write(Sample(f"{index:06d}", encode_jpeg(scene.image), text=scene.caption))
    train_wordpiece(vocabulary_texts() + [s.caption for s in scenes], root / "tokenizer", vocab_size=200)
    return root


def losses_of_run(data: Path, output: Path, ranks: int) -> dict[str, list[float]]:
    script = output.parent / "same_global_batches.py"
    script.write_text(SAME_GLOBAL_BATCHES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{output}/mlflow.db"}
    env.pop("RANK", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(29600 + ranks), str(script), str(data), str(output), str(STEPS), str(GLOBAL_BATCH)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    losses: dict[str, list[float]] = {"loss": [], "mlm": [], "prefix_lm": []}
    with open(output / "metrics.jsonl") as journal:
        for line in journal:
            record = json.loads(line)
            for name in losses:
                if name in record["metrics"]:
                    losses[name].append(record["metrics"][name])
    return losses


@pytest.mark.slow
def test_two_rank_zero2_and_one_rank_with_the_same_global_batch_have_the_same_loss_at_every_step(pairs, tmp_path):
    one = losses_of_run(pairs, tmp_path / "one-rank", ranks=1)
    two = losses_of_run(pairs, tmp_path / "two-ranks", ranks=2)
    assert len(one["loss"]) == len(two["loss"]) == STEPS
    for name in ("loss", "mlm", "prefix_lm"):
        for step, (a, b) in enumerate(zip(one[name], two[name], strict=True), start=1):
            assert abs(a - b) <= 1e-4, f"{name} at step {step}: one rank {a}, two ranks {b}"
    assert one["loss"][-1] < one["loss"][0]  # and the runs did learn
