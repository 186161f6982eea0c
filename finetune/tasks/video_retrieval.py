"""Text-video retrieval (MSRVTT, MSVD, DiDeMo): the retrieval task on clips.

    clip --video encoder + universal layers--> v --vision_proj(v[:, 0])--> video ITC feature
    caption --text_encoder--> l --text_proj(l[:, 0])--> text ITC feature;  ITM: itm_head(fuse(l, v))

The video's ITC feature is its mean frame [CLS] after the universal layers (`MPLUG.encode_image`
on a clip), so training (ITC with video-id-aware positives + ITM with hard negatives) and the
evaluation (ITC over all pairs, then the top `k_test` re-scored by ITM) are RetrievalTask's.

The keys are named for the video direction besides retrieval's image ones: `t2v_r{k}` is
text-to-video recall (retrieval's `img_r{k}`: a caption is a hit when its video is in the top k)
and `v2t_r{k}` video-to-text (`txt_r{k}`). The headline is `t2v_r1`, the number MSRVTT, MSVD and
DiDeMo results report (mPLUG-2: MSRVTT text-to-video R@1 53.1), rather than retrieval's
`r1_mean`, the mean of both directions that image retrieval papers tabulate side by side. The
`baseline` is retrieval's: the R@1 of a random ranking, 100 / number of videos, which is the
random text-to-video R@1 exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, ClassVar

from finetune.metrics.retrieval_recall import DEFAULT_KS
from finetune.tasks.base import EvalContext
from finetune.tasks.retrieval import RESULTS_FILE, RetrievalTask

# video key prefix -> retrieval's key prefix for the same direction
DIRECTIONS = {"t2v": "img", "v2t": "txt"}


def video_keys(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """The t2v_/v2t_ recall keys (R@k and the mean over k) read from retrieval's img_/txt_ keys."""
    names = [f"r{k}" for k in DEFAULT_KS] + ["r_mean"]
    return {f"{prefix}{video}_{name}": metrics[f"{prefix}{image}_{name}"]
            for video, image in DIRECTIONS.items() for name in names if f"{prefix}{image}_{name}" in metrics}


class VideoRetrievalTask(RetrievalTask):
    name: ClassVar[str] = "video_retrieval"
    metric: ClassVar[str] = "t2v_r1"
    video: ClassVar[bool] = True

    def evaluate(self, batches: Iterable[dict[str, Any]], context: EvalContext) -> dict[str, float]:
        metrics = super().evaluate(batches, context)
        metrics = {**metrics, **video_keys(metrics), **video_keys(metrics, prefix="itc_")}
        if context.is_main:  # the results file holds the same keys as the run's metrics
            path = context.output / RESULTS_FILE
            results = json.loads(path.read_text())
            path.write_text(json.dumps({**results, "metrics": metrics}, indent=2))
        return metrics
