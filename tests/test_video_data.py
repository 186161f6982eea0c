"""Video data: segment sampling, decoding, the shard loader's clips, synthetic moving-shape videos."""

from __future__ import annotations

import csv
import io
import json
import random

import av
import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep.batch import normalize
from data_prep.frame_sampling import segment_bounds, segment_indices
from data_prep.loader import LoaderConfig, ShardLoader
from data_prep.manifest import ShardInfo, write_manifest
from data_prep.shard_source import read_shard, resolve_shards
from data_prep.shard_writer import Sample, ShardWriter, encode_jpeg
from data_prep.synthetic import BACKGROUND
from data_prep.synthetic_video import (
    DIRECTIONS,
    MOTION,
    TRAVEL,
    answer_vocabulary,
    clip_captions,
    clip_questions,
    encode_mp4,
    make_clip,
    vocabulary_texts,
    write_video_url_list,
)
from data_prep.video_decode import VideoDecodeError, decode_video

SIZE = 32


def grey_frames(count: int, size: int = SIZE) -> list[np.ndarray]:
    """Frame i is a flat grey of level 12 * i: which frame came back is readable from its mean."""
    return [np.full((size, size, 3), 12 * index, dtype=np.uint8) for index in range(count)]


def frame_numbers(clip: torch.Tensor) -> list[int]:
    return [round(frame.float().mean().item() / 12) for frame in clip]


def encode_matroska(frames: list[np.ndarray]) -> bytes:
    """An mkv file: Matroska records no frame count in its header."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 44100
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_raw_shard(folder, records: list[dict]) -> str:
    """One shard of raw records ({"__key__", field: bytes}) with a manifest; for layouts ShardWriter refuses."""
    folder.mkdir(parents=True, exist_ok=True)
    url = str(folder / "00000.tar")
    with wds.TarWriter(url, encoder=False) as tar:
        for record in records:
            tar.write(record)
    write_manifest(str(folder), [ShardInfo(url, len(records))])
    return str(folder)


def epoch(data: str, tokenizer=None, **changes) -> tuple[list[dict], ShardLoader]:
    config = LoaderConfig(**{"batch_size": 4, "image_size": SIZE, "mode": "epoch", "augment": "eval", "workers": 0,
                             "shuffle_buffer": 0, "frames": 4, **changes})
    loader = ShardLoader(data, config, tokenizer=tokenizer, rank=0, world_size=1)
    return list(loader), loader


def centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) of the pixels that differ from the background."""
    ys, xs = np.nonzero(np.abs(frame.astype(int) - np.array(BACKGROUND)).sum(-1) > 60)
    return np.array([xs.mean(), ys.mean()])


# ---- sampling ------------------------------------------------------------------------------------


def test_train_sampling_takes_one_frame_in_each_segment_and_varies_with_the_rng():
    bounds = segment_bounds(100, 8)
    draws = [segment_indices(100, 8, train=True, rng=random.Random(seed)) for seed in range(5)]
    for indices in draws:
        assert all(start <= index < end for index, (start, end) in zip(indices, bounds, strict=True))
    assert len({tuple(indices) for indices in draws}) == 5
    assert draws[0] == segment_indices(100, 8, train=True, rng=random.Random(0))


def test_eval_sampling_takes_the_middle_frame_of_each_segment():
    assert segment_indices(10, 4, train=False) == [0, 3, 5, 8]  # segments [0,2) [2,5) [5,7) [7,10)
    assert segment_indices(16, 4, train=False) == [1, 5, 9, 13]


def test_a_video_shorter_than_the_clip_repeats_its_last_frame():
    assert segment_indices(3, 5, train=False) == [0, 1, 2, 2, 2]
    assert segment_indices(3, 5, train=True, rng=random.Random(0)) == [0, 1, 2, 2, 2]


def test_sampling_refuses_a_video_without_frames_and_a_clip_without_frames():
    with pytest.raises(ValueError, match="total=0"):
        segment_indices(0, 4, train=False)
    with pytest.raises(ValueError, match="count=0"):
        segment_indices(10, 0, train=False)


# ---- decoding ------------------------------------------------------------------------------------


def test_decode_returns_the_sampled_frames_in_order():
    data = encode_mp4(grey_frames(20))
    clip = decode_video(data, 4, train=False)
    assert clip.shape == (4, 3, SIZE, SIZE) and clip.dtype == torch.uint8
    assert frame_numbers(clip) == [2, 7, 12, 17]
    drawn = decode_video(data, 4, train=True, rng=random.Random(3))
    assert frame_numbers(drawn) == segment_indices(20, 4, train=True, rng=random.Random(3))


def test_decode_counts_the_frames_of_a_container_that_does_not_record_them():
    assert av.open(io.BytesIO(encode_matroska(grey_frames(12)))).streams.video[0].frames == 0
    assert frame_numbers(decode_video(encode_matroska(grey_frames(12)), 3, train=False)) == [1, 5, 9]


def test_a_truncated_video_is_sampled_from_the_frames_before_the_cut(tmp_path):
    path = tmp_path / "clip.mp4"  # the index first (faststart), as streamed mp4s are: a cut leaves it whole
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for array in grey_frames(20):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    data = path.read_bytes()
    numbers = frame_numbers(decode_video(data[: int(len(data) * 0.9)], 4, train=False))
    assert numbers == sorted(set(numbers)) and numbers[-1] < 17  # four frames, all before the cut


@pytest.mark.parametrize(("data", "says"), [
    (b"", "empty"),
    (b"\x00\x01 not a video " * 50, "cannot read"),
    (encode_mp4(grey_frames(8))[:300], "cannot read"),
    (audio_only_mp4(), "no video stream"),
], ids=["empty", "garbage", "truncated", "audio-only"])
def test_undecodable_bytes_raise_a_video_decode_error_saying_what_was_wrong(data, says):
    with pytest.raises(VideoDecodeError, match=says):
        decode_video(data, 4, train=False)


# ---- the loader ----------------------------------------------------------------------------------


def test_the_loader_yields_clips_with_tokenized_text_and_image_ids(video_pretrain_shards, tokenizer):
    batches, loader = epoch(str(video_pretrain_shards), tokenizer)
    batch = batches[0]
    assert batch["images"].shape == (4, 4, 3, SIZE, SIZE) and batch["images"].dtype == torch.uint8
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["image_ids"].tolist() == [sample["image_id"] for sample in batch["meta"]]
    assert loader.stats == {"samples": 64, "corrupt_samples": 0, "bad_shards": 0}
    assert normalize(batch["images"]).shape == (4, 4, 3, SIZE, SIZE)


def test_normalize_treats_every_frame_of_a_clip_as_an_image():
    clips = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(normalize(clips), normalize(clips.flatten(0, 1)).view(2, 3, 3, 8, 8))


def test_every_frame_of_a_clip_gets_the_same_crop_flip_and_randaugment(tmp_path):
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 96)
    pattern = np.stack([ramp[None, :].repeat(96, 0), ramp[:, None].repeat(96, 1),
                        rng.integers(0, 255, (96, 96))], -1).astype(np.uint8)  # any two crops differ
    with ShardWriter(str(tmp_path), shard_size=10) as writer:
        for index in range(4):
            writer.write(Sample(f"k{index}", encode_mp4([pattern] * 8), "mp4", "a clip"))
    batches, _ = epoch(str(tmp_path), augment="finetune", frames=6, batch_size=4)
    clips = batches[0]["images"].float()  # (4, 6, 3, S, S) of four different crops of one pattern
    assert (clips - clips[:, :1]).abs().mean() < 2  # within a clip: one crop
    assert (clips[1:, 0] - clips[:1, 0]).abs().mean() > 10  # across clips: different crops


def test_a_corrupt_video_and_a_sample_without_video_are_skipped_and_counted(tmp_path):
    good = encode_mp4(grey_frames(8))
    records = [{"__key__": f"k{index}", "mp4": good, "txt": b"a clip"} for index in range(4)]
    records.insert(1, {"__key__": "corrupt", "mp4": good[:300], "txt": b"a clip"})
    records.insert(3, {"__key__": "nothing", "txt": b"a caption without its video"})
    batches, loader = epoch(write_raw_shard(tmp_path, records))
    assert sorted(key for batch in batches for key in batch["keys"]) == ["k0", "k1", "k2", "k3"]
    assert loader.stats == {"samples": 4, "corrupt_samples": 2, "bad_shards": 0}


def test_sampled_frame_samples_load_as_clips(tmp_path):
    from PIL import Image

    frames = {f"{index:03d}.jpg": encode_jpeg(Image.fromarray(array)) for index, array in enumerate(grey_frames(10))}
    records = [{"__key__": f"k{index}", **frames, "txt": b"frames"} for index in range(2)]
    batches, loader = epoch(write_raw_shard(tmp_path, records))
    clips = batches[0]["images"]
    assert clips.shape == (2, 4, 3, SIZE, SIZE)
    assert [frame_numbers(clip) for clip in clips] == [[0, 3, 5, 8]] * 2
    assert loader.stats["corrupt_samples"] == 0


# ---- synthetic videos ----------------------------------------------------------------------------


def test_synthetic_clips_move_their_shape_the_stated_way_between_first_and_last_frame():
    clips = [make_clip(random.Random(seed), frames=8, size=64) for seed in range(24)]
    assert {clip.direction for clip in clips} == set(DIRECTIONS)
    for clip in clips:
        decoded = decode_video(encode_mp4(clip.frames), 8, train=False).permute(0, 2, 3, 1).numpy()
        shift = centroid(decoded[-1]) - centroid(decoded[0])
        along = np.dot(shift, MOTION[clip.direction])
        assert along > 0.8 * TRAVEL * 64, (clip.direction, shift)
        assert abs(shift).sum() - abs(along) < 2, (clip.direction, shift)  # no drift across the motion


def words(texts: list[str]) -> set[str]:
    return set(" ".join(texts).lower().replace("?", " ").split())


def test_the_video_vocabulary_covers_every_word_of_the_captions_questions_and_answers():
    vocabulary = words(vocabulary_texts())
    used = set()
    for seed in range(50):
        rng = random.Random(seed)
        clip = make_clip(rng)
        texts = clip_captions(clip, rng) + [question.text for question in clip_questions(clip, rng)]
        used |= words(texts + answer_vocabulary())
    assert used <= vocabulary, used - vocabulary


def first_sample(folder) -> dict:
    shard = resolve_shards(str(folder))[0]
    return json.loads(next(read_shard(shard.url, None))["json"])


def split_count(folder) -> int:
    return sum(shard.count for shard in resolve_shards(str(folder)))


def test_synthetic_task_shards_carry_the_fields_the_tasks_read(video_task_shards):
    qa, caption, action = (video_task_shards[t] for t in ("video_qa", "video_caption", "action_classification"))
    assert video_task_shards["video_retrieval"] == caption
    question = first_sample(qa / "val")
    assert {"question_id", "question", "answers", "weights", "annotator_answers", "answer_type",
            "question_type", "image_id", "video_id"} <= set(question)
    assert question["question"] == "Which way does the " + question["question"].split("the ", 1)[1]
    assert question["answers"][0] in DIRECTIONS and len(question["annotator_answers"]) == 10
    assert split_count(qa / "val") == 120
    assert set(json.loads((qa / "answer_list.json").read_text())) >= set(DIRECTIONS)
    train_caption, test_caption = first_sample(caption / "train"), first_sample(caption / "test")
    assert "sent_id" in train_caption and isinstance(train_caption["image_id"], int)
    assert len(test_caption["captions"]) == 5 and split_count(caption / "test") == 30
    assert test_caption["captions"][0].endswith(("left", "right", "up", "down"))
    labels = json.loads((action / "labels.json").read_text())
    clip = first_sample(action / "val")
    assert labels == list(DIRECTIONS) and labels[clip["label"]] == clip["label_name"]


def test_the_url_list_points_at_the_clips_it_wrote(tmp_path):
    path = write_video_url_list(tmp_path, 3, base_url="http://127.0.0.1:9999/")
    rows = list(csv.DictReader(path.open()))
    assert [row["videoid"] for row in rows] == ["1", "2", "3"]
    assert rows[0]["contentUrl"] == "http://127.0.0.1:9999/videos/1.mp4" and rows[0]["duration"] == "PT00H00M01S"
    assert all(decode_video((tmp_path / "videos" / f"{row['videoid']}.mp4").read_bytes(), 2, train=False).shape[0] == 2
               for row in rows)
    assert " moves " in rows[0]["name"]
