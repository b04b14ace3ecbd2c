import logging

import numpy as np
import pytest
import torch
from conftest import tiny_reviews, write_tar
from torchdata.stateful_dataloader import StatefulDataLoader

from minigpt.data.corpus import Corpus, CorpusSpec, in_validation, prepare_corpus
from minigpt.data.datamodule import IMDBDataModule
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


@pytest.mark.parametrize("parallel", [False, True])
def test_encode_splits_equals_counter_vocab_and_encode(parallel, monkeypatch):
    import minigpt.data.corpus as corpus

    monkeypatch.setattr(corpus, "_PARALLEL_MIN_DOCS", 1 if parallel else 10**9)
    from conftest import review

    train = [review(i, 5 + i % 11) for i in range(40)] + ["Zebra zebra, quagga!"]
    val = [review(i + 100, 7) for i in range(9)] + ["an okapi appears"]
    vocab, enc = corpus.encode_splits({"train": train, "val": val}, min_freq=1)
    reference = Vocab.build(train)
    assert vocab.itos == reference.itos
    for name, texts in (("train", train), ("val", val)):
        ids, offsets = enc[name]
        assert [ids[offsets[d] : offsets[d + 1]].tolist() for d in range(len(texts))] == [
            reference.encode(t) for t in texts
        ]
