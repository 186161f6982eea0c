"""Where shards come from and how one shard is read.

A shard specification is any of:
- a manifest (`.../manifest.json`, see `manifest.py`) or a folder holding one;
- a folder of `*.tar` files without a manifest;
- a glob (`/data/cc3m/*.tar`, `s3://bucket/cc3m/*.tar`);
- a brace pattern (`/data/cc3m/{00000..00331}.tar`, expanded by webdataset);
- a list of any of the above.
Every form works for local paths and fsspec URLs alike.

`read_shard` turns one tar file into raw samples (`{"__key__": ..., "jpg": bytes, "txt": bytes,
"json": bytes}`) with webdataset's tar iterators. A shard that cannot be opened or ends early
(truncated upload, killed writer) is reported through a callback and the samples read before
the damage are kept: it never stops the stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import fsspec
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_prep.manifest import MANIFEST_NAME, ShardInfo, read_manifest

GLOB_CHARS = "*?["


def resolve_shards(spec: str | list[str]) -> list[ShardInfo]:
    """Every shard a specification names, in a stable order; an error says what was looked for."""
    if isinstance(spec, (list, tuple)):
        shards = [shard for item in spec for shard in resolve_shards(item)]
    else:
        shards = _resolve_one(str(spec))
    if not shards:
        raise FileNotFoundError(
            f"no shards found for {spec!r}; give a manifest.json, a folder of .tar shards, "
            "a glob such as 'DIR/*.tar' or a brace pattern such as 'DIR/{00000..00009}.tar'"
        )
    return shards


def _resolve_one(spec: str) -> list[ShardInfo]:
    if spec.endswith(".json"):
        return read_manifest(spec)[0]
    if "{" in spec:
        return [ShardInfo(url) for url in expand_urls(spec)]
    fs, path = fsspec.core.url_to_fs(spec)
    protocol = spec.split("://", 1)[0] + "://" if "://" in spec else ""

    def url_of(found: str) -> str:
        return protocol + found if protocol and not found.startswith(protocol) else found

    if any(char in spec for char in GLOB_CHARS):
        return [ShardInfo(url_of(found)) for found in sorted(fs.glob(path))]
    if fs.isdir(path):
        manifest = f"{spec.rstrip('/')}/{MANIFEST_NAME}"
        if fs.exists(f"{path.rstrip('/')}/{MANIFEST_NAME}"):
            return read_manifest(manifest)[0]
        return [ShardInfo(url_of(found)) for found in sorted(fs.glob(f"{path.rstrip('/')}/*.tar"))]
    if fs.exists(path):
        return [ShardInfo(spec)]
    raise FileNotFoundError(f"shard specification {spec!r} is neither an existing file, folder, glob nor pattern")


ShardErrorCallback = Callable[[str, Exception], None]


def read_shard(url: str, on_error: ShardErrorCallback, skip: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, in file order, after skipping the first `skip` (unread, undecoded).

    An unreadable or truncated shard calls `on_error(url, error)` once and ends the iteration.
    """
    errors: list[Exception] = []

    def keep_going(error: Exception) -> bool:
        errors.append(error)
        return False  # stop this shard: after a tar error the rest of the stream cannot be trusted

    try:
        stream = fsspec.open(url, "rb").open()
    except Exception as error:  # missing file, permission, network: report and move on
        on_error(url, error)
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=keep_going)
        for index, sample in enumerate(group_by_keys(files, handler=keep_going)):
            if index >= skip:
                yield sample
    except Exception as error:  # noqa: BLE001 - a damaged tar raises many kinds; all mean "shard ends here"
        errors.append(error)
    finally:
        stream.close()
    if errors:
        on_error(url, errors[0])
