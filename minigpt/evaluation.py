"""Deterministic full-pass evaluation: loss, perplexity, bits per character, share of ``<unk>``.

Every document is cut into the same fixed windows the Trainer validates and tests on
(``DocumentWindowDataset``: ``<eot> doc <eot>``, every token scored once with the context before
it in its window), so ``evaluate`` and ``minigpt test`` report the same numbers.

Bits per character = total negative log2-likelihood / number of characters of the original
text. It does not depend on the tokenizer, so a word-level model and GPT-2's BPE compare on it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from minigpt.data.samples import DocumentWindowDataset, pad_collate
from minigpt.model import GPT
from minigpt.tokenizer import EOT_ID, IGNORE_INDEX


@dataclass
class EvalResult:
    documents: int
    characters: int
    tokens: int  # scored targets (every word and each document's closing <|endoftext|>)
    loss: float  # mean NLL per token, nats
    perplexity: float
    bits_per_character: float
    unk_rate: float  # share of scored targets that are <unk>
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def flatten(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (ids, offsets), the layout every dataset reads."""
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    ids = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=int(lengths.sum()))
    return ids, np.concatenate(([0], np.cumsum(lengths)))


@torch.inference_mode()
def evaluate_ids(
    model: GPT,
    ids: np.ndarray,
    offsets: np.ndarray,
    characters: int,
    *,
    unk_index: int,
    eot_index: int = EOT_ID,
    stride: int | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Score every token of every document once.

    Args:
        model: the language model (put in eval mode here).
        ids, offsets: documents as flat ids; document d is ids[offsets[d]:offsets[d+1]].
        characters: characters of the original text of these documents (for bits per character).
        unk_index: id of <unk> (its share among targets is reported; -1 for a tokenizer without one).
        eot_index: the tokenizer's <|endoftext|>, around each document.
        stride: window step; < block_size gives each window extra context (see DocumentWindowDataset).
        batch_size: windows per forward pass.
        device: where to run.
    """
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    ds = DocumentWindowDataset(ids, offsets, model.config.block_size, stride, eot_id=eot_index)
    nll, count, unk = 0.0, 0, 0
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=pad_collate):
        x, y = x.to(device), y.to(device)
        s, n = model.loss_sum_and_count(x, y, ignore_index=IGNORE_INDEX)
        nll += float(s)
        count += int(n)
        unk += int((y == unk_index).sum())
    model.train(was_training)
    loss = nll / max(count, 1)
    return EvalResult(
        documents=len(offsets) - 1,
        characters=int(characters),
        tokens=count,
        loss=loss,
        perplexity=math.exp(min(loss, 700)),
        bits_per_character=nll / math.log(2) / max(int(characters), 1),
        unk_rate=unk / max(count, 1),
        seconds=time.perf_counter() - t0,
    )
