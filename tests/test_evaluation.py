import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt.cli import main
from minigpt.config import GPTConfig
from minigpt.data.samples import flatten
from minigpt.evaluation import evaluate_ids
from minigpt.model import GPT
from minigpt.tokenizer import EOT_ID, Vocab

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_bits_per_character_by_hand():
    text = ["the movie was good.", "it was bad!"]
    vocab = Vocab.build(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=len(vocab), block_size=4)).eval()
    docs = [vocab.encode(t) for t in text]
    ids, offsets = flatten(docs)
    specials = dict(unk_index=0, eot_index=vocab.eot_index, pad_index=vocab.pad_index)
    r = evaluate_ids(model, ids, offsets, sum(map(len, text)), **specials)
    # by hand: each document is <eot> w1 .. wn <eot>, scored window by window (block 4)
    nll, n = 0.0, 0
    for d in docs:
        s = [EOT_ID, *d, EOT_ID]
        for start in range(0, len(s) - 1, 4):
            x = torch.tensor([s[start : start + 4]])
            y = s[start + 1 : start + 5]
            logp = torch.log_softmax(model(x)[0], -1)
            nll -= sum(float(logp[i, t]) for i, t in enumerate(y))
            n += len(y)
    assert r.tokens == n == sum(len(d) + 1 for d in docs)
    assert r.loss == pytest.approx(nll / n, rel=1e-5)
    assert r.bits_per_character == pytest.approx(nll / math.log(2) / (19 + 11), rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert r.unk_rate == 0.0


def by_hand_loss(model: GPT, s: list[int], block: int, stride: int) -> float:
    """Mean NLL of every target of s[1:], each predicted once from its own context: target t (t >= 1) is
    scored by the first window [k, k + block) with k a multiple of `stride` that reaches it, i.e. from s[k:t]."""
    nll = 0.0
    for t in range(1, len(s)):
        k = 0 if t <= block else -(-(t - block) // stride) * stride
        logp = torch.log_softmax(model(torch.tensor([s[k:t]]))[0, -1], -1)
        nll -= float(logp[s[t]])
    return nll / (len(s) - 1)


def test_stride_gives_context_but_scores_each_token_once():
    vocab = Vocab.build(["a b c d e f g h i j k l m n o p"])
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=len(vocab), block_size=8)).eval()
    doc = vocab.encode("a b c d e f g h i j k l m n o p q")
    ids, offsets = flatten([doc])
    specials = dict(unk_index=0, eot_index=vocab.eot_index, pad_index=vocab.pad_index)
    plain = evaluate_ids(model, ids, offsets, 33, **specials)
    strided = evaluate_ids(model, ids, offsets, 33, **specials, stride=2)
    assert plain.tokens == strided.tokens == 18
    assert plain.unk_rate == pytest.approx(1 / 18)  # "q" is unknown
    s = [EOT_ID, *doc, EOT_ID]
    assert plain.loss == pytest.approx(by_hand_loss(model, s, block=8, stride=8), rel=1e-5)
    assert strided.loss == pytest.approx(by_hand_loss(model, s, block=8, stride=2), rel=1e-5)
    assert abs(strided.loss - plain.loss) > 1e-3  # the extra context does change the scores


def test_evaluate_equals_trainer_test(tiny_archive, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.archive", str(tiny_archive),
          "--data.val_fraction", "0.25", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    # evaluate computes in float32; the Trainer would pick bf16-mixed on a CPU with native bf16.
    main(["test", "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"])
    out = capsys.readouterr().out
    # Lightning's results table has rich's "│" borders only when rich is installed: take the row's number.
    row = next(line for line in out.splitlines() if "test_loss" in line)
    test_loss = float(re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", row)[-1])
    main(["evaluate", "--ckpt_path", str(ckpt), "--split", "test", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(test_loss, abs=1e-5)
    assert result["documents"] == 12 and result["tokens"] > 0


def test_evaluate_text_file_plain_and_jsonl(tiny_archive, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.archive", str(tiny_archive),
          "--data.val_fraction", "0.25", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    ckpt = str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    (tmp_path / "a.txt").write_text("The movie was great.\n\nThe plot was boring!\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "The movie was great."}) + "\n"
                                      + json.dumps({"text": "The plot was boring!"}) + "\n")  # fmt: skip
    results = []
    for name in ("a.txt", "a.jsonl"):
        capsys.readouterr()
        main(["evaluate", "--ckpt_path", ckpt, "--text_file", str(tmp_path / name), "--json"])
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["documents"] == results[1]["documents"] == 2
    assert results[0]["loss"] == results[1]["loss"] and results[0]["characters"] == 40
    for bad, message in ((tmp_path / "missing.txt", "does not exist"), (tmp_path / "empty.txt", "empty")):
        if message == "empty":
            bad.write_text("\n  \n")
        with pytest.raises(SystemExit) as e:
            main(["evaluate", "--ckpt_path", ckpt, "--text_file", str(bad)])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_flatten():
    ids, offsets = flatten([[3, 4], [], [5]])
    assert ids.tolist() == [3, 4, 5] and offsets.tolist() == [0, 2, 2, 3]
    assert ids.dtype == np.int64


def test_max_docs_spreads_over_the_split():
    from minigpt.cli import spread

    assert spread(10, 3).tolist() == [0, 4, 9]  # both ends of a label-sorted split, not its first label only
    assert spread(5, None).tolist() == spread(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert len(spread(25_000, 2_500)) == 2_500
