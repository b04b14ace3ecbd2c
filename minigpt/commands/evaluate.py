"""``minigpt evaluate``: score a checkpoint on a split of its data or on a text file.

Imports torch and minigpt's pure layers only (the data cache is read without the Lightning data
module): no Lightning, no transformers.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from minigpt.allocator import keep_freed_memory
from minigpt.checkpoint import data_settings, model_from_checkpoint, read_checkpoint
from minigpt.commands._common import Output
from minigpt.data.corpus import Corpus, prepare_corpus
from minigpt.data.documents import CorpusSpec, encode_documents
from minigpt.data.sources import DataError, default_cache_dir, read_text_documents
from minigpt.errors import UserError
from minigpt.evaluation import evaluate_ids

_ARCHIVE_HINT = "pass --archive PATH/aclImdb_v1.tar.gz"


def evaluate(
    ckpt_path: str,
    split: str | None = None,
    text_file: str | None = None,
    archive: str | None = None,
    max_docs: int | None = None,
    stride: int | None = None,
    batch_size: int = 32,
    json: bool = False,
) -> None:
    """Score a checkpoint: loss, perplexity, bits per character, share of ``<unk>``.

    Args:
        ckpt_path: a minigpt checkpoint.
        split: test | val | train | unsup of the checkpoint's data (default: test when the data has
            it, i.e. the official archive, else val).
        text_file: score this instead: plain text (documents separated by blank lines) or JSONL.
        archive: aclImdb_v1.tar.gz to read the split from (else the run's data).
        max_docs: only N documents, spread evenly over the split or file.
        stride: window step (< block_size: more context per scored token).
        batch_size: windows per forward pass.
        json: print the result as one JSON object on stdout (the rest goes to stderr).
    """
    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max_docs must be >= 1, got {max_docs}")
    out = Output(json)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = read_checkpoint(ckpt_path, map_location=device)
    model, tokenizer = model_from_checkpoint(ckpt, ckpt_path)
    if text_file:
        docs, what = text_file_documents(text_file), text_file
        texts = [docs[i] for i in spread(len(docs), max_docs)]
        ids, offsets = encode_documents(tokenizer, texts)
        chars = sum(map(len, texts))
    else:
        ids, offsets, chars, what = _split_documents(ckpt, tokenizer, split, archive, max_docs, out)
    keep_freed_memory()  # the data is in memory; each batch allocates what the last one freed
    result = evaluate_ids(
        model, ids, offsets, chars, unk_index=tokenizer.unk_index, eot_index=tokenizer.eot_index, stride=stride,
        pad_index=tokenizer.pad_index, batch_size=batch_size, device=device,
    )  # fmt: skip
    r = result.to_dict()
    out.say(
        f"data        {what}: {r['documents']:,} documents, {r['characters']:,} characters",
        f"tokens      {r['tokens']:,} scored ({r['unk_rate']:.2%} <unk>)",
        f"loss        {r['loss']:.4f} nats/token   perplexity {r['perplexity']:.2f}",
        f"bits/char   {r['bits_per_character']:.4f}   ({r['seconds']:.1f} s)",
    )
    out.result({"data": what, **r})


def text_file_documents(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--text_file {path} does not exist")
    docs = read_text_documents(p)
    if not docs:
        raise UserError(f"--text_file {path} is empty (no text to score)")
    return docs


def corpus_spec(ckpt: dict, archive: str | None) -> tuple[CorpusSpec, Path]:
    """The corpus a checkpoint was trained on (optionally read from another archive), and its cache folder."""
    data = data_settings(ckpt)
    known = {f.name for f in dataclasses.fields(CorpusSpec)}
    kwargs = {k: v for k, v in data.items() if k in known}
    if archive:
        kwargs.update(source="imdb", archive=archive)
    if kwargs.get("include_unsup") == "auto":
        # as the run resolved it: a run on the bundled reviews scored on the archive keeps its vocabulary
        kwargs["include_unsup"] = bool(data.get("resolved_include_unsup"))
    cache = Path(data["cache_dir"]).expanduser() if data.get("cache_dir") else default_cache_dir()
    return CorpusSpec(**kwargs), cache


def load_corpus(ckpt: dict, archive: str | None) -> Corpus:
    spec, cache = corpus_spec(ckpt, archive)
    try:
        return prepare_corpus(spec, cache)
    except DataError as err:  # its hints name fit's options; this command's is --archive
        raise UserError(str(err).replace("--data.archive", "--archive")) from err


def _split_documents(ckpt: dict, tokenizer, split: str | None, archive: str | None, max_docs: int | None, out):
    """The run's own data split, from the token cache (same windows as `minigpt test`)."""
    if split == "unsup":
        from minigpt.data.sources import read_imdb

        spec, _ = corpus_spec(ckpt, archive)
        if not spec.archive:
            raise UserError(f"--split unsup needs the official archive: {_ARCHIVE_HINT}")
        docs = read_imdb(spec.archive, ("unsup",))["unsup"]
        texts = [docs[i].text for i in spread(len(docs), max_docs)]
        ids, offsets = encode_documents(tokenizer, texts)
        return ids, offsets, sum(map(len, texts)), f"{spec.archive} unsup"
    corpus = load_corpus(ckpt, archive)
    if split is None:
        split = "test" if "test" in corpus.splits else "val"
        why = "" if split == "test" else f" (the {corpus.source} data has no test split; for it {_ARCHIVE_HINT})"
        print(f"evaluating the {split} split{why}; choose one with --split", file=sys.stderr)
    if split not in corpus.splits:
        hint = f"; for test {_ARCHIVE_HINT}" if split == "test" else ""
        raise UserError(f"the {corpus.source} data has no {split!r} split (it has {', '.join(corpus.splits)}){hint}")
    if corpus.vocab.itos != tokenizer.itos:
        raise UserError(
            "the checkpoint's vocabulary differs from this data's; evaluate with the data it was trained on"
        )
    s = corpus.splits[split]
    ids, offsets, chars = np.asarray(s["ids"]), np.asarray(s["offsets"]), np.asarray(s["chars"])
    if max_docs is not None and max_docs < corpus.documents(split):
        keep = spread(corpus.documents(split), max_docs)
        lengths = offsets[keep + 1] - offsets[keep]
        ids = np.concatenate([ids[offsets[d] : offsets[d + 1]] for d in keep])
        offsets, chars = np.concatenate(([0], np.cumsum(lengths))), chars[keep]
    return ids, offsets, int(chars.sum()), f"{corpus.source} {split}"


def spread(total: int, n: int | None) -> np.ndarray:
    """n document indices spread evenly over 0..total-1 (all of them when n is None or >= total).

    Splits are stored sorted by label, so the first n would all be negative reviews."""
    if n is None or n >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))
