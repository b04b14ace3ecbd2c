import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_reviews, write_tar
from torchdata.stateful_dataloader import StatefulDataLoader

from minigpt.data.corpus import Corpus, prepare_corpus
from minigpt.data.datamodule import IMDBDataModule
from minigpt.data.documents import CorpusSpec, in_validation
from minigpt.data.samples import (
    DocumentWindowDataset,
    EpochSampler,
    PackedDataset,
    RandomWindowDataset,
    pad_collate,
)
from minigpt.data.sources import DataError, read_bundled, read_imdb, read_text
from minigpt.tokenizer import EOT_ID, IGNORE_INDEX, PAD_ID, Vocab


def flat(docs):
    ids = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
    offsets = np.concatenate(([0], np.cumsum([len(d) for d in docs])))
    return ids, offsets


# -- samples ----------------------------------------------------------------------------------------
def test_random_window_shift_by_one():
    doc = list(range(10, 60))
    ds = RandomWindowDataset(*flat([doc]), block_size=8, seed=1)
    starts = set()
    for v in range(200):  # virtual indices: every visit draws a window
        x, y = ds[v]
        assert len(x) == len(y) == 8
        assert torch.equal(x[1:], y[:-1])
        start = int(x[0]) - 10
        assert torch.equal(x, torch.arange(10 + start, 18 + start))
        assert torch.equal(y, torch.arange(11 + start, 19 + start))
        starts.add(start)
    assert starts == set(range(0, 50 - 8))  # uniform over every start that has a full target
    assert torch.equal(ds[5][0], ds[5][0])  # a pure function of the index


def test_short_review_target_ends_with_endoftext():
    ds = RandomWindowDataset(*flat([[5, 6, 7], list(range(3, 12))]), block_size=9)
    x, y = ds[0]
    assert x.tolist() == [5, 6, 7] and y.tolist() == [6, 7, EOT_ID]
    x, y = ds[1]  # exactly block_size long: still the whole review
    assert x.tolist() == list(range(3, 12)) and y.tolist() == list(range(4, 12)) + [EOT_ID]


def test_packed_covers_every_token_once():
    docs = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13]]
    ds = PackedDataset(*flat(docs), block_size=4)
    stream = [3, 4, 5, EOT_ID, 6, 7, EOT_ID, 8, 9, 10, 11, 12, EOT_ID, 13, EOT_ID]
    assert ds.stream.tolist() == stream
    targets, inputs = [], []
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.equal(x[1:], y[:-1])
        inputs += x.tolist()
        targets += y.tolist()
    assert len(ds) == (len(stream) - 1) // 4
    assert targets == stream[1 : 1 + 4 * len(ds)] and inputs == stream[: 4 * len(ds)]


@pytest.mark.parametrize("stride", [None, 2, 1])
def test_document_windows_score_every_token_once(stride):
    docs = [[3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14]]
    ds = DocumentWindowDataset(*flat(docs), block_size=4, stride=stride)
    per_doc: dict[int, list[int]] = {}
    for i in range(len(ds)):
        d = int(ds.windows[i][0])
        x, y = ds[i]
        s = [EOT_ID] + docs[d] + [EOT_ID]
        start = int(ds.windows[i][1])
        assert x.tolist() == s[start : start + 4]  # context is always the real preceding tokens
        per_doc.setdefault(d, []).extend(t for t in y.tolist() if t != IGNORE_INDEX)
    for d, doc in enumerate(docs):
        assert per_doc[d] == doc + [EOT_ID]
    assert [len(DocumentWindowDataset(*flat(docs), 4)[i][0]) for i in range(2)] == [4, 4]


def test_pad_collate():
    x, y = pad_collate([(torch.tensor([3, 4, 5]), torch.tensor([4, 5, 6])), (torch.tensor([7]), torch.tensor([2]))])
    assert x.dtype == torch.long and x.shape == (2, 3)
    assert x.tolist() == [[3, 4, 5], [7, PAD_ID, PAD_ID]]
    assert y.tolist() == [[4, 5, 6], [2, IGNORE_INDEX, IGNORE_INDEX]]  # targets: skipped by position


def test_epoch_sampler_is_deterministic_and_changes_per_epoch():
    s = EpochSampler(10, seed=3)
    e0 = list(s)
    e1 = list(s)  # a finished epoch moves on
    assert sorted(e0) == list(range(10)) and sorted(e1) == list(range(10, 20))
    t = EpochSampler(10, seed=3)
    t.set_epoch(1)
    assert list(t) == e1
    assert [v % 10 for v in e0] != [v % 10 for v in e1]


def test_stateful_dataloader_resumes_at_the_same_batch():
    ds = RandomWindowDataset(*flat([list(range(3, 3 + 20 + i)) for i in range(40)]), block_size=5, seed=0)

    def loader():
        return StatefulDataLoader(ds, batch_size=4, sampler=EpochSampler(len(ds), seed=7), collate_fn=pad_collate)

    ref = [x for x, _ in loader()]
    dl = loader()
    it = iter(dl)
    for _ in range(3):
        next(it)
    state = dl.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(rest) == len(ref) - 3
    for a, b in zip(rest, ref[3:]):
        assert torch.equal(a, b)


# -- sources ----------------------------------------------------------------------------------------
def test_read_tiny_archive_and_folder_agree(tiny_archive, tiny_folder):
    a = read_imdb(tiny_archive, ("train", "test", "unsup"))
    b = read_imdb(tiny_folder, ("train", "test", "unsup"))
    assert {k: len(v) for k, v in a.items()} == {"train": 12, "test": 12, "unsup": 6}
    assert a == b
    d = a["train"][0]
    assert (d.label, d.split, d.id, d.rating) == ("neg", "train", "neg/0", 1)
    assert all(r.rating == 0 and r.label == "unsup" for r in a["unsup"])


def test_not_gzip_truncated_empty_and_wrong_layout(tmp_path, tiny_archive):
    (tmp_path / "plain.tar.gz").write_text("this is not gzip")
    with pytest.raises(DataError, match="plain.tar.gz.*corrupt"):
        read_imdb(tmp_path / "plain.tar.gz")
    data = tiny_archive.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.tar.gz.*truncated"):
        read_imdb(tmp_path / "cut.tar.gz")
    (tmp_path / "empty.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="empty.tar.gz"):
        read_imdb(tmp_path / "empty.tar.gz")
    other = write_tar(tmp_path / "other.tar.gz", {"photos/cat.txt": "meow"})
    with pytest.raises(DataError, match="other.tar.gz has no aclImdb/train/ reviews"):
        read_imdb(other)
    with pytest.raises(DataError, match="does not exist"):
        read_imdb(tmp_path / "missing.tar.gz")


def test_hostile_member_paths_are_never_written(tmp_path, monkeypatch):
    files = tiny_reviews()
    files["aclImdb/train/pos/../../../escaped_1.txt"] = "escape"
    files["/tmp/absolute_9.txt"] = "absolute"
    files["../aclImdb/train/pos/99_9.txt"] = "outside"
    archive = write_tar(tmp_path / "evil.tar.gz", files)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = {p for p in tmp_path.parent.rglob("*")}
    docs = read_imdb(archive, ("train",))
    assert all(d.text not in ("escape", "absolute", "outside") for d in docs["train"])
    assert len(docs["train"]) == 12
    assert {p for p in tmp_path.parent.rglob("*")} == before  # nothing written anywhere
    assert not list(work.iterdir())


def test_bundled_corpus_has_25000_reviews():
    docs = read_bundled()
    assert len(docs) == 25_000
    assert sum(d.label == "pos" for d in docs) == 12_500


def test_text_source_replaces_and_counts_bad_utf8(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"good text\n\nbad \xff\xfe bytes here\n")
    (tmp_path / "b.jsonl").write_text('{"text": "from json"}\n\n{"text": "another"}\n')
    with caplog.at_level(logging.WARNING):
        docs = read_text(tmp_path)
    assert [d.text for d in docs] == ["good text", "bad \ufffd\ufffd bytes here", "from json", "another"]
    assert "replaced 2 invalid UTF-8 byte(s)" in caplog.text


def test_empty_text_corpus_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n \t\n")
    with pytest.raises(DataError, match="empty"):
        read_text(tmp_path / "blank.txt")
    with pytest.raises(DataError, match="no text files"):
        read_text(tmp_path / "nothing-*.txt")


# -- cache ------------------------------------------------------------------------------------------
def test_cache_hit_and_invalidation(tiny_archive, tmp_path):
    cache = tmp_path / "c"
    spec = CorpusSpec(archive=str(tiny_archive), val_fraction=0.25)
    a = prepare_corpus(spec, cache)
    stamp = (a.path / "meta.json").stat().st_mtime_ns
    b = prepare_corpus(spec, cache)
    assert b.path == a.path and (b.path / "meta.json").stat().st_mtime_ns == stamp  # re-used, not rebuilt
    assert prepare_corpus(CorpusSpec(archive=str(tiny_archive), val_fraction=0.25, min_freq=2), cache).path != a.path
    assert prepare_corpus(CorpusSpec(archive=str(tiny_archive), val_fraction=0.5), cache).path != a.path
    # a changed file (same path) is a different input
    files = tiny_reviews()
    files["aclImdb/train/pos/0_7.txt"] = "completely new words here"
    write_tar(tiny_archive, files)
    c = prepare_corpus(spec, cache)
    assert c.path != a.path and "completely" in c.vocab
    assert "completely" not in Corpus(a.path).vocab


def test_corpus_splits_vocab_from_train_only(tiny_archive, tmp_path):
    c = prepare_corpus(CorpusSpec(archive=str(tiny_archive), val_fraction=0.25), tmp_path / "c")
    assert set(c.splits) == {"train", "val", "test"}
    assert c.documents("train") + c.documents("val") == 12 and c.documents("test") == 12
    raw = read_imdb(tiny_archive)
    train_texts = [d.text for d in raw["train"] if not in_validation(d.text, 0.25)]
    assert 0 < len(train_texts) < 12
    assert c.vocab.itos == Vocab.build(train_texts).itos  # neither val nor test words
    # ids decode back to the tokenized text
    doc0 = c.splits["test"]["ids"][c.splits["test"]["offsets"][0] : c.splits["test"]["offsets"][1]]
    assert c.vocab.decode(doc0).split() == [
        w if w in c.vocab else "<unk>" for w in c.vocab.tokenize(raw["test"][0].text)
    ]


def test_datamodule_batches(tiny_archive):
    dm = IMDBDataModule(archive=str(tiny_archive), block_size=6, batch_size=4, val_fraction=0.25)
    assert dm.vocab_size == len(dm.vocab) > 3
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[0] == 4 and x.shape == y.shape and x.dtype == torch.long
    assert isinstance(dm.train_dataloader(), StatefulDataLoader)
    v1 = [b[0] for b in dm.val_dataloader()]
    v2 = [b[0] for b in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(v1, v2))  # fixed validation windows
    assert len(list(dm.test_dataloader())) > 0
    assert dm.hparams["resolved_source"].endswith("aclImdb_v1.tar.gz")


def test_datamodule_rejects_bad_settings():
    for kwargs, match in [
        ({"batch_size": 0}, "batch_size"),
        ({"block_size": 0}, "block_size"),
        ({"min_freq": 0}, "min_freq"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"source": "text"}, "text_path"),
    ]:
        with pytest.raises(ValueError, match=match):
            IMDBDataModule(**kwargs)


def test_bundled_is_the_default_and_has_no_test_split():
    dm = IMDBDataModule(batch_size=2)
    dm.setup("fit")
    assert dm.corpus.source == "bundled"
    assert dm.corpus.documents("train") + dm.corpus.documents("val") == 25_000
    with pytest.raises(DataError, match="no test split"):
        dm.test_dataloader()


def test_real_archive(real_archive, tmp_path):
    docs = read_imdb(real_archive, ("train", "test"))
    assert len(docs["train"]) == 25_000 and len(docs["test"]) == 25_000
    c = prepare_corpus(CorpusSpec(archive=str(real_archive)), tmp_path / "c")
    assert c.documents("train") + c.documents("val") == 25_000 and c.documents("test") == 25_000
    ids, off = c.splits["test"]["ids"], c.splits["test"]["offsets"]
    for d in range(c.documents("test")):  # every test review decodes
        text = c.vocab.decode(ids[off[d] : off[d + 1]])
        assert text and len(text.split()) == off[d + 1] - off[d]
    # IMDB results unchanged: the streamed build equals the in-memory reference (same split, vocab, ids)
    assert_same_as_reference(c, reference_splits(docs["train"], docs["test"], 0.1))


# -- streaming build: identical to the plain in-memory reference --------------------------------------
def reference_splits(labelled, test=None, val_fraction=0.1):
    """The split as the in-memory implementation made it: hashed val in SHA-1 order, train without val texts."""
    import hashlib

    val = [d for d in labelled if in_validation(d.text, val_fraction)]
    val.sort(key=lambda d: hashlib.sha1(d.text.encode("utf-8")).digest())
    val_texts = {d.text for d in val}
    out = {"train": [d.text for d in labelled if d.text not in val_texts], "val": [d.text for d in val]}
    if test is not None:
        out["test"] = [d.text for d in test]
    return out


def assert_same_as_reference(corpus, splits, **vocab_kwargs):
    reference = Vocab.build(splits["train"], **vocab_kwargs)
    assert corpus.vocab.itos == reference.itos
    assert list(corpus.splits) == list(splits)
    for name, texts in splits.items():
        s = corpus.splits[name]
        ids, offsets = reference_flat([reference.encode(t) for t in texts])
        assert s["ids"].dtype == (np.uint16 if len(reference) <= 1 << 16 else np.uint32)
        assert np.array_equal(s["offsets"], offsets) and np.array_equal(s["ids"], ids), name
        assert s["chars"].tolist() == [len(t) for t in texts]


def reference_flat(docs):
    lengths = [len(d) for d in docs]
    return np.array([t for d in docs for t in d], dtype=np.int64), np.concatenate(([0], np.cumsum(lengths)))


def write_corpus(path, n_docs, seed=0, extra_words=0):
    """Generated plain text: documents separated by varied blank lines, some non-ASCII and invalid bytes."""
    from conftest import review

    rng = np.random.default_rng(seed)
    seps = ["\n\n", "\n \n", "\r\n\r\n", "\n\t\n\n"]
    parts = []
    for i in range(n_docs):
        text = review(int(rng.integers(0, 10**6)), int(rng.integers(1, 40)))
        if i % 7 == 0:
            text += " Émigré ΣΑΣ naïve (café)."
        if i % 50 == 3:  # specials written as text: never counted, encoded as the special
            text += " <unk> <pad> <|endoftext|>"
        if extra_words:
            text += " " + " ".join(f"w{i}x{k}" for k in range(extra_words))
        parts.append(text.encode() + (b" \xff" if i % 11 == 0 else b"") + seps[i % 4].encode())
    path.write_bytes(b"".join(parts))
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_build_equals_counter_vocab_and_encode(workers, tmp_path, monkeypatch):
    import minigpt.data.build as build

    monkeypatch.setattr(build, "CHUNK_CHARS", 2000)  # many chunks, so merging across them is exercised
    monkeypatch.setattr(build, "_workers", lambda: workers)
    corpus_file = write_corpus(tmp_path / "corpus.txt", 600)
    c = prepare_corpus(CorpusSpec(source="text", text_path=str(corpus_file)), tmp_path / "c")
    assert_same_as_reference(c, reference_splits(read_text(corpus_file)))
    limited = prepare_corpus(
        CorpusSpec(source="text", text_path=str(corpus_file), min_freq=3, max_size=20), tmp_path / "c"
    )
    assert_same_as_reference(limited, reference_splits(read_text(corpus_file)), min_freq=3, max_size=20)


def test_imdb_with_unsup_and_val_split_test_equal_reference(tiny_archive, tmp_path):
    raw = read_imdb(tiny_archive, ("train", "test", "unsup"))
    spec = CorpusSpec(archive=str(tiny_archive), val_fraction=0.25, include_unsup=True)
    ref = reference_splits(raw["train"], raw["test"], 0.25)
    val_texts = set(ref["val"])
    ref["train"] += [d.text for d in raw["unsup"] if d.text not in val_texts]
    assert_same_as_reference(prepare_corpus(spec, tmp_path / "c"), ref)
    # the tutorial's split: vocabulary over the whole train split, validation on the official test split
    tutorial = prepare_corpus(CorpusSpec(archive=str(tiny_archive), val_split="test"), tmp_path / "c")
    test_texts = [d.text for d in raw["test"]]
    assert_same_as_reference(tutorial, {"train": [d.text for d in raw["train"]], "val": test_texts, "test": test_texts})


def test_val_split_test_without_the_archive_says_what_it_uses(tmp_path, caplog):
    corpus_file = write_corpus(tmp_path / "corpus.txt", 50)
    with caplog.at_level(logging.INFO, logger="minigpt"):
        c = prepare_corpus(CorpusSpec(source="text", text_path=str(corpus_file), val_split="test"), tmp_path / "c")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: val_split")]
    assert len(lines) == 1 and "no test split" in lines[0] and "hashed 10%" in lines[0]
    assert c.path == prepare_corpus(CorpusSpec(source="text", text_path=str(corpus_file)), tmp_path / "c").path
    with pytest.raises(ValueError, match="val_split"):
        IMDBDataModule(val_split="dev")


def test_include_unsup_auto_takes_the_unsup_reviews_only_from_the_archive(tiny_archive, tmp_path, caplog):
    with_unsup = prepare_corpus(CorpusSpec(archive=str(tiny_archive), include_unsup=True), tmp_path / "c")
    auto = prepare_corpus(CorpusSpec(archive=str(tiny_archive), include_unsup="auto"), tmp_path / "c")
    without = prepare_corpus(CorpusSpec(archive=str(tiny_archive)), tmp_path / "c")
    assert auto.path == with_unsup.path != without.path  # resolved before the cache key
    assert len(auto.splits["train"]["ids"]) > len(without.splits["train"]["ids"])
    with caplog.at_level(logging.INFO, logger="minigpt"):
        dm = IMDBDataModule(archive=str(tiny_archive), include_unsup="auto", cache_dir=str(tmp_path / "c"))
        assert dm.corpus.path == auto.path
    assert dm.hparams["resolved_include_unsup"] is True  # what `evaluate --archive` reads back
    assert any(r.getMessage().endswith("with its unlabelled reviews)") for r in caplog.records)
    corpus_file = write_corpus(tmp_path / "corpus.txt", 50)
    text_auto = prepare_corpus(CorpusSpec(source="text", text_path=str(corpus_file), include_unsup="auto"), tmp_path)
    assert text_auto.path == prepare_corpus(CorpusSpec(source="text", text_path=str(corpus_file)), tmp_path).path
    with pytest.raises(DataError, match="include_unsup true needs the official archive.*your text files"):
        prepare_corpus(CorpusSpec(source="text", text_path=str(corpus_file), include_unsup=True), tmp_path)
    # source auto without an archive falls back to the bundled reviews, which have no unsup ones;
    # it says so before building anything
    with pytest.raises(DataError, match="include_unsup true needs the official archive.*bundled"):
        prepare_corpus(CorpusSpec(include_unsup=True), tmp_path / "empty_cache")
    with pytest.raises(ValueError, match="include_unsup must be true, false or auto"):
        IMDBDataModule(include_unsup="yes")
    with pytest.raises(ValueError, match="include_unsup needs the official archive"):
        IMDBDataModule(source="text", text_path=str(corpus_file), include_unsup=True)


def test_seed_config_uses_the_official_test_split_for_validation():
    import yaml

    from minigpt.configs import __file__ as configs_init

    seed = yaml.safe_load((Path(configs_init).parent / "seed.yaml").read_text())
    assert IMDBDataModule(**seed["data"]).spec.val_split == "test"


def test_large_vocabulary_gets_uint32_ids_and_batches_are_int64(tmp_path):
    corpus_file = tmp_path / "many.txt"
    corpus_file.write_text("\n\n".join(" ".join(f"w{d}_{k}" for k in range(700)) for d in range(110)))
    dm = IMDBDataModule(source="text", text_path=str(corpus_file), block_size=8, batch_size=4, cache_dir=str(tmp_path))
    assert dm.vocab_size > 1 << 16
    assert_same_as_reference(dm.corpus, reference_splits(read_text(corpus_file)))
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, y = next(iter(loader))
        assert x.dtype == y.dtype == torch.long and int(x.max()) < dm.vocab_size


def test_streamed_reader_equals_whole_file_reading(tmp_path):
    from minigpt.data.sources import _ReplacementCounter, iter_text_documents

    def whole_file(path):  # the reader before streaming: decode everything, split on blank lines
        counter = _ReplacementCounter()
        text = path.read_bytes().decode("utf-8", errors=counter.name)
        if path.suffix == ".jsonl":
            docs = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
        else:
            docs = re.split(r"\n[ \t\r\f\v]*\n", text)
        return [d.strip() for d in docs if d.strip()], counter.count

    txt = write_corpus(tmp_path / "c.txt", 40)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b"".join(json.dumps({"text": f"doc {i} \u00e9\u2028x"}).encode() + b"\n" for i in range(30)))
    for path in (txt, jsonl):
        expected = whole_file(path)
        for read_bytes in (1, 2, 3, 7, 64, 1 << 20):
            counter = _ReplacementCounter()
            assert (list(iter_text_documents(path, counter, read_bytes)), counter.count) == expected


def test_bad_files_are_one_line_errors(tmp_path, monkeypatch):
    import minigpt.data.sources as sources

    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x01" + bytes(range(256)) * 10)
    with pytest.raises(DataError, match=r"binary.txt is a binary file"):
        read_text(tmp_path / "binary.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)  # 1 bad byte in 5: still text
    assert len(read_text(tmp_path / "latin.txt")) == 1
    (tmp_path / "noise.txt").write_bytes(bytes(range(128, 256)) * 50)
    with pytest.raises(DataError, match=r"noise.txt is not UTF-8 text \(6,400 of 6,400 bytes invalid\)"):
        read_text(tmp_path / "noise.txt")
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 1000)
    (tmp_path / "long.txt").write_text("word " * 1000)  # 5,000 characters without a blank line
    with pytest.raises(DataError, match=r"long.txt has a document .* longer than the .* limit"):
        read_text(tmp_path / "long.txt")
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "word " * 1000}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:1 is longer than the .* limit"):
        read_text(tmp_path / "long.jsonl")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text")
    (folder / "b.txt").write_text("locked text")
    real_open = open

    def no_permission(path, *args, **kwargs):
        if Path(path).name == "b.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources, "open", no_permission, raising=False)
    with pytest.raises(DataError, match=r"cannot read .*b.txt: Permission denied"):
        read_text(folder)


def test_full_disk_leaves_no_entry_and_the_next_run_starts_clean(tmp_path, monkeypatch):
    import errno

    import minigpt.data.build as build

    corpus_file = write_corpus(tmp_path / "corpus.txt", 100)
    spec = CorpusSpec(source="text", text_path=str(corpus_file))
    cache = tmp_path / "cache"
    real_write = build.NpyWriter.write
    calls = []

    def fill_up(self, values):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, values)

    monkeypatch.setattr(build.NpyWriter, "write", fill_up)
    with pytest.raises(DataError, match="cannot write the data cache .*No space left on device.*--data.cache_dir"):
        prepare_corpus(spec, cache)
    assert [p.name for p in (cache / "tokens").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(build.NpyWriter, "write", real_write)
    stale = cache / "tokens" / f".tmp-{prepare_corpus.__name__}"  # an unrelated name survives
    stale.mkdir()
    c = prepare_corpus(spec, cache)  # a killed build's leftovers of this entry are removed, others kept
    assert_same_as_reference(c, reference_splits(read_text(corpus_file)))
    assert sorted(p.name for p in (cache / "tokens").iterdir() if not p.name.endswith(".lock")) == sorted(
        [c.path.name, stale.name]
    )


def test_killed_build_leftovers_are_removed(tmp_path):
    from minigpt.data.corpus import _identity, cache_key

    corpus_file = write_corpus(tmp_path / "corpus.txt", 30)
    spec = CorpusSpec(source="text", text_path=str(corpus_file))
    key = cache_key(spec, _identity("text", corpus_file))
    leftover = tmp_path / "cache" / "tokens" / f".tmp-{key}-killed"
    leftover.mkdir(parents=True)
    (leftover / "train.ids.npy").write_bytes(b"half")
    c = prepare_corpus(spec, tmp_path / "cache")
    assert c.path.name == key and not leftover.exists()


def test_cli_prepare_reports_a_binary_file_in_one_line(tmp_path, capsys):
    from minigpt.cli import main

    (tmp_path / "data.bin").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--data.source", "text", "--data.text_path", str(tmp_path / "data.bin")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a binary file" in err[0]


_MEMORY_PROBE = """
import sys
import minigpt.data.build as build
import minigpt.data.sources as sources
from minigpt.data.corpus import prepare_corpus
from minigpt.data.documents import CorpusSpec
sources._READ_BYTES = 64 << 10  # small fixed budgets, so a small corpus shows the difference
build.CHUNK_CHARS = build.REMAP_IDS = int(sys.argv[3])
build._workers = lambda: 1  # measure the one process that holds everything
prepare_corpus(CorpusSpec(source="text", text_path=sys.argv[1]), sys.argv[2])
print(build.peak_rss_gb()[0])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's VmHWM (peak memory per process)")
def test_memory_stays_flat_as_the_corpus_grows(tmp_path):
    """Peak memory of a build grows far less than the corpus; one chunk of everything (the old way) does not.

    What still grows is per-document bookkeeping (the validation documents' hashes, to sort them),
    tens of bytes per document: about 0.2 bytes per corpus byte for these short documents.
    """
    import subprocess
    import sys

    from conftest import review

    base = "\n\n".join(review(i, 12 + i % 30) for i in range(2000)).encode() + b"\n\n"  # fixed vocabulary
    sizes = []
    for copies in (4, 48):
        (tmp_path / f"corpus{copies}.txt").write_bytes(base * copies)
        sizes.append((tmp_path / f"corpus{copies}.txt").stat().st_size)

    def growth(chunk_chars):
        peaks = []
        for copies in (4, 48):
            args = [tmp_path / f"corpus{copies}.txt", tmp_path / f"cache{copies}-{chunk_chars}", chunk_chars]
            run = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *map(str, args)], capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            peaks.append(float(run.stdout.split()[-1]) * 1e9)
        return (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])

    g1, g2 = growth(64 << 10), growth(1 << 40)
    assert g1 < 0.3  # bytes of peak memory per byte of corpus
    assert g2 > 1.0  # the measurement sees a build that holds the corpus


def test_progress_lines_with_rate_and_eta_when_not_a_terminal(tmp_path, monkeypatch, caplog):
    import minigpt.data.build as build

    monkeypatch.setattr(build, "_LOG_EVERY_S", 0.0)
    monkeypatch.setattr(build, "CHUNK_CHARS", 2000)
    corpus_file = write_corpus(tmp_path / "corpus.txt", 100)
    with caplog.at_level(logging.INFO, logger="minigpt"):
        prepare_corpus(CorpusSpec(source="text", text_path=str(corpus_file)), tmp_path / "c")
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        re.search(r"tokenizing [\d,]+ MB in \d+ s \([\d.]+ MB/s\), \d+% of [\d,]+ MB, ETA \d+ s", m) for m in lines
    )
    summary = [m for m in lines if m.startswith("data: prepared")]
    assert len(summary) == 1 and re.search(r"MB/s\), peak memory [\d.]+ GB", summary[0])


def test_datamodule_trains_and_caches_a_bpe_tokenizer(tmp_path):
    from minigpt.bpe import BpeTokenizer

    corpus_file = write_corpus(tmp_path / "corpus.txt", 200)
    dm = IMDBDataModule(source="text", text_path=str(corpus_file), tokenizer="bpe:300", cache_dir=str(tmp_path))
    c = dm.corpus
    assert isinstance(dm.vocab, BpeTokenizer) and dm.vocab_size == 300 and c.splits["train"]["ids"].dtype == np.uint16
    splits = reference_splits(read_text(corpus_file))
    for name, texts in splits.items():  # byte-level: every document decodes back exactly
        ids, off = c.splits[name]["ids"], c.splits[name]["offsets"]
        assert [dm.vocab.decode(ids[off[d] : off[d + 1]]) for d in range(len(texts))] == texts
    again = IMDBDataModule(source="text", text_path=str(corpus_file), tokenizer="bpe:300", cache_dir=str(tmp_path))
    assert again.corpus.path == c.path and again.vocab == dm.vocab  # cached like the vocabulary
    with pytest.raises(ValueError, match="bpe:100 is too small"):
        IMDBDataModule(tokenizer="bpe:100")
