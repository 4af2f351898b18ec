"""How documents become fixed-length token sequences, the one rule the corpus and the toy's training
data share (method.md §2): the first `seq_len` tokens of each document at least that long."""

from __future__ import annotations

import numpy as np


def pack(tokenizer, docs: list[str], seq_len: int) -> np.ndarray:
    """(n, seq_len) int32: the first `seq_len` tokens of each document with at least that many, in
    order (no special tokens; truncating while encoding gives the same ids as encoding in full)."""
    if not docs:
        return np.zeros((0, seq_len), np.int32)
    ids = tokenizer(docs, add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
    rows = [x for x in ids if len(x) == seq_len]
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), seq_len)
