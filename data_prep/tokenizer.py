"""An uncased WordPiece vocabulary trained from captions, saved so `BertTokenizerFast` loads it.

This is how a machine with no model hub gets a tokenizer: train it from the captions it has,
read from its shards (`shard_captions`) or from text files.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import BertTokenizerFast

from data_prep.shard_source import read_shard, resolve_shards

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 in this order


def train_wordpiece(texts: Iterable[str], output_dir: str | Path, vocab_size: int = 30522) -> BertTokenizerFast:
    """Train an uncased WordPiece vocabulary of at most `vocab_size` entries and save it to `output_dir`."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=True)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(output)
    return fast


def shard_captions(spec: str | list[str], limit: int | None = None) -> Iterator[str]:
    """The captions (`KEY.txt`) of every shard a specification names; damaged shards are logged and skipped."""
    log = logging.getLogger("mplug.data")

    def skip(url: str, error: Exception) -> None:
        log.warning("shard %s unreadable or truncated, its remaining captions skipped: %s", url, error)

    captions = (
        sample["txt"].decode("utf-8").strip()
        for shard in resolve_shards(spec)
        for sample in read_shard(shard.url, skip)
        if "txt" in sample
    )
    yield from itertools.islice((c for c in captions if c), limit)
