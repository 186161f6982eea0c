"""Video captioning (MSRVTT, MSVD): the caption task on clips, with mPLUG-2's prompt "a video of".

    clip (B, T, 3, S, S) --video encoder + universal layers--> v (B, 1 + T*N, D) --decoder--> caption

mPLUG-2 composes video captioning as video encoder -> universal layers -> decoder, which is the
image caption path with clips in (`MPLUG.encode_image` takes them). Everything else is
CaptionTask's: cross-entropy then optional SCST, beam search, the COCO scores (BLEU, METEOR,
ROUGE-L, CIDEr, SPICE with `spice_jars`), and the constant-caption CIDEr baseline. Evaluation
reads one sample per video with all its reference captions (meta["captions"]); a video is named
by its `image_id`, or by its `video_id` where the converter gives none (MSRVTT, MSVD captions).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from finetune.tasks.base import EvalContext
from finetune.tasks.caption import CaptionSettings, CaptionTask

VIDEO_PROMPT = "a video of "  # mPLUG-2's caption prompt for clips


@dataclass
class VideoCaptionSettings(CaptionSettings):
    prompt: str = VIDEO_PROMPT


class VideoCaptionTask(CaptionTask):
    name: ClassVar[str] = "video_caption"
    Settings: ClassVar[type] = VideoCaptionSettings
    video: ClassVar[bool] = True

    def evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        return super().evaluate((with_image_ids(batch) for batch in batches), context)


def with_image_ids(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with each sample's `video_id` as its `image_id` where it has none."""
    meta = [m if "image_id" in m or "video_id" not in m else {**m, "image_id": m["video_id"]} for m in batch["meta"]]
    return {**batch, "meta": meta}
