"""The shard loader: exact epochs, endless resampling, damage skipped and counted, resume, mixtures."""

from __future__ import annotations

import collections
import io
import itertools

import pytest
from PIL import Image

from data_prep.loader import LoaderConfig, ShardLoader
from data_prep.manifest import ShardInfo, write_manifest
from data_prep.mixture import load_mixture, load_sources
from data_prep.shard_source import resolve_shards
from data_prep.shard_writer import Sample, ShardWriter

UNEVEN = (1, 3, 9, 17, 2, 20, 5, 4)  # samples per shard


def tiny_jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (value % 256, 40, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shards(folder, sizes, prefix="s", manifest=True) -> list[str]:
    """Shards of the given sizes; sample keys are PREFIX-SHARD-INDEX, captions 'caption KEY'."""
    urls = []
    for shard, size in enumerate(sizes):
        with ShardWriter(str(folder), shard_size=max(size, 1), prefix=f"{prefix}{shard}-") as writer:
            for index in range(size):
                key = f"{prefix}{shard}-{index}"
                writer.write(Sample(key, tiny_jpeg(index), text=f"caption {key}", meta={"image_id": shard * 100 + index}))
        urls += writer.shards
    if manifest:
        write_manifest(str(folder), [ShardInfo(url, size) for url, size in zip(urls, sizes, strict=True)])
    return urls


def config(**changes) -> LoaderConfig:
    base = dict(batch_size=4, image_size=16, mode="epoch", augment="eval", workers=2, shuffle_buffer=8)
    return LoaderConfig(**{**base, **changes})


def epoch_keys(data, cfg, world_size=2) -> tuple[collections.Counter, list[ShardLoader]]:
    seen, loaders = collections.Counter(), []
    for rank in range(world_size):
        loader = ShardLoader(data, cfg, rank=rank, world_size=world_size)
        for batch in loader:
            seen.update(batch["keys"])
        loaders.append(loader)
    return seen, loaders


def test_epoch_mode_sees_every_sample_exactly_once_over_2_ranks_and_2_workers(tmp_path):
    write_shards(tmp_path, UNEVEN)
    seen, _ = epoch_keys(str(tmp_path), config())
    assert sum(seen.values()) == sum(UNEVEN)
    assert set(seen.values()) == {1}


def test_epoch_mode_with_fewer_shards_than_readers_deals_samples(tmp_path):
    write_shards(tmp_path, (11, 2))  # 2 shards for 4 readers
    seen, loaders = epoch_keys(str(tmp_path), config())
    assert sum(seen.values()) == 13 and set(seen.values()) == {1}
    assert all(loader.stats["samples"] > 0 for loader in loaders)


def test_resampled_mode_feeds_every_rank_for_a_fixed_number_of_steps(tmp_path):
    write_shards(tmp_path, (1, 2, 30))
    for rank in range(2):
        loader = ShardLoader(str(tmp_path), config(mode="resampled"), rank=rank, world_size=2)
        batches = list(itertools.islice(loader, 25))
        assert len(batches) == 25
        assert all(batch["images"].shape == (4, 3, 16, 16) for batch in batches)


def test_resampled_draws_shards_in_proportion_to_their_sample_counts(tmp_path):
    write_shards(tmp_path, (1, 3))
    loader = ShardLoader(str(tmp_path), config(mode="resampled", workers=0, shuffle_buffer=0), rank=0, world_size=1)
    keys = [key for batch in itertools.islice(loader, 200) for key in batch["keys"]]
    per_sample = collections.Counter(keys)
    assert set(per_sample) == {"s0-0", "s1-0", "s1-1", "s1-2"}
    assert min(per_sample.values()) / max(per_sample.values()) > 0.7  # every sample about equally often


def test_a_truncated_shard_is_skipped_and_counted_and_its_intact_samples_kept(tmp_path):
    urls = write_shards(tmp_path, (6, 6, 6, 6))
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[: len(data) // 2])
    seen, loaders = epoch_keys(str(tmp_path), config())
    assert sum(loader.stats["bad_shards"] for loader in loaders) == 1
    assert {k for k in seen if not k.startswith("s1-")} == {f"s{s}-{i}" for s in (0, 2, 3) for i in range(6)}
    assert 0 < sum(1 for k in seen if k.startswith("s1-")) < 6


def test_a_corrupt_image_is_skipped_and_counted(tmp_path):
    with ShardWriter(str(tmp_path), shard_size=10) as writer:
        for index in range(5):
            media = b"not a jpeg at all" if index == 2 else tiny_jpeg(index)
            writer.write(Sample(f"k{index}", media, text="caption"))
    seen, loaders = epoch_keys(str(tmp_path), config(workers=0), world_size=1)
    assert sorted(seen) == ["k0", "k1", "k3", "k4"]
    assert loaders[0].stats == {"samples": 4, "corrupt_samples": 1, "bad_shards": 0}


def test_resume_without_shuffle_continues_with_exactly_the_next_batches(tmp_path):
    write_shards(tmp_path, UNEVEN)
    cfg = config(mode="resampled", shuffle_buffer=0)
    straight = [batch["keys"] for batch in itertools.islice(ShardLoader(str(tmp_path), cfg, rank=1, world_size=2), 20)]
    first = ShardLoader(str(tmp_path), cfg, rank=1, world_size=2)
    head = [batch["keys"] for batch in itertools.islice(first, 10)]
    resumed = ShardLoader(str(tmp_path), cfg, rank=1, world_size=2, state=first.state_dict())
    tail = [batch["keys"] for batch in itertools.islice(resumed, 10)]
    assert head + tail == straight


def test_resume_in_an_epoch_repeats_nothing_and_skips_at_most_the_shuffle_buffers(tmp_path):
    write_shards(tmp_path, UNEVEN)
    cfg = config(workers=2, shuffle_buffer=3)
    first = ShardLoader(str(tmp_path), cfg, rank=0, world_size=1)
    before = [key for batch in itertools.islice(first, 4) for key in batch["keys"]]
    after = [key for batch in ShardLoader(str(tmp_path), cfg, rank=0, world_size=1, state=first.state_dict())
             for key in batch["keys"]]
    assert not set(before) & set(after)
    assert len(set(before + after)) == len(before) + len(after)
    assert sum(UNEVEN) - 2 * cfg.shuffle_buffer <= len(before) + len(after) <= sum(UNEVEN)


def test_a_state_from_another_layout_starts_afresh(tmp_path, caplog):
    write_shards(tmp_path, UNEVEN)
    first = ShardLoader(str(tmp_path), config(mode="resampled"), rank=0, world_size=2)
    next(iter(first))
    resumed = ShardLoader(str(tmp_path), config(mode="resampled", workers=1), rank=0, world_size=2,
                          state=first.state_dict())
    assert resumed.positions == {}
    assert "positions do not carry over" in caplog.text


def test_a_mixture_samples_its_sources_in_proportion_to_their_weights(tmp_path):
    write_shards(tmp_path / "a", (10, 10), prefix="a")
    write_shards(tmp_path / "b", (10,), prefix="b")
    spec = tmp_path / "mix.yaml"
    spec.write_text(f"sources:\n  a: {{shards: {tmp_path / 'a'}, weight: 3}}\n  b: {{shards: '{tmp_path}/b/*.tar'}}\n")
    loader = ShardLoader(str(spec), config(mode="resampled", workers=2, batch_size=8), rank=0, world_size=1)
    keys = [key for batch in itertools.islice(loader, 250) for key in batch["keys"]]
    share_a = sum(key.startswith("a") for key in keys) / len(keys)
    assert abs(share_a - 0.75) < 0.04


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sources:\n  a: {shards: X, weigth: 2}\n", "unknown key(s) ['weigth']; valid keys are ['shards', 'weight']"),
        ("sources:\n  a: {shards: X, weight: -1}\n", "weight -1; a weight is a positive number"),
        ("sources:\n  a: {weight: 1}\n", "has no 'shards'"),
        ("datasets: {}\n", "must hold exactly one mapping 'sources'"),
    ],
)
def test_a_malformed_mixture_spec_names_the_problem(tmp_path, body, message):
    spec = tmp_path / "mix.yaml"
    spec.write_text(body.replace("X", str(tmp_path)))
    with pytest.raises(ValueError) as error:
        load_mixture(str(spec))
    assert message in str(error.value)


def test_shards_resolve_from_manifest_folder_glob_and_brace_pattern(tmp_path):
    urls = write_shards(tmp_path, (2, 3, 4))
    by_manifest = resolve_shards(str(tmp_path / "manifest.json"))
    assert [s.url for s in by_manifest] == urls and [s.count for s in by_manifest] == [2, 3, 4]
    assert resolve_shards(str(tmp_path)) == by_manifest  # a folder with a manifest uses it
    assert [s.url for s in resolve_shards(f"{tmp_path}/s*.tar")] == urls
    assert [s.url for s in resolve_shards(f"{tmp_path}/s{{0..2}}-00000.tar")] == urls
    assert [s.url for s in resolve_shards(f"file://{tmp_path}/s*.tar")] == [f"file://{u}" for u in urls]
    assert load_sources(str(tmp_path))[0].count == 9


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards found"):
        resolve_shards(f"{tmp_path}/*.tar")
    with pytest.raises(FileNotFoundError, match="neither an existing file, folder, glob nor pattern"):
        resolve_shards(str(tmp_path / "nowhere"))


def test_batches_carry_uint8_images_token_ids_and_image_ids(tmp_path, tokenizer):
    write_shards(tmp_path, (5,))
    loader = ShardLoader(str(tmp_path), config(workers=0, batch_size=5), tokenizer=tokenizer, rank=0, world_size=1)
    (batch,) = list(loader)
    assert batch["images"].dtype.is_floating_point is False and batch["images"].shape == (5, 3, 16, 16)
    assert batch["input_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 5
    assert sorted(batch["image_ids"].tolist()) == [0, 1, 2, 3, 4]
