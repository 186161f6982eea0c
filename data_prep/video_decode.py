"""Video samples -> uint8 RGB clips (T, 3, H, W) of segment-sampled frames.

A video sample of a shard holds either a video file (`KEY.mp4`, `.avi`, `.webm`, `.mkv`, `.mov`),
decoded here with PyAV (FFmpeg), or frames sampled beforehand as images (`KEY.000.jpg`,
`KEY.001.jpg`, ...: webdataset reads them as the fields "000.jpg", "001.jpg", ...), decoded with
`image_decode.decode_rgb`. Which frames make the clip is `frame_sampling.segment_indices`.

Decoding does only what the clip needs: a video is decoded in order up to the last frame sampled
(a compressed stream cannot be entered elsewhere than at a keyframe) and only the sampled frames
are converted to RGB; of sampled-frame samples only the chosen images are decoded. The frame
count comes from the container's header; containers that do not record it (Matroska, WebM) are
counted by reading their packets without decoding, which costs little. Should the stream hold
fewer frames than its header said (a truncated download: the frames before the cut decode), the
clip is sampled again from the frames it has.

FFmpeg decodes on one thread here: every dataloader worker is one process decoding one video at
a time, and FFmpeg's default (a thread per core in every worker) would oversubscribe the cores.

Clips are (T, 3, H, W) uint8 with channels-last memory, the layout `augment.ImageAugment` resizes
fastest. Undecodable data raises `VideoDecodeError` (a ValueError) saying what was wrong.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterable, Mapping

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from data_prep.frame_sampling import segment_indices
from data_prep.image_decode import decode_rgb
from data_prep.shard_writer import VIDEO_EXTENSIONS

FRAME_FILE = re.compile(r"^(\d+)\.(jpg|jpeg|png|webp)$")  # "000.jpg": the field of KEY.000.jpg
DECODE_THREADS = 1  # FFmpeg threads per decode: one, as each dataloader worker is already a process


class VideoDecodeError(ValueError):
    """Bytes that do not decode to a video clip: empty, corrupt, no video stream, no frames."""


def _open(data: bytes) -> av.container.InputContainer:
    if not data:
        raise VideoDecodeError("the video is empty (0 bytes)")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, OSError) as error:
        raise VideoDecodeError(f"FFmpeg cannot read the {len(data)} bytes as a video file: {error}") from None


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = [stream.type for stream in container.streams] or ["none"]
        raise VideoDecodeError(f"the {container.format.name} file has no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = DECODE_THREADS
    return stream


def _count_packets(container: av.container.InputContainer, stream) -> int:
    """Frames of a stream whose container does not record them: its packets, read without decoding."""
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def _decode_at(container, stream, indices: Iterable[int]) -> tuple[dict[int, np.ndarray], int]:
    """RGB (H, W, 3) arrays of the frames at `indices`, and how many frames were decoded.

    Decoding stops after the last index wanted; fewer frames decoded than that means the stream
    ended early. A stream cut short (a truncated download) ends at the damage: the packet cut in
    half fails to decode, and the frames before it are good.
    """
    wanted = set(indices)
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    # One converter for the clip: `frame.to_ndarray(format=...)` sets up FFmpeg's scaler afresh for
    # every frame, which costs 4x the conversion itself (0.4 against 0.1 ms a 224 px frame).
    reformatter = VideoReformatter()
    decoded = 0

    def take(decoding: Iterable[av.VideoFrame]) -> None:
        nonlocal decoded
        for frame in decoding:
            if decoded in wanted:
                frames[decoded] = reformatter.reformat(frame, format="rgb24").to_ndarray()  # (H, W, 3)
            decoded += 1
            if decoded > last:
                return

    try:
        take(container.decode(stream))
    except av.FFmpegError:
        # Cut short: the decoder still holds frames of the packets before the damage; drain them.
        try:
            take(stream.codec_context.decode(None))
        except av.FFmpegError:
            pass
        if decoded == 0:
            raise
    return frames, decoded


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    sizes = sorted({array.shape for array in arrays})
    if len(sizes) > 1:
        raise VideoDecodeError(f"the sampled frames differ in size ({sizes}); a clip needs one frame size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W) channels-last


def decode_video(data: bytes, count: int, *, train: bool, rng: random.Random | None = None) -> torch.Tensor:
    """`count` segment-sampled frames of a video file's bytes: uint8 (count, 3, H, W), RGB.

    train: a random frame per segment (from `rng`); else the middle frame of each segment.
    """
    try:
        with _open(data) as container:
            stream = _video_stream(container)
            total = stream.frames or _count_packets(container, stream)
            if total < 1:
                raise VideoDecodeError(f"the {container.format.name} file's video stream holds no frames")
            indices = segment_indices(total, count, train=train, rng=rng)
            frames, decoded = _decode_at(container, stream, indices)
        if decoded <= max(indices):  # fewer frames than the header said: sample from those there are
            if decoded == 0:
                raise VideoDecodeError(f"no frame of the video stream could be decoded (header says {total})")
            indices = segment_indices(decoded, count, train=train, rng=rng)
            with _open(data) as container:
                frames, _ = _decode_at(container, _video_stream(container), indices)
    except av.FFmpegError as error:
        raise VideoDecodeError(f"FFmpeg failed decoding the video ({len(data)} bytes): {error}") from None
    return _stack([frames[index] for index in indices])


def frame_files(sample: Mapping[str, object]) -> list[str]:
    """The sampled-frame fields of a raw sample ("000.jpg", "001.jpg", ...) in frame order."""
    numbered = [(int(match.group(1)), name) for name in sample if (match := FRAME_FILE.match(name))]
    return [name for _, name in sorted(numbered)]


def decode_frame_files(sample: Mapping[str, bytes], count: int, *, train: bool,
                       rng: random.Random | None = None) -> torch.Tensor:
    """`count` segment-sampled frames of a sample stored as images (KEY.000.jpg, ...): uint8 (count, 3, H, W)."""
    names = frame_files(sample)
    if not names:
        raise VideoDecodeError(f"no sampled frames (000.jpg, 001.jpg, ...) among the fields {sorted(sample)}")
    indices = segment_indices(len(names), count, train=train, rng=rng)
    decoded = {}
    for index in sorted(set(indices)):
        try:
            decoded[index] = decode_rgb(sample[names[index]]).permute(1, 2, 0)  # (H, W, 3)
        except Exception as error:  # noqa: BLE001 - PIL and torchvision raise several kinds
            raise VideoDecodeError(f"frame {names[index]} does not decode: {type(error).__name__}: {error}") from None
    return _stack([decoded[index].numpy() for index in indices])


def decode_clip(sample: Mapping[str, bytes], count: int, *, train: bool,
                rng: random.Random | None = None) -> torch.Tensor:
    """The clip of a raw shard sample: its video file if it has one, else its sampled frames."""
    extension = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
    if extension is not None:
        return decode_video(sample[extension], count, train=train, rng=rng)
    if not frame_files(sample):
        fields = sorted(name for name in sample if not name.startswith("__"))
        raise VideoDecodeError(
            f"no video ({', '.join(VIDEO_EXTENSIONS)}) and no sampled frames (KEY.000.jpg, KEY.001.jpg, ...) "
            f"in the sample; its fields are {fields}"
        )
    return decode_frame_files(sample, count, train=train, rng=rng)
