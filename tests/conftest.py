"""Shared fixtures: tiny synthetic IMDB archives and corpora written under tmp_path."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

# The path of the official aclImdb_v1.tar.gz (.ci/run sets it); tests that need the real archive skip without it.
IMDB_ARCHIVE_ENV = "MINIGPT_TEST_IMDB_ARCHIVE"

WORDS = "the movie was great bad plot actor film really good story not very boring fun".split()


def review(i: int, n_words: int) -> str:
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n_words)]
    return " ".join(words).capitalize() + ". It's <br /><br />" + WORDS[i % len(WORDS)] + "!"


def tiny_reviews(n_per_label: int = 6) -> dict[str, str]:
    """member name -> text, in the official aclImdb layout."""
    files = {}
    for split in ("train", "test"):
        for label, ratings in (("pos", (7, 8, 9, 10)), ("neg", (1, 2, 3, 4))):
            for i in range(n_per_label):
                text = review(i + (100 if split == "test" else 0) + (50 if label == "neg" else 0), 5 + 4 * i)
                files[f"aclImdb/{split}/{label}/{i}_{ratings[i % 4]}.txt"] = text
    for i in range(n_per_label):
        files[f"aclImdb/train/unsup/{i}_0.txt"] = review(200 + i, 8 + i)
    files["aclImdb/README"] = "tiny synthetic copy"
    return files


def write_tar(path: Path, files: dict[str, str | bytes], extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode() if isinstance(text, str) else text
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Tests never touch the user's ~/.cache/minigpt: HOME and the cache are temporary for the whole
    session, set before any module-scoped fixture runs; at the end nothing may be under HOME's cache."""
    home, cache = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("session_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setenv("MINIGPT_CACHE", str(cache))
        yield home, cache
    assert not (home / ".cache" / "minigpt").exists(), "a test wrote into ~/.cache/minigpt"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Each test its own data cache (a test that builds one must not see another test's).
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models: extra threads only add synchronisation, and on a busy
    2-core machine oversubscribed threads made such a module several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_archive(tmp_path) -> Path:
    return write_tar(tmp_path / "aclImdb_v1.tar.gz", tiny_reviews())


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    for name, text in tiny_reviews().items():
        p = tmp_path / "extracted" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path / "extracted" / "aclImdb"


def write_corpus(path: Path, n: int = 60) -> Path:
    """n short reviews as plain text, documents separated by blank lines."""
    path.write_text("\n\n".join(review(i, 12 + (i % 5) * 4) for i in range(n)))
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The plain-text corpus the command-line tests train on (60 short reviews, seconds to fit)."""
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def real_archive() -> Path:
    path = os.environ.get(IMDB_ARCHIVE_ENV)
    if not path or not Path(path).is_file():
        pytest.skip(f"real IMDB archive not available: set {IMDB_ARCHIVE_ENV} to aclImdb_v1.tar.gz (.ci/run does)")
    return Path(path)
