"""Fitting a model config to a tokenizer: vocabulary size and the ids of the special tokens."""

from __future__ import annotations

import dataclasses

from pretrain.config.schema import Config


def with_tokenizer(config: Config, tokenizer) -> Config:
    """A copy of `config` whose text vocabulary and special ids are the tokenizer's."""
    ids = {
        "pad_id": tokenizer.pad_token_id,
        "cls_id": tokenizer.cls_token_id,
        "sep_id": tokenizer.sep_token_id,
        "mask_id": tokenizer.mask_token_id,
    }
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(
            f"the tokenizer has no {', '.join(missing)}; a BERT WordPiece tokenizer with [PAD], [CLS], "
            "[SEP] and [MASK] is required (train one with data_prep.tokenizer.train_wordpiece)"
        )
    text = dataclasses.replace(config.model.text, vocab_size=len(tokenizer), **ids)
    model = dataclasses.replace(config.model, text=text)
    return dataclasses.replace(config, model=model)
