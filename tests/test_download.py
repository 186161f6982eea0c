"""`mplug data download` against a real HTTP server on loopback and a real local Ray.

The server holds small solid-colour JPEGs; the URL list mixes in dead links (404), corrupt
bytes and images answered slower than the timeout, and every test counts what it expects of each.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
from PIL import Image

import data_prep.download
from cluster.cli import main
from data_prep.download_summary import failure_reason
from data_prep.manifest import read_manifest
from data_prep.serve import LoopbackServer

IMAGES = 200
MISSING = 10  # 5%: answer 404
CORRUPT = 10  # 5%: bytes no decoder reads
SLOW = 4  # answered after SLOW_DELAY, past the TIMEOUT
TIMEOUT = 2.0
SLOW_DELAY = 4.0
SHARD_SIZE = 50
FAST_ARGS = ["--image-size", "32", "--processes", "2", "--threads", "16", "--no-progress"]


@dataclass
class Site:
    """Files under `root` and a URL list's rows for them: path relative to root, caption, kind."""

    root: Path
    rows: list[tuple[str, str, str]]  # (path, caption, kind): kind in ok, missing, corrupt, slow

    def paths(self, kind: str) -> list[str]:
        return [path for path, _, k in self.rows if k == kind]

    @property
    def delays(self) -> dict[str, float]:
        return {path: SLOW_DELAY for path in self.paths("slow")}

    def write_url_list(self, server: LoopbackServer, path: Path, url_col: str = "url") -> Path:
        frame = pd.DataFrame({
            url_col: [server.url(p) for p, _, _ in self.rows],
            "caption": [caption for _, caption, _ in self.rows],
        })
        if path.suffix == ".parquet":
            frame.to_parquet(path)
        else:
            frame.to_csv(path, index=False)
        return path


def make_site(root: Path, count: int, missing: int, corrupt: int, slow: int) -> Site:
    """`count` URLs, the faulty ones spread evenly over the list so every shard gets some."""
    root.mkdir(parents=True)
    faults = ["missing"] * missing + ["corrupt"] * corrupt + ["slow"] * slow
    step = count // len(faults) if faults else count
    kinds = ["ok"] * count
    for n, kind in enumerate(faults):
        kinds[n * step + n % step] = kind
    rows = []
    for i, kind in enumerate(kinds):
        path = f"img/{i:04d}.jpg"
        colour = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
        if kind == "missing":
            path = f"gone/{i:04d}.jpg"  # never written: the server answers 404
        elif kind == "corrupt":
            (root / "img").mkdir(exist_ok=True)
            (root / path).write_bytes(b"\x00not an image\xff" * (i + 1))
        else:
            (root / "img").mkdir(exist_ok=True)
            Image.new("RGB", (24, 16), colour).save(root / path, format="JPEG")
        rows.append((path, f"a picture number {i} in colour {colour}", kind))
    return Site(root, rows)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    return make_site(tmp_path_factory.mktemp("site") / "www", IMAGES, MISSING, CORRUPT, SLOW)


@pytest.fixture(scope="module")
def small_site(tmp_path_factory) -> Site:
    return make_site(tmp_path_factory.mktemp("site") / "www", 40, 2, 2, 0)


@pytest.fixture(scope="module")
def warm_ray():
    """One local Ray for the tests after the acceptance test (which starts its own, as the CLI
    does): download() uses a Ray already running in its process and leaves it running."""
    with data_prep.download.ray_session(None, processes=2):
        yield


def read_shards(output: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in the tars of `output`: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(output.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def summary_of(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# The acceptance test
# ---------------------------------------------------------------------------------------------


def test_download_counts_every_fault_keeps_every_image_and_a_rerun_fetches_nothing(site, tmp_path):
    output = tmp_path / "shards"
    with LoopbackServer(site.root, delays=site.delays) as server:
        url_list = site.write_url_list(server, tmp_path / "urls.parquet")
        argv = ["data", "download", str(url_list), "--output", str(output), "--shard-size",
                str(SHARD_SIZE), "--timeout", str(TIMEOUT), *FAST_ARGS]
        assert main(argv) == 0
        first = server.requests

        summary = summary_of(output)
        good = IMAGES - MISSING - CORRUPT - SLOW
        assert summary["count"] == IMAGES
        assert summary["success"] == good
        assert summary["failures"] == {"http_404": MISSING, "decode_error": CORRUPT, "timeout": SLOW}
        assert summary["shards"] == summary["expected_shards"] == IMAGES // SHARD_SIZE
        assert summary["incomplete_shards"] == [] and summary["retried_shards"] == []
        assert summary["log"] is None  # nothing went wrong: img2dataset's log is not kept
        assert summary["this_run"]["count"] == IMAGES
        assert first == Counter({path: 1 for path, _, _ in site.rows})  # one request per URL

        samples = read_shards(output)
        captions = {server.url(path): caption for path, caption, _ in site.rows}
        assert len(samples) == good
        assert all(set(files) == {"jpg", "txt", "json"} for files in samples.values())
        urls = set()
        for key, files in samples.items():
            meta = json.loads(files["json"])
            assert meta["key"] == key and meta["status"] == "success"
            assert files["txt"].decode() == captions[meta["url"]]
            assert Image.open(io.BytesIO(files["jpg"])).size == (32, 32)
            urls.add(meta["url"])
        assert urls == {server.url(path) for path in site.paths("ok")}

        shards, fields = read_manifest(str(output / "manifest.json"))
        assert [Path(s.url).name for s in shards] == [f"{i:05d}.tar" for i in range(4)]
        assert sum(s.count for s in shards) == fields["count"] == good
        assert fields["image_size"] == 32

        assert main(argv) == 0  # the rerun
        assert server.requests == first
    again = summary_of(output)
    assert again["this_run"] == {**again["this_run"], "shards": 0, "count": 0}
    assert {k: again[k] for k in ("count", "success", "failures", "shards")} == {
        k: summary[k] for k in ("count", "success", "failures", "shards")
    }


# ---------------------------------------------------------------------------------------------
# Shards a worker did not finish
# ---------------------------------------------------------------------------------------------


def losing_shard(shard: int, output: Path, times: int):
    """run_img2dataset that, the first `times` passes, removes `shard`'s stats after the pass:
    what a worker that died before writing them leaves behind."""
    real = data_prep.download.run_img2dataset
    passes = []

    def run(*args, **kwargs):
        real(*args, **kwargs)
        passes.append(1)
        if len(passes) <= times:
            (output / f"{shard:05d}_stats.json").unlink()

    return run, passes


def test_a_shard_left_without_stats_is_retried_and_only_it(
    small_site, tmp_path, monkeypatch, warm_ray
):
    output = tmp_path / "shards"
    run, passes = losing_shard(1, output, times=1)
    monkeypatch.setattr(data_prep.download, "run_img2dataset", run)
    with LoopbackServer(small_site.root) as server:
        url_list = small_site.write_url_list(server, tmp_path / "urls.csv")
        # fsspec URLs for both ends, and a CSV URL list
        argv = ["data", "download", f"file://{url_list}", "--output", f"file://{output}",
                "--shard-size", "10", *FAST_ARGS]
        assert main(argv) == 0
        requests = server.requests
    assert len(passes) == 2
    summary = summary_of(output)
    assert summary["retried_shards"] == [1]
    assert summary["incomplete_shards"] == []
    Path(summary["log"]).unlink()  # kept after a retry, for the workers' output
    assert (summary["count"], summary["success"]) == (40, 36)
    assert summary["failures"] == {"http_404": 2, "decode_error": 2}
    shard_of = {path: n // 10 for n, (path, _, _) in enumerate(small_site.rows)}
    assert requests == Counter({path: 2 if shard_of[path] == 1 else 1 for path in shard_of})


def test_shards_still_failing_after_the_retries_are_reported_and_the_exit_code_is_1(
    small_site, tmp_path, monkeypatch, warm_ray
):
    output = tmp_path / "shards"
    run, passes = losing_shard(2, output, times=99)
    monkeypatch.setattr(data_prep.download, "run_img2dataset", run)
    with LoopbackServer(small_site.root) as server:
        url_list = small_site.write_url_list(server, tmp_path / "urls.parquet")
        argv = ["data", "download", str(url_list), "--output", str(output), "--shard-size", "10",
                "--retries", "1", *FAST_ARGS]
        assert main(argv) == 1
    assert len(passes) == 2
    summary = summary_of(output)
    assert summary["incomplete_shards"] == [2]
    assert summary["retried_shards"] == [2]
    Path(summary["log"]).unlink()
    assert (summary["shards"], summary["expected_shards"], summary["count"]) == (3, 4, 30)
    shards, _ = read_manifest(str(output / "manifest.json"))
    assert [Path(s.url).name for s in shards] == ["00000.tar", "00001.tar", "00003.tar"]


def ray_download_workers() -> list[psutil.Process]:
    """The Ray workers of this test process (never another's) now running a shard."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "ray::ray_download" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_worker_killed_mid_shard_loses_no_image(small_site, tmp_path, warm_ray):
    output = tmp_path / "shards"
    slow = small_site.paths("ok")[5]
    killed: list[int] = []

    def kill_when_slow_request_arrives(server: LoopbackServer) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not killed:
            if server.requests[slow]:
                for worker in ray_download_workers():
                    worker.kill()
                    killed.append(worker.pid)
            time.sleep(0.05)

    with LoopbackServer(small_site.root, delays={slow: 3.0}) as server:
        url_list = small_site.write_url_list(server, tmp_path / "urls.parquet")
        killer = threading.Thread(target=kill_when_slow_request_arrives, args=(server,))
        killer.start()
        argv = ["data", "download", str(url_list), "--output", str(output), "--shard-size", "10",
                "--timeout", "10", *FAST_ARGS]
        assert main(argv) == 0
        killer.join()
        requests = server.requests
    assert killed, "no Ray worker was running the slow shard"
    assert requests[slow] == 2  # Ray ran the killed worker's shard again
    summary = summary_of(output)
    assert (summary["count"], summary["success"], summary["shards"]) == (40, 36, 4)
    assert summary["failures"] == {"http_404": 2, "decode_error": 2}
    assert len(read_shards(output)) == 36


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_a_url_list_without_the_url_column_names_the_columns_it_has(small_site, tmp_path):
    url_list = tmp_path / "urls.parquet"
    pd.DataFrame({"image_url": ["http://127.0.0.1:1/a.jpg"], "caption": ["a"]}).to_parquet(url_list)
    with pytest.raises(SystemExit) as error:
        main(["data", "download", str(url_list), "--output", str(tmp_path / "out")])
    message = str(error.value)
    assert "has no column 'url'" in message
    assert "['image_url', 'caption']" in message and "--url-col" in message
    assert not (tmp_path / "out").exists()


def test_a_missing_url_list_is_an_error_that_says_so(tmp_path):
    with pytest.raises(SystemExit) as error:
        main(["data", "download", str(tmp_path / "nope.parquet"), "--output", str(tmp_path / "out")])
    assert f"URL list {tmp_path / 'nope.parquet'} does not exist" in str(error.value)


def test_an_unknown_extension_asks_for_the_input_format(tmp_path):
    url_list = tmp_path / "urls.txt"
    url_list.write_text("url,caption\nhttp://127.0.0.1:1/a.jpg,a\n")
    with pytest.raises(SystemExit) as error:
        main(["data", "download", str(url_list), "--output", str(tmp_path / "out")])
    assert "--input-format" in str(error.value)


def test_a_foreign_json_file_in_the_output_is_refused_before_img2dataset_trips_on_it(tmp_path):
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption\nhttp://127.0.0.1:1/a.jpg,a\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.json").write_text("{}")
    with pytest.raises(SystemExit) as error:
        main(["data", "download", str(url_list), "--output", str(tmp_path / "out")])
    assert "holds notes.json" in str(error.value)


def test_an_in_memory_output_is_refused_because_ray_workers_cannot_see_it(tmp_path):
    url_list = tmp_path / "urls.csv"
    url_list.write_text("url,caption\nhttp://127.0.0.1:1/a.jpg,a\n")
    with pytest.raises(SystemExit) as error:
        main(["data", "download", str(url_list), "--output", "memory://shards"])
    assert "Ray workers cannot" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Failure reasons and the server
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("HTTP Error 404: File not found", "http_404"),
        ("HTTP Error 500: Internal Server Error", "http_500"),
        ("timed out", "timeout"),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("Image decoding error", "decode_error"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
        ("Remote end closed connection without response", "connection_error"),
        ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
        ("<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>", "ssl_error"),
        ("unknown url type: 'ftp2'", "invalid_url"),
        ("image too small", "image_too_small"),
        ("something nobody foresaw ", "something nobody foresaw"),
    ],
)
def test_failure_messages_get_short_reasons(message, reason):
    assert failure_reason(message) == reason


def test_the_server_counts_requests_answers_404_and_delays(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with LoopbackServer(tmp_path, delays={"/a.txt": 0.3}) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        start = time.monotonic()
        with urllib.request.urlopen(server.url("a.txt"), timeout=5) as response:
            assert response.read() == b"hello"
        assert time.monotonic() - start >= 0.3
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(server.url("b.txt"), timeout=5)
        assert missing.value.code == 404
    assert server.requests == Counter({"a.txt": 1, "b.txt": 1})
