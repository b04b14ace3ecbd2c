"""`minigpt convert`, `minigpt compare` and fine-tuning a converted GPT-2, on tiny local models."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import write_corpus
from test_hf import EOT, _tiny_gpt2, _train_bpe

from minigpt.checkpoint import load_model
from minigpt.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    tok = _train_bpe()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT).save_pretrained(folder)
    _tiny_gpt2(tok.get_vocab_size(), tok.token_to_id(EOT)).save_pretrained(folder)
    return folder


def test_convert_both_ways_from_the_command_line(hf_dir, tmp_path, capsys):
    ckpt = tmp_path / "gpt2.ckpt"
    main(["convert", "--from_hf", str(hf_dir), "--out", str(ckpt)])
    model, tok = load_model(str(ckpt))
    assert tok.kind == "bpe" and model.config.norm_first and model.config.tie_weights
    out = tmp_path / "back"
    main(["convert", "--ckpt_path", str(ckpt), "--to_hf", str(out)])
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out).decode(tok.encode("the movie")) == "the movie"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "--from_hf", "gpt2", "--out", "x.ckpt"], "local folder"),
        (["convert", "--from_hf", "/no/such/folder", "--out", "x.ckpt"], "does not exist"),
        (["convert", "--out", "x.ckpt"], "either"),
        (["compare", "--ckpt_path", "/no/such.ckpt", "--hf_model", "gpt2"], "does not exist"),
    ],
)
def test_convert_and_compare_errors_are_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minigpt: error:") and message in err[-1]


def test_compare_prints_both_and_json_parses(hf_dir, tmp_path, corpus, capsys):
    ckpt = tmp_path / "gpt2.ckpt"
    main(["convert", "--from_hf", str(hf_dir), "--out", str(ckpt)])
    capsys.readouterr()
    main(["compare", "--ckpt_path", str(ckpt), "--hf_model", str(hf_dir), "--prompt", "the movie was",
          "--text_file", str(corpus), "--max_docs", "5", "--max_new_tokens", "8", "--json"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    (sample,) = result["samples"]
    # the converted model is the HF model: same sampler, same seed, same text
    assert sample["minigpt"] == sample["hf"] and sample["prompt"] == "the movie was"
    assert result["sampling"]["temperature"] == 0.7 and result["sampling"]["top_k"] == 50
    assert result["minigpt"]["bits_per_character"] == pytest.approx(result["hf"]["bits_per_character"], rel=1e-4)
    assert result["minigpt"]["documents"] == 5


def test_fine_tune_a_converted_gpt2_with_its_bpe(hf_dir, tmp_path, corpus, monkeypatch):
    ckpt = tmp_path / "gpt2.ckpt"
    main(["convert", "--from_hf", str(hf_dir), "--out", str(ckpt)])
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--model.init_from", str(ckpt), "--data.source", "text",
          "--data.text_path", str(corpus), "--data.block_size", "32", "--data.batch_size", "4",
          "--model.optimizer", "adamw", "--model.lr", "1e-3", "--model.scheduler", "constant",
          "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.check_val_every_n_epoch", "null",
          "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
          "--generation.sampling.max_new_tokens", "4"])  # fmt: skip
    tuned = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    model, tok = load_model(str(tuned))
    base, base_tok = load_model(str(ckpt))
    assert tok.kind == "bpe" and tok.itos == base_tok.itos  # the GPT-2 tokenizer travelled along
    assert model.config.block_size == 32 and model.config.n_embd == base.config.n_embd
    moved = [not torch.equal(p, q) for (n, p), q in zip(model.named_parameters(), base.parameters())
             if n != "transformer.wpe.weight"]  # fmt: skip
    assert any(moved)  # it trained


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A few steps of `minigpt fit` with the tiny config (post-norm, ReLU: no GPT-2 equivalent)."""
    root = tmp_path_factory.mktemp("run")
    corpus = write_corpus(root / "corpus.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus),
              "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
              "--trainer.enable_progress_bar", "false",
              "--trainer.precision", "32-true"])  # fmt: skip  # the same weights (and sample) on every CPU
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", corpus


def test_convert_any_architecture_and_compare(trained_ckpt, tmp_path, capsys):
    ckpt, corpus = trained_ckpt
    folder = tmp_path / "tiny-hf"
    main(["convert", "--ckpt_path", str(ckpt), "--to_hf", str(folder)])
    assert capsys.readouterr().out.strip() == str(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "minigpt"
    main(["compare", "--ckpt_path", str(ckpt), "--hf_model", str(folder), "--text_file", str(corpus),
          "--max_docs", "5", "--max_new_tokens", "40", "--json"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    (sample,) = result["samples"]
    assert sample["minigpt"] == sample["hf"]  # the same model, tokenizer, sampler, seed and tidy decoding
    assert "'" in sample["hf"] and " '" not in sample["hf"]  # the sample has punctuation, glued as minigpt glues it
    assert result["minigpt"]["bits_per_character"] == pytest.approx(result["hf"]["bits_per_character"], rel=1e-5)
    main(["convert", "--from_hf", str(folder), "--out", str(tmp_path / "back.ckpt")])
    (model, tok), (back, back_tok) = load_model(str(ckpt)), load_model(str(tmp_path / "back.ckpt"))
    assert back_tok.itos == tok.itos and all(torch.equal(p, q) for p, q in zip(model.parameters(), back.parameters()))


def test_convert_bad_input_is_one_line(trained_ckpt, tmp_path, monkeypatch, capsys):
    ckpt, _ = trained_ckpt
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "other.ckpt")  # another Lightning module's
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    cases = [
        (["--ckpt_path", str(ckpt), "--to_hf", str(tmp_path / "full")], "is not empty"),
        (["--ckpt_path", str(tmp_path / "other.ckpt"), "--to_hf", str(tmp_path / "a")], "not a minigpt checkpoint"),
        (["--ckpt_path", str(tmp_path / "plain.pt"), "--to_hf", str(tmp_path / "b")], "not a minigpt checkpoint"),
        (["--ckpt_path", str(ckpt), "--to_hf", str(tmp_path / "c"), "--dtype", "float16"], "--dtype must be one of"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["convert", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("minigpt: error:") and message in err[0]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written before the error
