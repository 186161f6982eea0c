"""Dataset mixtures: named shard sources with sampling weights, read from a YAML spec.

    # pretrain_14m.yaml
    sources:
      cc3m:  {shards: /data/cc3m/manifest.json, weight: 3.0}
      cc12m: {shards: "s3://bucket/cc12m/{00000..01242}.tar", weight: 12.0}
      sbu:   {shards: /data/sbu/, weight: 1.0}
      coco:  {shards: /data/coco/train/manifest.json, weight: 0.6}
      vg:    {shards: /data/vg/*.tar, weight: 0.8}

The training loader draws each sample's source with probability weight / sum(weights). A data
specification given to a command is either such a YAML file or a plain shard specification
(one source named `data`, weight 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import yaml

from data_prep.manifest import ShardInfo
from data_prep.shard_source import resolve_shards

SOURCE_KEYS = ("shards", "weight")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Source:
    name: str
    shards: list[ShardInfo]
    weight: float = 1.0

    @property
    def count(self) -> int | None:
        counts = [shard.count for shard in self.shards]
        return None if None in counts else sum(counts)


def is_mixture(spec: str) -> bool:
    return isinstance(spec, str) and spec.endswith(YAML_SUFFIXES)


def load_sources(spec: str | list[str]) -> list[Source]:
    """The sources of a mixture YAML, or one source `data` for a plain shard specification."""
    if is_mixture(spec):
        return load_mixture(spec)
    return [Source("data", resolve_shards(spec))]


def load_mixture(url: str) -> list[Source]:
    try:
        with fsspec.open(url, "r") as handle:
            payload = yaml.safe_load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"mixture spec {url} does not exist") from None
    example = "sources: {cc3m: {shards: /data/cc3m/manifest.json, weight: 3.0}}"
    if not isinstance(payload, dict) or set(payload) != {"sources"} or not isinstance(payload["sources"], dict):
        raise ValueError(f"mixture spec {url} must hold exactly one mapping 'sources', e.g. {example}")
    sources = []
    for name, entry in payload["sources"].items():
        where = f"mixture spec {url}, source {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is {entry!r}; expected a mapping with keys {SOURCE_KEYS}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; valid keys are {list(SOURCE_KEYS)}")
        if "shards" not in entry:
            raise ValueError(f"{where} has no 'shards' (a manifest, folder, glob or brace pattern)")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"{where} has weight {weight!r}; a weight is a positive number")
        sources.append(Source(str(name), resolve_shards(entry["shards"]), float(weight)))
    if not sources:
        raise ValueError(f"mixture spec {url} lists no sources; e.g. {example}")
    return sources
