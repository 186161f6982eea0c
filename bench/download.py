"""Images/s of `mplug data download` (img2dataset on Ray) beside img2dataset's own multiprocessing.

The same URL list of small synthetic JPEGs, served by `mplug data serve` (a separate process, so
the server does not share a GIL with the downloads), is downloaded into a fresh folder by

- ray_local:       `download()` as the CLI runs it with no --ray-address: it starts a local Ray
                   (`ray.init`) and shuts it down, both inside the time (and also reported
                   taken out, from the seconds the summary gives them)
- ray_running:     `download()` on a Ray started before and stopped after, outside the time,
                   whose workers have imported img2dataset (untimed, too): a running cluster
                   that has downloaded before, as with --ray-address
- multiprocessing: img2dataset's `distributor="multiprocessing"` with every other argument the
                   same (`run_img2dataset(..., distributor="multiprocessing")`)

with the same processes, threads, shard size and image size. The variants run round-robin in
every repeat, in an order that rotates, so drifts of a shared machine hit all alike. The table
shows the median images/s of each and its ratio to multiprocessing (the median of the per-repeat
ratios). The headline ratio is ray_local with the seconds of `ray.init` and `ray.shutdown` taken
out (the summary reports them) over multiprocessing: both then still start their worker
processes, which import img2dataset, inside the time, as img2dataset's multiprocessing starts a
new pool on every call. ray_running shows what a long-lived cluster, which pays that once, gets.
The JSON (default bench/results/download.json) also holds every run and the machine.

    .venv/bin/python bench/download.py [--images 3000] [--processes 2] [--threads 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.download import DownloadOptions, download, ray_session, run_img2dataset
from data_prep.download_summary import Totals, read_shard_stats
from data_prep.shard_writer import encode_jpeg, write_json
from data_prep.synthetic import make_scenes

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "download.json"
VARIANTS = ("ray_local", "ray_running", "multiprocessing")
HEADLINE = "ray_local - Ray start/stop"  # the ratio's numerator: see the module's docstring
GOAL_RATIO = 0.9


@dataclass
class Run:
    variant: str
    repeat: int
    seconds: float  # wall time of the whole call
    ray_seconds: float  # inside `seconds`: starting and stopping Ray; 0 where the call did neither
    images: int  # samples img2dataset counted
    success: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def write_site(root: Path, count: int, size: int, seed: int) -> tuple[list[str], list[str]]:
    """`count` synthetic scenes as JPEGs under root/img/; their paths and captions."""
    (root / "img").mkdir(parents=True)
    paths, captions = [], []
    for i, scene in enumerate(make_scenes(count, seed=seed, size=size)):
        path = f"img/{i:06d}.jpg"
        (root / path).write_bytes(encode_jpeg(scene.image, quality=90))
        paths.append(path)
        captions.append(scene.caption)
    return paths, captions


class ServerProcess:
    """`mplug data serve ROOT --port 0` in a child process; base_url once it listens."""

    def __init__(self, root: Path):
        mplug = Path(sys.executable).with_name("mplug")
        self.process = subprocess.Popen(
            [str(mplug), "data", "serve", str(root), "--port", "0"],
            stdout=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()  # "serving ROOT at http://127.0.0.1:PORT/ (...)"
        if " at http://" not in line:
            self.stop()
            raise SystemExit(f"`mplug data serve` did not start; it printed {line!r}")
        self.base_url = line.split(" at ", 1)[1].split()[0].rstrip("/")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=30)


def _import_img2dataset() -> None:
    import img2dataset  # noqa: F401 (the import is the point: seconds of albumentations, cv2, wandb)


def warm_up_workers(count: int) -> None:
    """`count` Ray workers that have imported img2dataset, as those of a cluster that has run
    downloads before: at once, so that each runs on its own worker."""
    import ray

    task = ray.remote(num_cpus=1)(_import_img2dataset)
    ray.get([task.remote() for _ in range(count)])


def run_variant(variant: str, options: DownloadOptions) -> tuple[float, float]:
    """(seconds of the timed call, seconds of it spent starting and stopping Ray)."""
    if variant == "multiprocessing":
        handle, log = tempfile.mkstemp(prefix="bench-download-", suffix=".log")
        os.close(handle)
        start = time.perf_counter()
        run_img2dataset(options, "parquet", log, distributor="multiprocessing")
        seconds = time.perf_counter() - start
        os.remove(log)
        return seconds, 0.0
    if variant == "ray_running":
        with ray_session(None, options.processes):  # started and stopped outside the time
            warm_up_workers(options.processes)
            start = time.perf_counter()
            summary = download(options)
            seconds = time.perf_counter() - start
        return seconds, summary["ray_start_seconds"] + summary["ray_stop_seconds"]
    start = time.perf_counter()
    summary = download(options)
    return time.perf_counter() - start, summary["ray_start_seconds"] + summary["ray_stop_seconds"]


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    try:
        paths, captions = write_site(work / "www", args.images, args.source_size, args.seed)
        server = ServerProcess(work / "www")
        try:
            url_list = work / "urls.parquet"
            urls = [f"{server.base_url}/{p}" for p in paths]
            pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
            base = DownloadOptions(
                url_list=str(url_list), output="", input_format="parquet",
                image_size=args.image_size, processes=args.processes, threads=args.threads,
                shard_size=args.shard_size, timeout=args.timeout, retries=0, progress=False,
            )
            runs = []
            for repeat in range(args.repeats):
                shift = repeat % len(VARIANTS)
                for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                    output = work / f"out-{variant}-{repeat}"
                    seconds, ray_seconds = run_variant(variant, replace(base, output=str(output)))
                    totals = Totals.of(list(read_shard_stats(str(output)).values()))
                    if totals.success != args.images:  # each failure may have waited --timeout
                        print(f"  warning: {variant} downloaded {totals.success} of {args.images} "
                              f"images (failures {dict(totals.failures)}); its time is not comparable")
                    runs.append(Run(variant, repeat, seconds, ray_seconds, totals.count, totals.success))
                    shutil.rmtree(output)
                    print(f"  repeat {repeat + 1}/{args.repeats} {variant}: {seconds:.1f} s "
                          f"({totals.count / seconds:.0f} images/s)", flush=True)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(args, runs)


# The table's rows: (name, variant whose runs it reads, whether Ray's start and stop count, what it is)
ROWS = (
    ("ray_local", "ray_local", True, "the CLI's default: starts and stops a local Ray, all timed"),
    ("ray_local - Ray start/stop", "ray_local", False,
     "the same runs, Ray's start and stop taken out; its workers start cold"),
    ("ray_running", "ray_running", False, "Ray and workers that imported img2dataset started before"),
    ("multiprocessing", "multiprocessing", True, "img2dataset's own distributor: a new process pool"),
)


def report(args: argparse.Namespace, runs: list[Run]) -> dict:
    by_variant = {v: [r for r in runs if r.variant == v] for v in VARIANTS}

    def seconds(r: Run, with_ray: bool) -> float:
        return r.seconds if with_ray else r.seconds - r.ray_seconds

    reference = [r.images / r.seconds for r in by_variant["multiprocessing"]]
    results = {}
    for name, variant, with_ray, note in ROWS:
        times = [seconds(r, with_ray) for r in by_variant[variant]]
        rates = [r.images / t for r, t in zip(by_variant[variant], times, strict=True)]
        paired = [mine / theirs for mine, theirs in zip(rates, reference, strict=True)]
        results[name] = {
            "note": note,
            "median_seconds": statistics.median(times),
            "median_images_per_second": statistics.median(rates),
            "ratio_to_multiprocessing": statistics.median(paired),
            "ratios_to_multiprocessing": paired,
            "failed_images": sum(r.images - r.success for r in by_variant[variant]),
        }
    return {
        "benchmark": "download images/s: img2dataset on Ray vs multiprocessing",
        "machine": machine(),
        "versions": versions(),
        "images": args.images,
        "source_size": args.source_size,
        "image_size": args.image_size,
        "processes": args.processes,
        "threads": args.threads,
        "shard_size": args.shard_size,
        "repeats": args.repeats,
        "ratio": results[HEADLINE]["ratio_to_multiprocessing"],
        "ratio_uses": f"{HEADLINE} / multiprocessing: ray.init and ray.shutdown excluded, "
                      "worker start-up included on both sides",
        "ratio_including_ray_start": results["ray_local"]["ratio_to_multiprocessing"],
        "ratio_running_cluster_warm_workers": results["ray_running"]["ratio_to_multiprocessing"],
        "goal_ratio": GOAL_RATIO,
        "results": results,
        "runs": [{**r.__dict__, "images_per_second": r.images_per_second} for r in runs],
    }


def machine() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    return info


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("img2dataset", "ray", "webdataset")}


def print_table(report: dict) -> None:
    print(
        f"\nDownload of {report['images']} JPEGs ({report['source_size']} px -> {report['image_size']}) "
        f"from loopback, {report['processes']} processes x {report['threads']} threads, "
        f"shards of {report['shard_size']}, median of {report['repeats']}:"
    )
    print("| variant | median s | images/s | / multiprocessing | failed | what |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['median_seconds']:.1f} | {r['median_images_per_second']:.0f} "
              f"| {r['ratio_to_multiprocessing']:.2f} | {r['failed_images']} | {r['note']} |")
    print(f"ratio {report['ratio_uses']}: {report['ratio']:.2f} (goal >= {report['goal_ratio']})")
    print(f"with ray.init and ray.shutdown: {report['ratio_including_ray_start']:.2f}; on a running "
          f"Ray with warm workers: {report['ratio_running_cluster_warm_workers']:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--source-size", type=int, default=128, help="side of the served JPEGs")
    parser.add_argument("--image-size", type=int, default=128, help="img2dataset's resize target")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if min(args.images, args.processes, args.threads, args.shard_size, args.repeats) < 1:
        parser.error("--images, --processes, --threads, --shard-size and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report_ = run(args)
    print_table(report_)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(str(args.output), report_)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":  # img2dataset's multiprocessing and stats logger spawn: guard needed
    main()
