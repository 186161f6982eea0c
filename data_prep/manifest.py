"""The manifest beside a set of shards: which tar files hold how many samples.

`DIR/manifest.json` (or any `*.json` named explicitly) looks like

    {"count": 1234, "shards": [{"url": "00000.tar", "count": 1000}, {"url": "00001.tar", "count": 234}],
     ...free-form fields: task, split, source...}

Shard URLs are relative to the manifest's folder unless absolute (a path or an fsspec URL).
Every producer of shards writes one (downloads, converters, synthetic data); the loaders read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    url: str
    count: int | None = None  # None when unknown (a glob of shards without a manifest)


def _is_absolute(url: str) -> bool:
    return url.startswith("/") or "://" in url


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def write_manifest(folder: str, shards: list[ShardInfo], **fields: Any) -> str:
    """Write `folder/manifest.json` listing `shards` (their URLs made relative to `folder`); returns its URL."""
    folder = str(folder).rstrip("/")
    entries = []
    for shard in shards:
        url = shard.url
        if url.startswith(folder + "/"):
            url = url[len(folder) + 1:]
        entries.append({"url": url, "count": shard.count})
    counts = [s.count for s in shards]
    payload = {"count": sum(counts) if None not in counts else None, **fields, "shards": entries}
    url = f"{folder}/{MANIFEST_NAME}"
    with fsspec.open(url, "w") as handle:
        json.dump(payload, handle, indent=2)
    return url


def read_manifest(url: str) -> tuple[list[ShardInfo], dict[str, Any]]:
    """The shards a manifest lists (absolute URLs) and its other fields."""
    try:
        with fsspec.open(url, "r") as handle:
            payload = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {url} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"manifest {url} is not valid JSON ({error})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("shards"), list):
        raise ValueError(f"manifest {url} has no 'shards' list; expected {{'shards': [{{'url': ..., 'count': ...}}]}}")
    base = _parent(str(url))
    shards = []
    for index, entry in enumerate(payload["shards"]):
        if not isinstance(entry, dict) or "url" not in entry:
            raise ValueError(f"manifest {url}: shard entry {index} is {entry!r}; expected {{'url': ..., 'count': ...}}")
        shard_url = entry["url"] if _is_absolute(entry["url"]) else f"{base}/{entry['url']}"
        shards.append(ShardInfo(shard_url, entry.get("count")))
    fields = {k: v for k, v in payload.items() if k != "shards"}
    return shards, fields
