import json
import random

import pytest

from minigpt.tokenizer import EOT, PAD, UNK, Vocab, basic_english, basic_english_reference, detokenize


def test_basic_english_example():
    assert basic_english("Hello, World! It's <br />great.") == [
        "hello",
        ",",
        "world",
        "!",
        "it",
        "'",
        "s",
        "great",
        ".",
    ]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ('He said "no" (twice); ok: fine?', ["he", "said", "no", "(", "twice", ")", "ok", "fine", "?"]),
        ("A<br /><br />B", ["a", "b"]),
        ('<br "/>x', ["x"]),  # removing '"' first creates a <br /> that the next rule removes
        ("ellipsis...", ["ellipsis", ".", ".", "."]),
        ("  tabs\tand\nnewlines  ", ["tabs", "and", "newlines"]),
        ("", []),
    ],
)
def test_basic_english_rules(text, tokens):
    assert basic_english(text) == tokens
    assert basic_english_reference(text) == tokens


def test_fast_path_equals_reference_rules_on_random_text():
    rng = random.Random(0)
    alphabet = list("ab '\".,()!?;:<br />\t\nXÉ") + ["<br />"] * 3
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert basic_english(text) == basic_english_reference(text), repr(text)


def test_vocab_order_specials_and_ties():
    v = Vocab.build(["b a c", "a b", "a d"])
    # specials first, then by descending frequency, ties in lexical order
    assert v.itos == [UNK, PAD, EOT, "a", "b", "c", "d"]
    assert (v.unk_index, v.pad_index, v.eot_index) == (0, 1, 2)
    assert len(v) == 7


def test_vocab_min_freq_and_max_size():
    texts = ["a a a b b c", "a b d"]
    assert Vocab.build(texts, min_freq=2).itos[3:] == ["a", "b"]
    assert Vocab.build(texts, max_size=4).itos == [UNK, PAD, EOT, "a"]  # max_size counts the specials
    with pytest.raises(ValueError, match="min_freq"):
        Vocab.build(texts, min_freq=0)
    with pytest.raises(ValueError, match="max_size"):
        Vocab.build(texts, max_size=2)


def test_unknown_words_map_to_unk_and_decode():
    v = Vocab.build(["the movie was good"])
    ids = v.encode("The movie was AWFUL")
    assert ids == [v.stoi["the"], v.stoi["movie"], v.stoi["was"], 0]
    assert v.decode(ids) == "the movie was <unk>"


def test_vocab_json_round_trip(tmp_path):
    v = Vocab.build(["x y z x", "émigré « quotes »"])
    v.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text())["kind"] == "basic_english"
    w = Vocab.load(tmp_path / "vocab.json")
    assert w.itos == v.itos and w.stoi == v.stoi


def test_vocab_rejects_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read vocab"):
        Vocab.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="specials"):
        Vocab(["a", "b", "c"])


def test_detokenize_tidies_punctuation():
    assert detokenize("the movie . it ' s great , ( really ) !".split()) == "the movie. it's great, (really)!"
    v = Vocab.build(["the movie . it ' s"])
    assert v.decode(v.encode("the movie. it's"), tidy=True) == "the movie. it's"
