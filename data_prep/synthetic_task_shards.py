"""The synthetic dataset converted into fine-tuning shards: captions (also retrieval), VQA, grounding.

What the task tests, the fine-tuning benchmark and the demo train on: `write_synthetic` writes
the official annotation formats, and the converters turn them into task shards exactly as they
would the real files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_prep.convert import convert_coco_karpathy, convert_refcoco, convert_vqa_v2
from data_prep.synthetic_export import SyntheticDataset, write_synthetic

TASK_DATA = {"vqa": "vqa", "caption": "caption", "retrieval": "caption", "grounding": "grounding"}  # task -> field
SHARD_SIZE = 64  # samples per task shard: a few shards even for small sets, so ranks share them


@dataclass
class TaskShards:
    root: Path
    caption: Path  # coco_karpathy output: train/ val/ test/ (also the retrieval data)
    vqa: Path  # vqa_v2 output: train/ val/
    grounding: Path  # refcoco output: train/ val/ testA/ testB/ ...
    answer_list: Path

    def for_task(self, task: str) -> Path:
        """The shards a fine-tuning task reads (retrieval reads the caption data)."""
        if task not in TASK_DATA:
            raise ValueError(f"no synthetic shards for task {task!r}; known tasks: {', '.join(TASK_DATA)}")
        return getattr(self, TASK_DATA[task])


def write_task_shards(root: Path, scenes: int = 60, seed: int = 0, image_size: int = 64) -> TaskShards:
    return convert_task_shards(write_synthetic(root / "synthetic", scenes, seed=seed, image_size=image_size), root)


def convert_task_shards(synthetic: SyntheticDataset, root: Path) -> TaskShards:
    """Convert the annotation files of a written synthetic dataset into task shards under `root`."""
    images = synthetic.images_dir
    convert_coco_karpathy(synthetic.karpathy_coco, root / "caption", images, shard_size=SHARD_SIZE)
    convert_vqa_v2([synthetic.vqa_questions("train2014"), synthetic.vqa_questions("val2014")], root / "vqa", images,
                   annotations=[synthetic.vqa_annotations("train2014"), synthetic.vqa_annotations("val2014")],
                   shard_size=SHARD_SIZE)
    convert_refcoco(synthetic.refcoco_refs, synthetic.refcoco_instances, root / "grounding", images,
                    shard_size=SHARD_SIZE)
    return TaskShards(root, root / "caption", root / "vqa", root / "grounding", synthetic.answer_list)
