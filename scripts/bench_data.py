"""Data preparation speed on the real IMDB archive, side by side with a plain ``re`` + ``Counter`` pass.

    python scripts/bench_data.py --archive ../shared/data/aclImdb_v1.tar.gz [--json]

Reports, for the train split: (1) the reference -- read the reviews, split each with one
regular expression, count words in a Counter; (2) minigpt's first run -- read, tokenize with
basic_english, build the vocab, write the id cache; (3) minigpt's cached start. Both (1) and
(2) read the archive with the same streaming reader, so the ratio compares the rest fairly.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import Counter

from minigpt.data.corpus import CorpusSpec, encode_splits, prepare_corpus
from minigpt.data.sources import read_imdb


def reference_pass(archive: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    docs = read_imdb(archive, ("train",))["train"]
    word = re.compile(r"\w+|[^\w\s]")
    counter: Counter = Counter()
    for d in docs:
        counter.update(word.findall(d.text.lower()))
    return time.perf_counter() - t0, len(counter)


def minigpt_train_pass(archive: str) -> tuple[float, int]:
    """The same work as the reference, the minigpt way: basic_english, vocab and the ids."""
    t0 = time.perf_counter()
    docs = read_imdb(archive, ("train",))["train"]
    vocab, _ = encode_splits({"train": [d.text for d in docs]})
    return time.perf_counter() - t0, len(vocab)


def minigpt_prepare(archive: str, cache: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    corpus = prepare_corpus(CorpusSpec(archive=archive), cache)
    return time.perf_counter() - t0, len(corpus.vocab)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", required=True, help="aclImdb_v1.tar.gz or an extracted aclImdb folder")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = p.parse_args()
    # Interleave and keep the best of two, so a busy moment on the machine hits both alike.
    ref_s, train_s = float("inf"), float("inf")
    for _ in range(2):
        s, ref_words = reference_pass(args.archive)
        ref_s = min(ref_s, s)
        s, train_vocab = minigpt_train_pass(args.archive)
        train_s = min(train_s, s)
    with tempfile.TemporaryDirectory() as cache:
        first_s, vocab = minigpt_prepare(args.archive, cache)
        cached_s, _ = minigpt_prepare(args.archive, cache)
    rows = [
        ("re + Counter, train split (reference)", ref_s, ref_words),
        ("minigpt first run, train split", train_s, train_vocab),
        ("minigpt prepare: train/val/test + checksum + cache", first_s, vocab),
        ("minigpt cached start", cached_s, vocab),
    ]
    print(f"{'pass':<52} {'seconds':>8} {'vs reference':>13} {'vocab/words':>12}")
    for name, s, n in rows:
        print(f"{name:<52} {s:8.2f} {s / ref_s:12.2f}x {n:12,}")
    result = {
        "reference_s": ref_s,
        "first_run_train_s": train_s,
        "first_vs_reference": train_s / ref_s,
        "prepare_all_s": first_s,
        "cached_s": cached_s,
    }
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
