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
