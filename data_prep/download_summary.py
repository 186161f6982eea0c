"""What a download produced: img2dataset's per-shard stats read back and summed into `summary.json`.

For every shard it finishes, img2dataset writes `DIR/NNNNN_stats.json`:

    {"count": 50, "successes": 45, "failed_to_download": 3, "failed_to_resize": 2,
     "start_time": ..., "end_time": ..., "duration": ...,
     "status_dict": {"success": 45, "HTTP Error 404: File not found": 2, "timed out": 1,
                     "Image decoding error": 2}}

`status_dict` counts every sample by outcome: "success" or the error message verbatim (urllib's
`str(error)` for a failed download, the resizer's message for an image it could not decode).
A shard with no stats file never finished (its worker died, or it raised): it is incomplete.
This module reads those files, names the failure reasons in a short normal form (`http_404`,
`timeout`, `decode_error`, ...), and formats the totals as a table.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

import fsspec

STATS_SUFFIX = "_stats.json"
SUCCESS = "success"
SHARD_NAME = "{:05d}"  # img2dataset's default oom_shard_count=5 digits
UNRECORDED = "unrecorded"  # counted by a shard but under no status (img2dataset's writer raised)

_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
# (reason, lower-case fragments of the messages urllib, socket, ssl and img2dataset's resizer use)
_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("timeout", ("timed out", "timeout")),
    ("decode_error", ("image decoding error",)),
    ("dns_error", ("name or service not known", "temporary failure in name resolution",
                   "nodename nor servname", "getaddrinfo failed", "no address associated")),
    ("ssl_error", ("ssl", "certificate")),
    ("connection_error", ("connection refused", "connection reset", "connection aborted",
                          "remote end closed connection", "broken pipe", "network is unreachable",
                          "no route to host", "incompleteread")),
    ("invalid_url", ("unknown url type", "no host given")),
    ("disallowed_by_robots_tag", ("x-robots-tag",)),
    ("hash_mismatch", ("hash mismatch",)),
    ("image_too_small", ("image too small",)),
    ("image_too_large", ("image area too large",)),
    ("aspect_ratio_too_large", ("aspect ratio too large",)),
)


def failure_reason(message: str) -> str:
    """A short name for an img2dataset error message; a message matching none is kept verbatim.

    >>> failure_reason("HTTP Error 404: File not found")
    'http_404'
    >>> failure_reason("<urlopen error [Errno 111] Connection refused>")
    'connection_error'
    """
    status = _HTTP_STATUS.search(message)
    if status:
        return f"http_{status.group(1)}"
    lower = message.lower()
    for reason, fragments in _REASONS:
        if any(fragment in lower for fragment in fragments):
            return reason
    return message.strip()


@dataclass(frozen=True)
class ShardStats:
    """One finished shard, as its `_stats.json` records it."""

    shard: int
    count: int
    successes: int
    status: dict[str, int]
    start_time: float
    end_time: float

    @property
    def failures(self) -> Counter[str]:
        """Failed samples by normalised reason; samples under no status count as 'unrecorded'."""
        reasons: Counter[str] = Counter()
        for message, number in self.status.items():
            if message != SUCCESS:
                reasons[failure_reason(message)] += number
        missing = self.count - self.successes - sum(reasons.values())
        if missing > 0:
            reasons[UNRECORDED] += missing
        return reasons


def shard_id(stats_url: str) -> int | None:
    """3 for '.../00003_stats.json'; None for a file not named like a shard's stats."""
    name = stats_url.rsplit("/", 1)[-1]
    if not name.endswith(STATS_SUFFIX):
        return None
    digits = name[: -len(STATS_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def read_shard_stats(output: str, skip: set[int] | None = None) -> dict[int, ShardStats]:
    """Every finished shard's stats in the folder `output` (a path or fsspec URL), by shard id;
    the shards in `skip` (already read) are left out."""
    fs, root = fsspec.core.url_to_fs(str(output))
    fs.invalidate_cache()  # the folder changes while workers finish shards
    if not fs.exists(root):
        return {}
    shards = {}
    for path in fs.glob(f"{root.rstrip('/')}/*{STATS_SUFFIX}"):
        shard = shard_id(path)
        if shard is None or (skip and shard in skip):
            continue
        try:
            with fs.open(path, "r") as handle:
                raw = json.load(handle)
        except (json.JSONDecodeError, FileNotFoundError):
            continue  # being written right now, or removed: read again on the next poll
        shards[shard] = ShardStats(
            shard=shard,
            count=int(raw["count"]),
            successes=int(raw["successes"]),
            status={str(k): int(v) for k, v in raw.get("status_dict", {}).items()},
            start_time=float(raw.get("start_time", 0.0)),
            end_time=float(raw.get("end_time", 0.0)),
        )
    return shards


@dataclass
class Totals:
    """Sums over a set of shards."""

    shards: int = 0
    count: int = 0
    success: int = 0
    failures: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, stats: list[ShardStats]) -> Totals:
        totals = cls()
        for shard in stats:
            totals.shards += 1
            totals.count += shard.count
            totals.success += shard.successes
            totals.failures.update(shard.failures)
        return totals

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def build_summary(
    stats: dict[int, ShardStats],
    expected_shards: int,
    fetched: set[int],
    retried: list[int],
    seconds: float,
    ray_seconds: tuple[float, float],
    **fields,
) -> dict:
    """The summary of every shard in the folder; `this_run` covers the `fetched` shards only.
    `seconds` is the whole call, `ray_seconds` the part of it spent starting and stopping Ray:
    the rate leaves that out."""
    everything = Totals.of(list(stats.values()))
    this_run = Totals.of([stats[s] for s in sorted(fetched) if s in stats])
    ray_start_seconds, ray_stop_seconds = ray_seconds
    download_seconds = max(seconds - ray_start_seconds - ray_stop_seconds, 1e-9)
    return {
        "count": everything.count,
        "success": everything.success,
        "failures": dict(everything.failures.most_common()),
        "shards": everything.shards,
        "expected_shards": expected_shards,
        "incomplete_shards": sorted(set(range(expected_shards)) - set(stats)),
        "retried_shards": retried,
        "this_run": {
            "shards": this_run.shards,
            "count": this_run.count,
            "success": this_run.success,
            "failed": this_run.failed,
            "images_per_second": this_run.count / download_seconds,
        },
        "seconds": seconds,
        "ray_start_seconds": ray_start_seconds,
        "ray_stop_seconds": ray_stop_seconds,
        **fields,
    }


def format_summary(summary: dict) -> str:
    """The summary as a small table, failures by reason, most frequent first."""
    run = summary["this_run"]
    rows = [
        ("shards", f"{summary['shards']} of {summary['expected_shards']}"
                   f" ({run['shards']} fetched in this run)"),
        ("images", f"{summary['count']} ({run['count']} in this run)"),
        ("success", f"{summary['success']} ({run['success']} in this run)"),
    ]
    rows += [(f"failed: {reason}", str(number)) for reason, number in summary["failures"].items()]
    ray = summary["ray_start_seconds"] + summary["ray_stop_seconds"]
    rows.append(("time", f"{summary['seconds']:.1f} s ({ray:.1f} s starting and stopping Ray)"))
    rows.append(("rate", f"{run['images_per_second']:.1f} images/s in this run"))
    if summary["retried_shards"]:
        rows.append(("retried shards", shard_list(summary["retried_shards"])))
    if summary["incomplete_shards"]:
        rows.append(("INCOMPLETE shards", shard_list(summary["incomplete_shards"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def shard_list(shards: list[int], shown: int = 20) -> str:
    """'0, 3, 7' or, for a long list, its first `shown` ids and how many more."""
    text = ", ".join(str(s) for s in shards[:shown])
    return text + (f", ... ({len(shards) - shown} more)" if len(shards) > shown else "")
