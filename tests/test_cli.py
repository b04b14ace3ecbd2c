"""The `minigpt` command end to end, in-process, on a tiny corpus (seconds)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import review
from lightning.pytorch.cli import LightningCLI

from minigpt.cli import MiniGPTCLI, main
from minigpt.data.datamodule import IMDBDataModule
from minigpt.lit_module import LitMiniGPT
from minigpt.plot import loss_figure, read_scalars

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(review(i, 12 + (i % 5) * 4) for i in range(60)))
    return p


@pytest.fixture
def run_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fit(corpus, *extra):
    main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus),
          "--trainer.enable_progress_bar", "false", *extra])  # fmt: skip


def test_fit_tiny_writes_events_checkpoints_and_samples(corpus, run_here, caplog):
    fit(corpus, "--trainer.max_steps", "12", "--trainer.val_check_interval", "6")
    run = run_here / "lightning_logs" / "version_0"
    assert list(run.glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    scalars = read_scalars(run)
    assert {"train_loss", "val_loss", "val_ppl", "train_tok_s"} <= scalars.keys()
    assert len(scalars["val_loss"]) == 2  # validated at steps 6 and 12
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    samples = acc.Tensors("samples/text_summary")
    assert len(samples) == 2 and b"the movie was" in samples[-1].tensor_proto.string_val[0]
    assert "sample (step 12): the movie was |" in caplog.text
    assert (run / "config.yaml").exists()


def test_resume_last_continues_in_the_same_version(corpus, run_here):
    fit(corpus, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3")
    fit(corpus, "--trainer.max_steps", "12", "--trainer.val_check_interval", "3", "--ckpt_path", "last")
    runs = sorted(p.name for p in (run_here / "lightning_logs").iterdir())
    assert runs == ["version_0"]
    run = run_here / "lightning_logs" / "version_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    steps = [s for s, _ in read_scalars(run)["val_loss"]]
    assert len(steps) == 4 and steps == sorted(steps)  # one continuous curve, no gap or overlap
    assert steps[1] - steps[0] == steps[2] - steps[1] == steps[3] - steps[2] == 3
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12


def test_plot_writes_png_with_two_curves(corpus, run_here, capsys):
    fit(corpus, "--trainer.max_steps", "10", "--trainer.val_check_interval", "5")
    main(["plot", "--out", "curves.png"])
    out = run_here / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    fig = loss_figure(read_scalars(run_here / "lightning_logs" / "version_0"))
    assert sorted(line.get_label() for line in fig.axes[0].get_lines()) == ["train_loss", "val_loss"]


def test_block_and_vocab_sizes_are_linked_once(corpus):
    cli = MiniGPTCLI(
        LitMiniGPT,
        IMDBDataModule,
        run=False,
        args=["--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus),
              "--data.block_size", "12", "--trainer.logger", "false"],
    )  # fmt: skip
    assert cli.model.config.block_size == 12 == cli.datamodule.block_size
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size == len(cli.datamodule.vocab)
    assert isinstance(cli, LightningCLI)


def test_default_fit_config_is_the_imdb_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    import yaml

    cfg = yaml.safe_load(printed)
    recipe = yaml.safe_load((CONFIGS / "imdb.yaml").read_text())
    assert cfg["model"]["config"]["head"] == recipe["model"]["config"]["head"]
    assert cfg["data"]["block_size"] == recipe["data"]["block_size"]


def test_prepare_json(corpus, capsys):
    main(["prepare", "--data.source", "text", "--data.text_path", str(corpus), "--show", "2", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["source"] == "text" and summary["vocab_size"] > 3
    assert set(summary["splits"]) == {"train", "val"} and summary["splits"]["train"]["documents"] > 0
    assert 0 <= summary["val_unk_rate"] < 1 and summary["seconds"] >= 0
    pairs = [line for line in lines if line.startswith("[")]
    assert len(pairs) == 2 and all(" | " in p for p in pairs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--data.batch_sise", "3"], "unrecognized arguments"),
        (["fit", "--model.config.n_embd", "30"], "divisible"),
        (["fit", "--data.batch_size", "0"], "batch_size must be >= 1"),
        (["fit", "--model.config.dropout", "-0.1"], "dropout"),
        (["fit", "--data.min_freq", "0"], "min_freq"),
        (["fit", "--data.archive", "/no/such/aclImdb_v1.tar.gz"], "does not exist"),
        (["validate", "--ckpt_path", "/no/such.ckpt"], "does not exist"),
        (["prepare", "--data.source", "text", "--data.text_path", "/no/such/dir"], "does not exist"),
        (["prepare", "--data.source", "text", "--data.text_path", "/no/such/*.txt"], "no text files"),
        (["plot", "/no/such/run"], "does not exist"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, corpus, run_here, capsys):
    if args[0] == "fit" and "--data.archive" not in args:
        tiny = ["--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus)]
        args = [args[0], *tiny, *args[1:]]  # later options override the config file
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minigpt: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (run_here / "lightning_logs").exists()  # nothing written


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint trained for a few steps by `minigpt fit` (shared by the generate tests)."""
    import os

    root = tmp_path_factory.mktemp("gen")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(review(i, 12 + (i % 5) * 4) for i in range(60)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        fit(corpus, "--trainer.max_steps", "4", "--trainer.val_check_interval", "4")
    finally:
        os.chdir(cwd)
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def test_generate_json_and_reproducible(tiny_ckpt, capsys):
    args = ["generate", "--ckpt_path", str(tiny_ckpt), "--prompt", "the movie was", "--max_new_tokens", "6",
            "--num_samples", "2", "--seed", "3", "--json"]  # fmt: skip
    main(args)
    first = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(first) == 2 and {r["sample"] for r in first} == {0, 1}
    for r in first:
        assert r["prompt"] == "the movie was" and r["stop_reason"] in ("eos", "length")
        assert len(r["tokens"]) <= 6 and isinstance(r["text"], str) and r["tokens_per_s"] > 0
    main(args)
    again = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["tokens"] for r in again] == [r["tokens"] for r in first]  # same seed, same text


def test_generate_stream_prints_the_same_text(tiny_ckpt, capsys):
    base = ["generate", "--ckpt_path", str(tiny_ckpt), "--prompt", "the movie was", "--max_new_tokens", "8",
            "--temperature", "0"]  # fmt: skip
    main(base)
    plain = capsys.readouterr().out.strip()
    main([*base, "--stream"])
    assert capsys.readouterr().out.strip() == plain


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", "   "], "empty"),
        (["--prompt", "a", "--temperature", "-1"], "temperature"),
        (["--prompt", "a", "--top_k", "0"], "top_k"),
        (["--prompt", "a", "--top_p", "0"], "top_p"),
        (["--prompt", "a", "--top_p", "1.5"], "top_p"),
        (["--prompt", "a", "--repetition_penalty", "0"], "repetition_penalty"),
        (["--prompt_file", "/no/such/prompts.txt"], "cannot read"),
        ([], "give a prompt"),
    ],
)
def test_generate_bad_input(tiny_ckpt, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ckpt_path", str(tiny_ckpt), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minigpt: error:") and message in err[0]


@pytest.mark.parametrize("content", [None, b"", b"not a zip file at all"])
def test_generate_bad_checkpoint(tmp_path, content, capsys):
    path = tmp_path / "model.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ckpt_path", str(path), "--prompt", "the movie"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]
