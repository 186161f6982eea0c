"""One video URL -> its bytes, checked to be a decodable video: what a download-videos worker does per row.

    settings = FetchSettings(timeout=10.0, max_bytes=100 * 2**20, retries=2)
    data = fetch(url, settings)              # raises FetchFailure(reason, message)
    info = probe_video(data, url)            # extension, duration, frames, width, height

Every way a row can fail is a `FetchFailure` with a short reason, the names `summary.json` counts
(the image download's normal forms, see download_summary.py):

    http_404, http_403, http_5xx ...   the server answered with that status
    timeout                            no connection or no bytes within the timeout
    too_large                          Content-Length or the body is over max_bytes
    decode_error                       not a video PyAV can open and decode a first frame of
    unsupported_container              a video, but in a container the loader does not read
    connection_error, dns_error, ssl_error, invalid_url

Timeouts, 5xx, 408, 429 and dropped connections are transient: `fetch` tries again after
`backoff`, 2 x backoff, ... seconds, `retries` times. A 404 (or any other 4xx), a DNS failure or
a body over the limit is final at once.
"""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

TIMEOUT = "timeout"
TOO_LARGE = "too_large"
DECODE_ERROR = "decode_error"
UNSUPPORTED_CONTAINER = "unsupported_container"
CONNECTION_ERROR = "connection_error"
DNS_ERROR = "dns_error"
SSL_ERROR = "ssl_error"
INVALID_URL = "invalid_url"
TRANSIENT_HTTP = (408, 429)  # besides every 5xx
USER_AGENT = "mplug-pipeline/0.1 (+video download)"
# The extensions the shard loader reads as videos, by the container families PyAV names.
LOADER_EXTENSIONS = ("mp4", "mov", "webm", "mkv", "avi")
WEBM_CODECS = ("vp8", "vp9", "av1")  # what a WebM may hold; other codecs in Matroska are .mkv
STILL_IMAGE_FORMATS = ("image2", "gif", "apng")  # plus every "*_pipe" demuxer (jpeg_pipe, png_pipe...)
READ_CHUNK = 1 << 20


class FetchFailure(Exception):
    """A row that yields no video: `reason` is the short name summary.json counts it under."""

    def __init__(self, reason: str, message: str, transient: bool = False):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class FetchSettings:
    timeout: float = 10.0  # seconds to connect, and for each read
    max_bytes: int = 100 * 2**20  # a bigger body is not fetched (or not kept)
    retries: int = 2  # extra tries of a transient failure
    backoff: float = 1.0  # seconds before the first retry, doubled for each next


@dataclass(frozen=True)
class VideoInfo:
    extension: str  # mp4, mov, webm, mkv or avi: the container's own
    duration: float | None  # seconds
    frames: int  # from the container's header, else counted packets of the video stream
    width: int
    height: int
    codec: str


def fetch(url: str, settings: FetchSettings) -> bytes:
    """The body at `url`; FetchFailure once it fails for good."""
    for attempt in range(settings.retries + 1):
        try:
            return _fetch_once(url, settings)
        except FetchFailure as failure:
            if not failure.transient or attempt == settings.retries:
                raise
        time.sleep(settings.backoff * 2**attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _fetch_once(url: str, settings: FetchSettings) -> bytes:
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(request, timeout=settings.timeout) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > settings.max_bytes:
                raise FetchFailure(TOO_LARGE, f"Content-Length {length} is over the limit of {settings.max_bytes} bytes")
            body = io.BytesIO()
            while chunk := response.read(min(READ_CHUNK, settings.max_bytes + 1 - body.tell())):
                body.write(chunk)
                if body.tell() > settings.max_bytes:
                    raise FetchFailure(TOO_LARGE, f"the body is over the limit of {settings.max_bytes} bytes")
            return body.getvalue()
    except urllib.error.HTTPError as error:
        transient = error.code >= 500 or error.code in TRANSIENT_HTTP
        raise FetchFailure(f"http_{error.code}", f"HTTP Error {error.code}: {error.reason}", transient) from None
    except urllib.error.URLError as error:
        raise _network_failure(error.reason) from None
    except ValueError as error:  # urllib's "unknown url type" for a value that is no URL
        raise FetchFailure(INVALID_URL, str(error)) from None
    except (OSError, http.client.HTTPException) as error:  # timeouts, resets, IncompleteRead mid-body
        raise _network_failure(error) from None


def _network_failure(reason: object) -> FetchFailure:
    message = str(reason)
    if isinstance(reason, TimeoutError) or "timed out" in message:
        return FetchFailure(TIMEOUT, message or "timed out", transient=True)
    if isinstance(reason, socket.gaierror):
        return FetchFailure(DNS_ERROR, message)
    if isinstance(reason, ssl.SSLError):
        return FetchFailure(SSL_ERROR, message)
    if isinstance(reason, (OSError, http.client.HTTPException)):
        return FetchFailure(CONNECTION_ERROR, message or type(reason).__name__, transient=True)
    return FetchFailure(INVALID_URL, message)  # urllib's "unknown url type: ftp2", "no host given"


def probe_video(data: bytes, url: str = "") -> VideoInfo:
    """Open `data` with PyAV, decode the first frame of its video stream and read its size, length
    and container; FetchFailure(decode_error) when it is no video. `url` picks between extensions
    of one container family (.mov or .mp4)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            name = container.format.name
            if name in STILL_IMAGE_FORMATS or name.endswith("_pipe"):
                raise FetchFailure(DECODE_ERROR, f"a still image ({name}), not a video")
            if not container.streams.video:
                raise FetchFailure(DECODE_ERROR, f"{name} container without a video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # one frame; the shard's fetch threads are the parallelism
            first = next(container.decode(stream), None)
            if first is None:
                raise FetchFailure(DECODE_ERROR, f"no frame of the {stream.codec_context.name} stream decodes")
            codec = stream.codec_context.name
            extension = _extension(name, set(container.format.extensions), codec, url)
            duration = _duration(stream, container)
            rate = stream.average_rate
            frames = stream.frames
        if not frames:  # Matroska / WebM headers carry no frame count: count the packets
            with av.open(io.BytesIO(data)) as container:
                frames = sum(1 for packet in container.demux(video=0) if packet.size)
    except av.FFmpegError as error:
        raise FetchFailure(DECODE_ERROR, f"not a decodable video ({error})") from None
    if duration is None and frames and rate:
        duration = float(frames / rate)
    return VideoInfo(extension, duration, int(frames), first.width, first.height, codec)


def _duration(stream, container) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def _extension(format_name: str, known: set[str], codec: str, url: str) -> str:
    """The URL's extension when the container can have it, else the family's usual one."""
    from_url = PurePosixPath(urlsplit(url).path).suffix.lower().lstrip(".")
    families = set(format_name.split(","))
    if from_url in LOADER_EXTENSIONS and from_url in known | families:
        return from_url
    if "mp4" in families:
        return "mp4"
    if "matroska" in families:
        return "webm" if codec in WEBM_CODECS else "mkv"
    if "avi" in families:
        return "avi"
    raise FetchFailure(UNSUPPORTED_CONTAINER, f"a {format_name} video; the loader reads {', '.join(LOADER_EXTENSIONS)}")
