"""`mplug data tokenizer`: a WordPiece vocabulary from the captions of shards, loadable offline."""

from __future__ import annotations

from transformers import BertTokenizerFast

from cluster.cli import main
from data_prep.shard_writer import Sample, ShardWriter
from data_prep.tokenizer import shard_captions

CAPTIONS = ["A Zebra grazing near the River", "two zebras drinking from a river", "a lone heron by the water"]


def write_caption_shards(folder) -> None:
    with ShardWriter(str(folder), shard_size=2) as writer:
        for index, caption in enumerate(CAPTIONS * 4):
            writer.write(Sample(f"k{index}", b"\xff\xd8 not decoded here", text=caption))


def test_shard_captions_reads_every_caption_in_shard_order(tmp_path):
    write_caption_shards(tmp_path)
    assert list(shard_captions(f"{tmp_path}/*.tar")) == CAPTIONS * 4
    assert list(shard_captions(str(tmp_path), limit=4)) == (CAPTIONS * 2)[:4]


def test_the_tokenizer_command_trains_an_uncased_vocabulary_from_shards(tmp_path):
    write_caption_shards(tmp_path / "shards")
    assert main(["data", "tokenizer", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "tok"),
                 "--vocab-size", "120"]) == 0
    tokenizer = BertTokenizerFast.from_pretrained(tmp_path / "tok")
    ids = tokenizer("ZEBRA near the river")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zebra near the river"
    assert [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id] == [0, 2, 3, 4]
