import json
import random

import pytest

from minigpt.tokenizer import (
    BASIC_ENGLISH_REPLACEMENTS,
    EOT,
    PAD,
    UNK,
    Vocab,
    basic_english,
    basic_english_reference,
    detokenize,
)


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


def test_public_replacements_rebuild_basic_english():
    # What another tokenizer library is told to do (minigpt.convert hands these to Hugging Face's
    # normalizers): lower-case, the literal replacements in order, split on white space.
    def rebuilt(text: str) -> list[str]:
        text = text.lower()
        for old, new in BASIC_ENGLISH_REPLACEMENTS:
            text = text.replace(old, new)
        return text.split()

    rng = random.Random(1)
    alphabet = list("ab '\".,()!?;:<br />\t\nXÉ") + ["<br />", '<br "/>'] * 3  # the order matters for the second
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert rebuilt(text) == basic_english_reference(text), repr(text)


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


_TRAIN_IN_A_FRESH_PROCESS = """
import sys
from minigpt.bpe import train_bpe
texts = open(sys.argv[1], encoding="utf-8").read().split("\\n\\n")
print(train_bpe(iter(texts), 300).tokenizer.to_str())
"""


def _bpe_texts():
    from conftest import review

    return [review(i, 5 + i % 17) + " Émigré naïve 🎬 <br />ok" for i in range(300)]


def test_trained_bpe_is_deterministic_and_round_trips_text(tmp_path):
    import subprocess
    import sys

    from minigpt.bpe import NO_ID, train_bpe
    from minigpt.tokenizer import tokenizer_from_dict

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(_bpe_texts()), encoding="utf-8")
    runs = [
        subprocess.run([sys.executable, "-c", _TRAIN_IN_A_FRESH_PROCESS, str(corpus)], capture_output=True, text=True)
        for _ in range(2)
    ]  # separate processes: hash seeds differ, the merges must not
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    tok = train_bpe(iter(_bpe_texts()), 300)
    assert tok.tokenizer.to_str() + "\n" == runs[0].stdout
    assert len(tok) == 300 and tok.unk_index == NO_ID and tok.itos[tok.eot_index] == "<|endoftext|>"
    for text in ["The movie was great.", "  unseen wörds ½ 日本語 \t\n end", "Émigré naïve 🎬 <br />ok", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tokenizer_from_dict(tok.to_dict()) == tok  # what the checkpoint stores loads back the same
    with pytest.raises(ValueError, match="257"):
        train_bpe(iter(["x"]), 100)
