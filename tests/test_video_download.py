"""`mplug data download-videos` against a real HTTP server on loopback and a real local Ray.

The server holds small videos made here with PyAV (32 px, a few frames; mp4, avi and mkv); the
URL lists mix in a dead link (404), a corrupt body, a video over the size limit and one answered
slower than the timeout, and every test counts what it expects of each.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pandas as pd
import psutil
import pytest
from test_download import read_shards, summary_of

import data_prep.download
from cluster.cli import main
from data_prep.convert.webvid import convert_webvid
from data_prep.manifest import read_manifest
from data_prep.serve import LoopbackServer
from data_prep.video_fetch import FetchFailure, FetchSettings, fetch

FRAMES = 4
SIZE = 32
TIMEOUT = 1.0
SLOW_DELAY = 2.5  # seconds before the slow URL answers: each of its two tries times out
FAST_ARGS = ["--processes", "2", "--threads", "4", "--no-progress"]


def make_video(path: Path, container: str = "mp4", codec: str = "libx264", frames: int = FRAMES,
               size: int = SIZE, noise: bool = False) -> bytes:
    """A real video file: `frames` frames of a colour ramp (or noise, which compresses badly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    with av.open(str(path), "w", format=container) as output:
        stream = output.add_stream(codec, rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            pixels = (rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if noise
                      else np.full((size, size, 3), 40 * index, dtype=np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return path.read_bytes()


def first_frame_size(data: bytes) -> tuple[int, int]:
    with av.open(io.BytesIO(data)) as container:
        frame = next(container.decode(video=0))
        return frame.width, frame.height


def write_url_list(path: Path, server: LoopbackServer, names: list[str]) -> Path:
    pd.DataFrame({"url": [server.url(name) for name in names],
                  "caption": [f"clip {name}" for name in names]}).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def warm_ray():
    """One local Ray for the module: the CLI uses a Ray already running in its process."""
    with data_prep.download.ray_session(None, processes=2):
        yield


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """v/0.mp4 ... v/5.mp4: six good videos for the retry tests."""
    root = tmp_path_factory.mktemp("clips")
    for index in range(6):
        make_video(root / "v" / f"{index}.mp4")
    return root


# ---------------------------------------------------------------------------------------------
# The acceptance test: a WebVid CSV -> URL list -> shards
# ---------------------------------------------------------------------------------------------


def test_download_keeps_every_good_video_counts_each_failure_and_a_rerun_fetches_nothing(tmp_path, warm_ray):
    www = tmp_path / "www"
    good = {  # served path -> (extension in the shard, bytes)
        "v/1.mp4": ("mp4", make_video(www / "v/1.mp4")),
        "v/2.avi": ("avi", make_video(www / "v/2.avi", "avi", "mpeg4")),
        "v/3.mkv": ("mkv", make_video(www / "v/3.mkv", "matroska", "mpeg4", frames=6)),
        "v/4": ("mp4", make_video(www / "v/4", frames=5)),  # no extension in the URL: the container's
        "v/5.mp4": ("mp4", make_video(www / "v/5.mp4")),
    }
    big = make_video(www / "v/big.mp4", frames=8, size=96, noise=True)
    max_bytes = max(len(data) for _, data in good.values())
    assert len(big) > max_bytes
    (www / "v/corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but no video after all" * 20)
    make_video(www / "v/slow.mp4")
    rows = ["v/1.mp4", "gone/404.mp4", "v/2.avi", "v/corrupt.mp4", "v/3.mkv", "v/slow.mp4", "v/4",
            "v/big.mp4", "v/5.mp4"]
    videoids = {path: 1000 + n for n, path in enumerate(rows)}
    output = tmp_path / "shards"
    with LoopbackServer(www, delays={"v/slow.mp4": SLOW_DELAY}) as server:
        csv = tmp_path / "results_2M_train.csv"
        pd.DataFrame({"videoid": [videoids[p] for p in rows], "contentUrl": [server.url(p) for p in rows],
                      "duration": ["PT00H00M01S"] * len(rows), "page_dir": ["011201_011250"] * len(rows),
                      "name": [f"clip {p}" for p in rows]}).to_csv(csv, index=False)
        convert_webvid(tmp_path / "webvid", train=[csv])
        argv = ["data", "download-videos", str(tmp_path / "webvid" / "train.parquet"), "--output", str(output),
                "--shard-size", "3", "--timeout", str(TIMEOUT), "--url-retries", "1",
                "--max-bytes", str(max_bytes), *FAST_ARGS]
        assert main(argv) == 0
        first = server.requests

        summary = summary_of(output)
        assert (summary["count"], summary["success"]) == (9, 5)
        assert summary["failures"] == {"http_404": 1, "decode_error": 1, "timeout": 1, "too_large": 1}
        assert summary["shards"] == summary["expected_shards"] == 3
        assert summary["incomplete_shards"] == [] and summary["retried_shards"] == []
        # one request per URL, two for the slow one (a timeout is retried), one for the 404
        assert first == Counter({path: 2 if path == "v/slow.mp4" else 1 for path in rows})

        samples = read_shards(output)
        assert set(samples) == {str(videoids[path]) for path in good}
        for path, (extension, data) in good.items():
            sample = samples[str(videoids[path])]
            assert set(sample) == {extension, "txt", "json"}
            assert sample[extension] == data  # the bytes as served
            assert first_frame_size(sample[extension]) == (SIZE, SIZE)
            meta = json.loads(sample["json"])
            assert meta["key"] == str(videoids[path]) and meta["url"] == server.url(path)
            assert meta["status"] == "success" and meta["page_dir"] == "011201_011250"
            assert sample["txt"].decode() == meta["caption"] == f"clip {path}"
            assert (meta["width"], meta["height"]) == (SIZE, SIZE)
            assert meta["frames"] == {"v/3.mkv": 6, "v/4": 5}.get(path, FRAMES)
            assert meta["duration"] == pytest.approx(meta["frames"] / 8, abs=0.13)  # 8 frames/s
        stats = json.loads((output / "00001_stats.json").read_text())  # rows 3-5: corrupt, mkv, slow
        assert stats["status_dict"] == {"success": 1, "decode_error": 1, "timeout": 1}
        assert sorted((f["url"], f["reason"]) for f in stats["failed_samples"]) == [
            (server.url("v/corrupt.mp4"), "decode_error"), (server.url("v/slow.mp4"), "timeout")]

        shards, fields = read_manifest(str(output / "manifest.json"))
        assert [(Path(s.url).name, s.count) for s in shards] == [("00000.tar", 2), ("00001.tar", 1),
                                                                 ("00002.tar", 2)]
        assert fields["count"] == 5 and fields["media"] == "video"

        assert main(argv) == 0  # the rerun
        assert server.requests == first
    again = summary_of(output)
    assert again["this_run"]["shards"] == again["this_run"]["count"] == 0
    assert {k: again[k] for k in ("count", "success", "failures")} == {k: summary[k] for k in ("count", "success", "failures")}


# ---------------------------------------------------------------------------------------------
# Shards that fail: retried by the driver, then reported
# ---------------------------------------------------------------------------------------------


def shard_workers() -> list[psutil.Process]:
    """The Ray workers of this test process now running a shard task."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "ray::fetch_shard" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_shard_whose_worker_is_killed_mid_shard_is_run_again_and_loses_nothing(clips, tmp_path, warm_ray):
    names = [f"v/{index}.mp4" for index in range(4)]
    slow = names[2]
    killed: list[int] = []

    def kill_when_the_slow_request_arrives(server: LoopbackServer) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if server.requests[slow]:
                for worker in shard_workers():
                    worker.kill()
                    killed.append(worker.pid)
            time.sleep(0.05)

    output = tmp_path / "shards"
    with LoopbackServer(clips, delays={slow: 2.0}) as server:
        url_list = write_url_list(tmp_path / "urls.parquet", server, names)  # one shard: one worker
        killer = threading.Thread(target=kill_when_the_slow_request_arrives, args=(server,))
        killer.start()
        argv = ["data", "download-videos", str(url_list), "--output", str(output), "--shard-size", "4",
                "--timeout", "10", *FAST_ARGS]
        assert main(argv) == 0
        killer.join()
        requests = server.requests
    assert killed, "no Ray worker was running the shard"
    assert requests == Counter({name: 2 for name in names})  # the whole shard, fetched again
    summary = summary_of(output)
    assert summary["retried_shards"] == [0] and summary["incomplete_shards"] == []
    assert (summary["count"], summary["success"], summary["failures"]) == (4, 4, {})
    assert sorted(read_shards(output)) == ["000000", "000001", "000002", "000003"]  # shard, row
    assert not list(output.glob("*.tmp-*"))  # the dead worker's half shard is gone


def test_a_shard_failing_every_time_is_reported_after_the_retries_and_the_exit_code_is_1(clips, tmp_path, warm_ray):
    names = [f"v/{index}.mp4" for index in range(6)]
    output = tmp_path / "shards"
    (output / "00001.tar").mkdir(parents=True)  # shard 1 cannot be renamed into place
    with LoopbackServer(clips) as server:
        url_list = write_url_list(tmp_path / "urls.parquet", server, names)
        argv = ["data", "download-videos", str(url_list), "--output", str(output), "--shard-size", "2",
                "--retries", "1", *FAST_ARGS]
        assert main(argv) == 1
        requests = server.requests
    assert requests == Counter({name: 2 if name in names[2:4] else 1 for name in names})
    summary = summary_of(output)
    assert summary["incomplete_shards"] == [1] and summary["retried_shards"] == [1]
    assert summary["shard_errors"]["1"].startswith("IsADirectoryError")
    assert (summary["shards"], summary["success"]) == (2, 4)
    shards, _ = read_manifest(str(output / "manifest.json"))
    assert [Path(s.url).name for s in shards] == ["00000.tar", "00002.tar"]


# ---------------------------------------------------------------------------------------------
# One URL, without Ray
# ---------------------------------------------------------------------------------------------


class FlakyHandler(BaseHTTPRequestHandler):
    """/flaky answers 503 the first time and the body after; /gone always 404."""

    requests: Counter[str] = Counter()

    def do_GET(self) -> None:  # the method name http.server dispatches GET to
        self.requests[self.path] += 1
        if self.path == "/flaky" and self.requests[self.path] > 1:
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"body")
        else:
            self.send_error(503 if self.path == "/flaky" else 404)

    def log_message(self, format: str, *args) -> None:
        pass


def test_a_5xx_is_retried_with_backoff_and_a_404_is_not():
    FlakyHandler.requests = Counter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    settings = FetchSettings(timeout=5.0, retries=2, backoff=0.2)
    try:
        start = time.monotonic()
        assert fetch(f"{base}/flaky", settings) == b"body"
        assert time.monotonic() - start >= 0.2
        with pytest.raises(FetchFailure) as gone:
            fetch(f"{base}/gone", settings)
    finally:
        server.shutdown()
        server.server_close()
    assert gone.value.reason == "http_404"
    assert FlakyHandler.requests == Counter({"/flaky": 2, "/gone": 1})


def test_a_url_list_with_repeated_keys_is_refused_before_ray_starts(tmp_path):
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption,key\nhttp://127.0.0.1:1/a.mp4,a,7\nhttp://127.0.0.1:1/b.mp4,b,7\n")
    with pytest.raises(SystemExit, match="repeats 1 keys of its 'key' column"):
        main(["data", "download-videos", str(url_list), "--output", str(tmp_path / "out")])
