"""Deterministic full-pass evaluation: loss, perplexity, bits per character, share of ``<unk>``.

Every document is cut into the same fixed windows the Trainer validates and tests on
(``DocumentWindowDataset``: ``<eot> doc <eot>``, every token scored once with the context before
it in its window), so ``evaluate`` and ``minigpt test`` report the same numbers. Any model is scored
through an ``NllFn`` (minigpt's: ``gpt_nll``; a Hugging Face model's: ``minigpt.hf``), and every special
id (``<eot>`` around documents, the pad filler, ``<unk>``) comes from the tokenizer: with GPT-2's BPE
minigpt's word-vocabulary ids 1 and 2 are ``"`` and ``#``.

Bits per character = total negative log2-likelihood / number of characters of the original
text. It does not depend on the tokenizer, so a word-level model and GPT-2's BPE compare on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from minigpt.data.documents import encode_documents
from minigpt.data.samples import DocumentWindowDataset, pad_collate
from minigpt.model import GPT
from minigpt.tokenizer import IGNORE_INDEX


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


NllFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(x, y) -> (summed NLL of the targets that are not IGNORE_INDEX, their number)."""


@torch.inference_mode()
def score_documents(
    nll_fn: NllFn,
    ids: np.ndarray,
    offsets: np.ndarray,
    characters: int,
    *,
    block_size: int,
    unk_index: int,
    eot_index: int,
    pad_index: int,
    stride: int | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Score every token of every document once with any model behind ``nll_fn``.

    Args:
        nll_fn: the model's scoring function (minigpt's or a Hugging Face model's).
        ids, offsets: documents as flat ids; document d is ids[offsets[d]:offsets[d+1]].
        characters: characters of the original text of these documents (for bits per character).
        block_size: targets per window.
        unk_index: id of <unk> (its share among targets is reported; -1 for a tokenizer without one).
        eot_index: the tokenizer's <|endoftext|>, around each document.
        pad_index: input filler of right-padded windows (their targets are IGNORE_INDEX).
        stride: window step; < block_size gives each window extra context (see DocumentWindowDataset).
        batch_size: windows per forward pass.
        device: where to run.
    """
    t0 = time.perf_counter()
    ds = DocumentWindowDataset(ids, offsets, block_size, stride, eot_id=eot_index)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=partial(pad_collate, pad_id=pad_index))
    nll, count, unk = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        s, n = nll_fn(x, y)
        nll += float(s)
        count += int(n)
        unk += int((y == unk_index).sum())
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


def score_texts(
    nll_fn: NllFn,
    tokenizer,
    texts: Sequence[str],
    *,
    block_size: int,
    stride: int | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """``score_documents`` of raw texts, encoded by ``tokenizer``, which also gives every special id."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    ids, offsets = encode_documents(tokenizer, texts)
    return score_documents(
        nll_fn, ids, offsets, sum(map(len, texts)), block_size=block_size, unk_index=tokenizer.unk_index,
        eot_index=tokenizer.eot_index, pad_index=tokenizer.pad_index, stride=stride, batch_size=batch_size,
        device=device,
    )  # fmt: skip


def gpt_nll(model: GPT) -> NllFn:
    """A minigpt model's ``NllFn``."""
    return lambda x, y: model.loss_sum_and_count(x, y, ignore_index=IGNORE_INDEX)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def evaluate_ids(
    model: GPT, ids: np.ndarray, offsets: np.ndarray, characters: int, *, unk_index: int, eot_index: int,
    pad_index: int, stride: int | None = None, batch_size: int = 32, device: torch.device | str = "cpu",
) -> EvalResult:  # fmt: skip
    """``score_documents`` with a minigpt model, on its own context length (eval mode, restored after).

    The special ids are the tokenizer's (``tokenizer.unk_index``, ``eot_index``, ``pad_index``).
    """
    with eval_mode(model):
        return score_documents(
            gpt_nll(model), ids, offsets, characters, block_size=model.config.block_size, unk_index=unk_index,
            eot_index=eot_index, pad_index=pad_index, stride=stride, batch_size=batch_size, device=device,
        )  # fmt: skip
