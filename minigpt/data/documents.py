"""What a corpus is made of: its settings (`CorpusSpec`), the source they resolve to, and the
documents of each split (validation chosen by a stable hash of each text, or the official test split).

`minigpt.data.build` writes a cache entry from these documents; `minigpt.data.corpus` finds and reads
entries. Nothing here writes to disk (except fetching the official archive when asked).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minigpt.data.samples import flatten
from minigpt.data.sources import (
    IMDB_FILENAME,
    DataError,
    Document,
    check_imdb_archive,
    download_imdb,
    iter_text,
    read_bundled,
    read_imdb,
)

SOURCES = ("auto", "imdb", "bundled", "text")
VAL_SPLITS = ("train", "test")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CorpusSpec:
    """Everything that decides which token ids a run sees (the cache key is built from this)."""

    source: str = "auto"  # "auto" | "imdb" | "bundled" | "text"
    archive: str | None = None
    text_path: str | None = None
    download: bool = False
    min_freq: int = 1
    max_size: int | None = None
    include_unsup: bool | str = False  # True | False | "auto": the unsup reviews when the data is the archive
    val_fraction: float = 0.1
    tokenizer: str | None = None  # None: basic_english + a vocab built here; "bpe:N": train one; else pretrained
    val_split: str = "train"  # "train": a hashed val_fraction of it; "test": the official test split


def _hash_in_validation(digest: bytes, val_fraction: float) -> bool:
    return int.from_bytes(digest[:4], "big") % 10_000 < round(val_fraction * 10_000)


def in_validation(text: str, val_fraction: float) -> bool:
    """The fixed validation slice: a review belongs to it by a stable hash of its text.

    The hash (not the position) decides, so the bundled reviews and the official train split,
    which hold the same texts in different orders, get the same validation reviews.
    """
    return _hash_in_validation(hashlib.sha1(text.encode("utf-8")).digest(), val_fraction)


def resolve_source(spec: CorpusSpec, cache_dir: Path) -> tuple[str, Path | None]:
    """Which source a run uses: ("imdb", archive) | ("bundled", None) | ("text", path)."""
    if spec.source not in SOURCES:
        raise DataError(f"unknown data source {spec.source!r}; choose from {', '.join(SOURCES)}")
    if spec.val_split not in VAL_SPLITS:
        raise DataError(f"unknown val_split {spec.val_split!r}; choose from {', '.join(VAL_SPLITS)}")
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


def bpe_training_size(tokenizer: str | None) -> int | None:
    if not tokenizer or not tokenizer.startswith("bpe:"):
        return None
    from minigpt.bpe import trained_bpe_size

    return trained_bpe_size(tokenizer)


def _source_documents(spec: CorpusSpec, kind: str, path: Path | None) -> Iterator[tuple[str, Document]]:
    """(role, document): "labelled" (train or val), "extra" (unsup: train only) or "test"."""
    if kind == "imdb":
        assert path is not None
        raw = read_imdb(path, ("train", "test", "unsup") if spec.include_unsup else ("train", "test"))
        check_imdb_archive(path)  # after reading: a corrupt copy is one error line, with no notice before it
        yield from (("labelled", d) for d in raw.pop("train"))
        yield from (("extra", d) for d in raw.pop("unsup", []))
        yield from (("test", d) for d in raw.pop("test"))
    else:
        yield from (("labelled", d) for d in (read_bundled() if kind == "bundled" else iter_text(path)))


def iter_splits(spec: CorpusSpec, kind: str, path: Path | None) -> Iterator[tuple[str, Document, bytes]]:
    """Every document in source order with its split ("train" | "val" | "test") and its text's SHA-1.

    With ``val_split="train"`` validation is the labelled reviews whose hash falls in
    ``val_fraction`` (the same text always lands in the same split); unsup reviews only train,
    unless their text is a validation text. With ``val_split="test"`` (official archive: the
    tutorial's split) all train reviews train and the test reviews are both val and test.
    """
    by_test = spec.val_split == "test"
    val_digests: set[bytes] = set()
    for role, doc in _source_documents(spec, kind, path):
        digest = hashlib.sha1(doc.text.encode("utf-8")).digest()
        if role == "test":
            if by_test:
                yield "val", doc, digest
            yield "test", doc, digest
        elif not by_test and role == "labelled" and _hash_in_validation(digest, spec.val_fraction):
            if spec.include_unsup:
                val_digests.add(digest)
            yield "val", doc, digest
        elif role == "labelled" or digest not in val_digests:
            yield "train", doc, digest


def read_splits(spec: CorpusSpec, kind: str, path: Path | None) -> dict[str, list[Document]]:
    """Source documents -> {"train": ..., "val": ..., ["test": ...]} as lists, in cache order."""
    splits: dict[str, list] = {}
    for split, doc, digest in iter_splits(spec, kind, path):
        splits.setdefault(split, []).append((digest, doc) if split == "val" and spec.val_split == "train" else doc)
    if spec.val_split == "train" and "val" in splits:
        # Hash order mixes labels, so a run that validates on the first N batches sees both.
        splits["val"] = [doc for _, doc in sorted(splits["val"], key=lambda kv: kv[0])]
    check_splits({name: len(splits.get(name, ())) for name in SPLITS if name != "test" or name in splits})
    return {name: splits[name] for name in SPLITS if name in splits}


def check_splits(documents: dict[str, int]) -> None:
    for name, n in documents.items():
        if not n:
            raise DataError(f"the {name} split is empty; use more text or a different --data.val_fraction")


def encode_documents(tokenizer, texts: list[str], dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids, offsets) with any minigpt tokenizer (batched when it can: BPE)."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    return flatten(encode_batch(texts) if encode_batch is not None else [tokenizer.encode(t) for t in texts], dtype)
