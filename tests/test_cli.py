"""The `minigpt` command end to end, in-process, on a tiny corpus (seconds)."""

import io
import json
import os
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_corpus
from lightning.pytorch.cli import LightningCLI

from minigpt.checkpointing import AtomicCheckpointIO
from minigpt.cli import main
from minigpt.commands.train import MiniGPTCLI
from minigpt.data.datamodule import IMDBDataModule
from minigpt.lit_module import LitMiniGPT
from minigpt.model import CPU_SHORT_ATTENTION_MAX_KEYS
from minigpt.plot import loss_figure, read_scalars

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fit(corpus, *extra):
    main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus),
          "--trainer.enable_progress_bar", "false", *extra])  # fmt: skip


def test_fit_tiny_writes_events_checkpoints_and_samples(corpus, run_here, caplog, capsys):
    fit(corpus, "--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--trainer.log_every_n_steps", "4")
    run = run_here / "lightning_logs" / "version_0"
    assert list(run.glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    scalars = read_scalars(run)
    assert {"train_loss", "val_loss", "val_ppl", "train_tok_s"} <= scalars.keys()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    samples = acc.Tensors("samples/text_summary")
    assert len(samples) == 2 and b"the movie was" in samples[-1].tensor_proto.string_val[0]
    # TensorBoard, the console and the samples name the same steps: the number of optimizer steps done.
    console = [int(m) for m in re.findall(r"step (\d+): val_loss", caplog.text)]
    said = [int(m) for m in re.findall(r"sample \(step (\d+)\): the movie was \|", caplog.text)]
    assert console == said == [s for s, _ in scalars["val_loss"]] == [e.step for e in samples] == [6, 12]
    # The first line of the run (after the data and the devices) says how long it trains.
    first = next(r.getMessage() for r in caplog.records if r.name.startswith("minigpt.") and "data" not in r.name)
    assert first == "training for 12 steps (trainer.max_steps); --trainer.max_steps 24 trains longer"
    assert [s for s, _ in scalars["train_loss"]] == [s for s, _ in scalars["lr"]] == [4, 8, 12]
    # Progress lines (every logging step or 30 s, whichever is later) show the loss TensorBoard has at their step.
    progress = re.findall(r"^step (\d+)/12 .* train_loss ([\d.]+) ", capsys.readouterr().out, re.MULTILINE)
    assert progress and [(int(s), float(v)) for s, v in progress] == [
        (s, pytest.approx(v, abs=1e-4)) for s, v in scalars["train_loss"] if str(s) in dict(progress)
    ]
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
    # It trains for 10 minutes and then ends (no epoch limit): the budget of the README's results.
    limits = (cfg["trainer"]["max_time"], cfg["trainer"]["max_epochs"], cfg["trainer"]["max_steps"])
    assert limits == ("00:00:10:00", None, -1)
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.max_time", "null", "--trainer.max_epochs", "3", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["trainer"]["max_time"], cfg["trainer"]["max_epochs"]) == (None, 3)


@pytest.mark.parametrize(
    ("limits", "resumed", "line"),
    [
        (dict(max_time="00:00:10:00"), False,
         "training for 10 minutes (trainer.max_time); --trainer.max_time 00:01:00:00 trains longer"),
        (dict(max_time={"hours": 2, "seconds": 5}), True, "training for 2 hours 5 seconds (trainer.max_time) in all, "
         "the checkpoint's included; --trainer.max_time 00:04:00:10 trains longer"),
        (dict(max_time=None, max_epochs=3), False,
         "training for 3 epochs (trainer.max_epochs); --trainer.max_epochs 6 trains longer"),
        (dict(max_steps=20), False, "training for 20 steps (trainer.max_steps); --trainer.max_steps 40 trains longer"),
        (dict(max_steps=20, max_epochs=1), True, "training for 20 steps (trainer.max_steps) or 1 epoch "
         "(trainer.max_epochs) in all, the checkpoint's included, whichever comes first; --trainer.max_steps 40"),
        (dict(max_steps=1500, max_epochs=2), False, "training for 1,500 steps (trainer.max_steps) or 2 epochs "
         "(trainer.max_epochs), whichever comes first; --trainer.max_steps 3000 trains longer"),
        (dict(max_epochs=-1), False,
         "training until stopped (no trainer.max_time, max_steps or max_epochs); Ctrl-C saves"),
    ],
)  # fmt: skip
def test_the_first_line_of_a_fit_says_how_long_it_trains(limits, resumed, line):
    from lightning.pytorch import Trainer

    from minigpt.commands.train import budget_line

    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **limits)
    assert budget_line(trainer, resumed=resumed).startswith(line)


def test_fit_by_epochs_ends_after_them(corpus, run_here, caplog):
    fit(corpus, "--trainer.max_steps", "-1", "--trainer.max_epochs", "2", "--trainer.val_check_interval", "1000")
    ckpt = torch.load(run_here / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 2 * len(_train_batches(corpus))
    assert "training for 2 epochs (trainer.max_epochs); --trainer.max_epochs 4 trains longer" in caplog.text


def _train_batches(corpus):
    data = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())["data"]
    dm = IMDBDataModule(**data, source="text", text_path=str(corpus))
    dm.setup("fit")
    return dm.train_dataloader()


def test_prepare_json(corpus, capsys):
    main(["prepare", "--data.source", "text", "--data.text_path", str(corpus), "--show", "2", "--json"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout is exactly one JSON object; the rest went to stderr
    lines = captured.err.strip().splitlines()
    assert summary["source"] == "text" and summary["vocab_size"] > 3
    assert set(summary["splits"]) == {"train", "val"} and summary["splits"]["train"]["documents"] > 0
    assert 0 <= summary["val_unk_rate"] < 1 and summary["seconds"] >= 0
    pairs = [line for line in lines if line.startswith("[")]
    assert len(pairs) == 2 and all(" | " in p for p in pairs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--data.batch_sise", "3"], "arguments: --data.batch_sise 3 (did you mean --data.batch_size?)"),
        (["fit", "--trainer.max_step", "5"], "--trainer.max_step 5 (did you mean --trainer.max_steps?)"),
        (["validate", "--ckpt_pth", "x"], "unrecognized arguments: --ckpt_pth x (did you mean --ckpt_path?)"),
        (["fit", "--model.confg.n_embd", "8", "--zzz", "1"], "(did you mean --model.config.n_embd for --model.confg"),
        (["fit", "--early_validation.step", "0"], "early_validation.step"),
        (["fit", "--trainer.callbacks+=minigpt.callbacks.EMAWeights", "--trainer.callbacks.decay", "1.5"],
         "EMAWeights decay must be between 0 and 1 (exclusive), got 1.5"),
        (["prepare", "--sho", "2"], "unrecognized arguments: --sho 2 (did you mean --show?)"),
        (["plot", "--roo", "x"], "unrecognized arguments: --roo (did you mean --root?)"),  # x: the run_dir
        (["fit", "--config", "BAD_YAML"], "bad.yaml has a YAML syntax error at line 3, column 6: expected ',' or ']'"),
        (["prepare", "--config", "BAD_YAML"], "bad.yaml has a YAML syntax error at line 3, column 6: expected ',' or"),
        (["fit", "--config", "/no/such.yaml"], "--config /no/such.yaml does not exist"),
        (["fit", "--model.config.n_embd", "30"], "divisible"),
        (["fit", "--data.batch_size", "0"], "batch_size must be >= 1"),
        (["fit", "--model.config.dropout", "-0.1"], "dropout"),
        (["fit", "--data.min_freq", "0"], "min_freq"),
        (["fit", "--data.include_unsup", "maybe"], "data.include_unsup must be true, false or auto, got 'maybe'"),
        (["fit", "--model.optimizer", "muonx"], "Literal['adam', 'adamw', 'muon']. Got value: muonx"),
        (["fit", "--data.archive", "/no/such/aclImdb_v1.tar.gz"], "does not exist"),
        (["validate", "--ckpt_path", "/no/such.ckpt"], "does not exist"),
        (["prepare", "--data.source", "text", "--data.text_path", "/no/such/dir"], "does not exist"),
        (["prepare", "--data.source", "text", "--data.text_path", "/no/such/*.txt"], "no text files"),
        (["plot", "/no/such/run"], "does not exist"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, corpus, run_here, capsys):
    if "BAD_YAML" in args:
        (run_here / "bad.yaml").write_text("trainer:\n  max_steps: [1, 2\nmodel: {}\n")
        args = [a.replace("BAD_YAML", str(run_here / "bad.yaml")) for a in args]
    elif args[0] == "fit" and "--data.archive" not in args:
        tiny = ["--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus)]
        args = [args[0], *tiny, *args[1:]]  # later options override the config file
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("minigpt: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (run_here / "lightning_logs").exists()  # nothing written


@pytest.mark.parametrize("command", ["fit", "prepare"])
def test_corrupt_repacked_archive_is_exactly_one_line(command, tiny_archive, run_here, capsys):
    # A copy whose checksum differs gets a notice only once it has been read: a truncated one is the
    # error alone, with no notice (nor Lightning's "Seed set to") before it.
    cut = run_here / "cut.tar.gz"
    cut.write_bytes(tiny_archive.read_bytes()[:300])
    args = ["--data.archive", str(cut)]
    if command == "fit":
        args = ["--config", str(CONFIGS / "tiny.yaml"), *args]
    with pytest.raises(SystemExit) as e:
        main([command, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("minigpt: error:") and "cut.tar.gz" in err[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint trained for a few steps by `minigpt fit` (shared by the generate tests)."""
    root = tmp_path_factory.mktemp("gen")
    corpus = write_corpus(root / "corpus.txt")
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
    first = json.loads(capsys.readouterr().out)["samples"]  # stdout is exactly one JSON object
    assert len(first) == 2 and {r["sample"] for r in first} == {0, 1}
    for r in first:
        assert r["prompt"] == "the movie was" and r["stop_reason"] in ("eos", "length")
        assert len(r["tokens"]) <= 6 and isinstance(r["text"], str) and r["tokens_per_s"] > 0
    main(args)
    again = json.loads(capsys.readouterr().out)["samples"]
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
        (["--prompt", "a", "--max_new_tokens", "0"], "max_new_tokens"),
        (["--prompt", "a", "--num_samples", "0"], "num_samples"),
        (["--prompt", "a", "--temp", "0"], "unrecognized arguments: --temp 0 (did you mean --temperature?)"),
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


# -- run folders, saved configs, quiet start -------------------------------------------------------------------
def test_default_root_dir_holds_the_run_and_last_plot_and_resume_follow_it(corpus, run_here, capsys):
    root = run_here / "runs"
    fit(corpus, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.default_root_dir", "runs")
    run = root / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*")) and not (run_here / "lightning_logs").exists()
    fit(corpus, "--trainer.max_steps", "6", "--trainer.val_check_interval", "2", "--trainer.default_root_dir", "runs",
        "--ckpt_path", "last")  # fmt: skip
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]  # resumed in place
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    capsys.readouterr()
    main(["plot", "--root", "runs", "--out", "curves.png"])
    assert (run_here / "curves.png").stat().st_size > 10_000
    # the last lines of fit say where the run is and what to do next
    fit(corpus, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.default_root_dir", "runs")
    tail = capsys.readouterr().err.strip().splitlines()[-5:]
    assert tail[0].startswith("run ") and "runs/lightning_logs/version_1" in tail[0]
    assert [line.split()[0] for line in tail] == ["run", "generate", "evaluate", "resume", "tensorboard"]
    assert "--ckpt_path runs/lightning_logs/version_1/checkpoints/last.ckpt" in tail[1]
    assert "tensorboard --logdir runs/lightning_logs" in tail[4]


def test_printed_config_and_saved_config_re_run(corpus, run_here, capsys):
    tiny = ["--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus),
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2"]  # fmt: skip
    with warnings.catch_warnings(record=True) as record, pytest.raises(SystemExit) as e:
        warnings.simplefilter("always")
        main(["fit", *tiny, "--print_config"])
    assert e.value.code == 0
    assert not [w for w in record if "serialize" in str(w.message)]  # every value can be written back
    printed = capsys.readouterr().out
    assert "plugins" not in yaml.safe_load(printed)["trainer"] or not yaml.safe_load(printed)["trainer"]["plugins"]
    (run_here / "c.yaml").write_text(printed)
    main(["fit", "--config", "c.yaml", "--trainer.default_root_dir", "a"])
    saved = run_here / "a" / "lightning_logs" / "version_0" / "config.yaml"
    assert saved.is_file()
    main(["fit", "--config", str(saved), "--trainer.default_root_dir", "b"])
    assert (run_here / "b" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_trainer_writes_checkpoints_atomically_without_it_in_the_config(corpus):
    cli = MiniGPTCLI(
        LitMiniGPT, IMDBDataModule, run=False,
        args=["--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus)],
    )  # fmt: skip
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not cli.config["trainer"].get("plugins")


def test_quiet_start_early_validation_progress_lines_and_one_lr_curve(corpus, run_here, capsys, caplog):
    fit(corpus, "--trainer.max_steps", "12", "--trainer.val_check_interval", "10", "--early_validation.step", "3",
        "--trainer.log_every_n_steps", "2")  # fmt: skip
    run = run_here / "lightning_logs" / "version_0"
    scalars = read_scalars(run)
    # early, then the regular interval (not 6, 9)
    assert [s for s, _ in scalars["val_loss"]] == [3, 10]
    assert "hp_metric" not in scalars
    lr_tags = [t for t in scalars if t.startswith("lr")]
    assert lr_tags == ["lr"]  # AdamW's two groups share one rate: one curve
    # stdout is not a terminal here: plain progress lines instead of a bar
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 2/12  epoch 0  train_loss ") and lines[-1].startswith("step 12/12 ")
    for line in lines:
        assert all(word in line for word in ("tok/s", "elapsed", "eta"))
    assert "Tip:" not in caplog.text


def test_last_progress_line_names_the_epoch_of_the_last_step(corpus, run_here, capsys):
    # 7 steps of a longer epoch, no logging step before the end: the line printed when training ends
    # must not say epoch 1 (Lightning has counted the stopped epoch as done by then).
    fit(corpus, "--trainer.max_steps", "7", "--trainer.log_every_n_steps", "50")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 1 and lines[0].startswith("step 7/7  epoch 0  ")
    # and TensorBoard's training curve ends at that step, with the loss the line shows
    (logged,) = read_scalars(run_here / "lightning_logs" / "version_0")["train_loss"]
    assert logged[0] == 7 and f"train_loss {logged[1]:.4f} " in lines[0]


def test_progress_log_every_n_steps_or_30_s_whichever_is_later():
    from types import SimpleNamespace

    from minigpt.callbacks import ProgressLog

    clock = [0.0]
    cb = ProgressLog(interval_s=30)
    printed = []
    cb._print = lambda trainer, step, now: (printed.append(step), setattr(cb, "_last_step", step),
                                            setattr(cb, "_last_time", now))  # fmt: skip
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=5, world_size=1, current_epoch=0)
    import minigpt.callbacks as callbacks

    real = callbacks.time.monotonic
    callbacks.time.monotonic = lambda: clock[0]
    try:
        cb.on_train_start(trainer, None)
        for step in range(1, 41):
            trainer.global_step, clock[0] = step, step * 2.0  # 2 s per step: 5 steps = 10 s < 30 s
            cb.on_train_batch_end(trainer, None, None, (torch.zeros(2, 3),), step)
    finally:
        callbacks.time.monotonic = real
    assert printed == [5, 20, 35]  # first logging step, then every 30 s (15 steps), never more often


def test_progress_bar_shows_the_version():
    from minigpt.callbacks import ProgressBar

    class Bar(ProgressBar):
        def get_metrics(self, trainer, pl_module):
            return super().get_metrics(trainer, pl_module)

    import lightning.pytorch.callbacks.progress.tqdm_progress as tqdm_progress

    base = tqdm_progress.TQDMProgressBar.get_metrics
    tqdm_progress.TQDMProgressBar.get_metrics = lambda self, t, m: {"v_num": 3, "train_loss": "1.0"}
    try:
        assert Bar().get_metrics(None, None) == {"version": 3, "train_loss": "1.0"}
    finally:
        tqdm_progress.TQDMProgressBar.get_metrics = base


# -- commands --------------------------------------------------------------------------------------------------
def test_fit_and_evaluate_keep_freed_memory_once_the_data_is_ready(corpus, run_here, tiny_ckpt, monkeypatch):
    import minigpt.callbacks as callbacks
    import minigpt.commands.evaluate as evaluate

    calls = []
    monkeypatch.setattr(callbacks, "keep_freed_memory", lambda: calls.append("fit"))
    monkeypatch.setattr(evaluate, "keep_freed_memory", lambda: calls.append("evaluate"))
    fit(corpus, "--trainer.max_steps", "2")
    assert calls == ["fit"]  # once, from the callback's setup, which Lightning calls after prepare_data
    main(["evaluate", "--ckpt_path", str(tiny_ckpt), "--max_docs", "2"])
    assert calls == ["fit", "evaluate"]


def test_evaluate_without_split_picks_one_the_data_has_and_says_which(tiny_ckpt, capsys):
    main(["evaluate", "--ckpt_path", str(tiny_ckpt), "--max_docs", "3", "--json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is exactly one JSON object
    assert result["data"] == "text val" and result["documents"] == 3
    assert "evaluating the val split" in captured.err and "--archive" in captured.err
    assert "--data." not in captured.err  # hints name evaluate's own flags
    with pytest.raises(SystemExit):
        main(["evaluate", "--ckpt_path", str(tiny_ckpt), "--split", "test"])
    err = capsys.readouterr().err
    assert "--archive" in err and "--data." not in err


def test_evaluate_without_split_uses_test_of_the_official_archive(tiny_archive, run_here, capsys):
    main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.archive", str(tiny_archive),
          "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    capsys.readouterr()
    main(["evaluate", "--ckpt_path", str(run_here / "lightning_logs/version_0/checkpoints/last.ckpt"), "--json"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["data"] == "imdb test" and "evaluating the test split" in captured.err


def test_evaluate_reads_the_unsup_reviews_as_the_run_resolved_them(tiny_archive):
    from minigpt.commands.evaluate import corpus_spec

    def spec(resolved):
        data = {"source": "auto", "include_unsup": "auto", "resolved_include_unsup": resolved}
        return corpus_spec({"minigpt": {"data": data}}, str(tiny_archive))[0]

    # trained on the bundled reviews (auto: without them), scored on the archive: the same training text
    assert (spec(False).source, spec(False).include_unsup) == ("imdb", False)
    assert spec(True).include_unsup is True


def test_prepare_shows_the_default_recipe_or_the_given_config(corpus, tmp_path, capsys):
    text = ["--data.source", "text", "--data.text_path", str(corpus)]
    main(["prepare", *text, "--json"])
    summary = json.loads(capsys.readouterr().out)
    recipe = yaml.safe_load((CONFIGS / "imdb.yaml").read_text())["data"]
    assert (summary["block_size"], summary["sampling"]) == (recipe["block_size"], recipe["sampling"])
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {"max_steps": 3}, "data": {"block_size": 7, "sampling": "random"}}))
    main(["prepare", "--config", str(cfg), *text, "--data.batch_size", "5", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert (summary["block_size"], summary["sampling"], summary["batch_size"]) == (7, "random", 5)


def test_generate_asks_for_prompts_on_a_terminal_and_loads_the_model_once(tiny_ckpt, monkeypatch, capsys):
    import minigpt.commands.generate as gen

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    loads = []
    real = gen.load_model
    monkeypatch.setattr(gen, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    monkeypatch.setattr(sys, "stdin", Terminal("the movie was\n\n   \na film\n"))  # then Ctrl-D (end of input)
    main(["generate", "--ckpt_path", str(tiny_ckpt), "--max_new_tokens", "3", "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.count("prompt> ") == 5 and "the movie was " in out and "a film " in out and loads == [1]

    class CtrlC(Terminal):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", CtrlC())
    main(["generate", "--ckpt_path", str(tiny_ckpt)])  # ends cleanly, no SystemExit


def test_generate_reads_prompts_from_stdin(tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the movie was\n\na film\n"))
    main(["generate", "--ckpt_path", str(tiny_ckpt), "--prompt_file", "-", "--max_new_tokens", "3", "--json"])
    assert [r["prompt"] for r in json.loads(capsys.readouterr().out)["samples"]] == ["the movie was", "a film"]


def test_generate_never_pad_and_unk_only_when_allowed(tiny_ckpt, tmp_path, capsys):
    from minigpt.checkpoint import tokenizer_of

    ckpt = torch.load(tiny_ckpt, weights_only=True)
    tok = tokenizer_of(ckpt)
    head = ckpt["state_dict"]["model.lm_head.bias"]
    ckpt["state_dict"]["model.lm_head.weight"].zero_()
    head.zero_()
    head[tok.pad_index], head[tok.unk_index], head[tok.stoi["movie"]] = 30.0, 20.0, 10.0  # pad > unk > a word
    path = tmp_path / "unk.ckpt"
    torch.save(ckpt, path)
    args = ["generate", "--ckpt_path", str(path), "--prompt", "the", "--max_new_tokens", "4", "--temperature", "0"]
    main(args)
    assert capsys.readouterr().out.strip() == "the movie movie movie movie"
    main([*args, "--allow_unk"])
    assert capsys.readouterr().out.strip() == "the <unk> <unk> <unk> <unk>"


def test_only_user_errors_are_one_line_and_minigpt_debug_shows_the_traceback(monkeypatch, capsys):
    import minigpt.commands.plot as plot_command

    def broken(**kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(plot_command, "plot", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["plot"])
    monkeypatch.setenv("MINIGPT_DEBUG", "1")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ckpt_path", "/no/such.ckpt", "--prompt", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("minigpt: error: checkpoint /no/such.ckpt")


def test_generate_and_evaluate_never_import_lightning_or_transformers(tiny_ckpt, corpus):
    code = f"""
import sys
from minigpt.cli import main
main(["--help"])
assert "torch" not in sys.modules, "--help imported torch"
main(["generate", "--ckpt_path", {str(tiny_ckpt)!r}, "--prompt", "the movie", "--max_new_tokens", "3"])
main(["evaluate", "--ckpt_path", {str(tiny_ckpt)!r}, "--text_file", {str(corpus)!r}, "--max_docs", "2"])
main(["evaluate", "--ckpt_path", {str(tiny_ckpt)!r}, "--max_docs", "2"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "transformers"))
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("bits/char") == 2


def test_tests_run_with_a_temporary_home_and_data_cache(tiny_ckpt, _isolated_home):
    home, session_cache = _isolated_home
    assert Path(os.environ["HOME"]) == home and Path(os.environ["MINIGPT_CACHE"]) != session_cache  # per test
    assert any(session_cache.iterdir())  # the module-scoped fixture's data went to the session cache
    assert not (home / ".cache" / "minigpt").exists()


def test_license_matches_pyproject():
    project = (ROOT / "pyproject.toml").read_text()
    assert 'license = "MIT"' in project
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_checkpoint_files_get_normal_permissions(tmp_path):
    from minigpt.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == 0o644


def test_a_terminal_keeps_its_progress_bar(corpus, run_here, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus),
          "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])  # fmt: skip
    shown = screen.getvalue()
    assert "version" in shown and "v_num" not in shown  # the bar, naming the run's version
    assert not [line for line in shown.splitlines() if line.startswith("step ")]  # no plain progress lines


def load_script(name: str):
    """scripts/NAME.py as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture
def quality_script():
    """scripts/quality_vs_minutes.py as a module."""
    return load_script("quality_vs_minutes")


@pytest.fixture
def levers_script(quality_script, monkeypatch):
    """scripts/levers.py as a module (it imports its sibling script by name, as `python scripts/levers.py` does)."""
    monkeypatch.setitem(sys.modules, "quality_vs_minutes", quality_script)
    return load_script("levers")


@pytest.fixture
def step_cost_script(levers_script, monkeypatch):
    """scripts/step_cost.py as a module (it imports its sibling scripts by name)."""
    monkeypatch.setitem(sys.modules, "levers", levers_script)
    return load_script("step_cost")


@pytest.fixture
def attention_script(quality_script, monkeypatch):
    """scripts/bench_attention.py as a module (it imports its sibling script by name)."""
    monkeypatch.setitem(sys.modules, "quality_vs_minutes", quality_script)
    return load_script("bench_attention")


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_every_lever_changes_the_recipe_where_it_says(levers_script, capsys):
    # A lever whose options left the recipe as it is would measure nothing: each must change exactly the
    # settings it names.
    def settings(options):
        with pytest.raises(SystemExit):
            main(["fit", "--config", "imdb", *options, "--print_config"])
        return flatten(yaml.safe_load(capsys.readouterr().out))

    recipe = settings([])
    for name, (what, options) in levers_script.LEVERS.items():
        changed = {k for k, v in settings(options).items() if recipe.get(k) != v}
        flags = [flag.removeprefix("--") for flag in options[::2]]
        # `--trainer.callbacks+ CLASS` appends to a list, and the options after it set that entry's arguments.
        appended = {flag.removesuffix("+") for flag in flags if flag.endswith("+")}
        named = {next((a for a in appended if flag.startswith(a)), flag) for flag in flags}
        assert changed == named, (name, what)


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "minigpt", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "minigpt" in out.stdout and "fit" in out.stdout


def test_quality_script_reruns_a_command_whose_config_file_changed(quality_script, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model:\n  lr: 0.01\n")
    command = ["python", "-m", "minigpt", "fit", "--config", str(config), "--trainer.max_time", "00:00:01:00"]
    before = quality_script.config_digests(command)
    assert list(before) == [str(config)]
    config.write_text("model:\n  lr: 0.02\n")
    assert quality_script.config_digests(command) != before


def test_quality_script_scores_the_headline_and_longer_budgets_on_the_whole_split(quality_script):
    whole = {(recipe, minutes) for recipe in quality_script.RECIPES for minutes in (1, 5, 10, 30)
             if quality_script.scored_whole(recipe, minutes)}  # fmt: skip
    assert whole == {("imdb", 10), ("imdb", 30)}


def test_quality_script_plots_what_its_runs_measured(quality_script, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = []  # the figure as it is written to the file
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), original(fig, *a, **k))[1])
    rows = [{"minutes": m, "seed": 42, "test": {"bits_per_character": 2.0 / m}} for m in (1, 2, 5, 10)]
    rows.append({"minutes": 10, "seed": 1, "test": {"bits_per_character": 9.0}})  # another seed: not in the curve
    other = [{"minutes": m, "seed": 42, "test": {"bits_per_character": 3.0 - m / 10}} for m in (1, 2)]
    out = tmp_path / "q.png"
    quality_script.plot({"imdb": rows, "seed": other}, out, max_docs=1000)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(saved) == 1
    curves = {line.get_label(): line.get_xydata().tolist() for line in saved[0].axes[0].get_lines()}
    assert curves == {quality_script.RECIPES["imdb"]: [[1, 2.0], [2, 1.0], [5, 0.4], [10, 0.2]],
                      quality_script.RECIPES["seed"]: [[1, 2.9], [2, 2.8]]}  # fmt: skip


def test_step_cost_times_the_recipe_against_the_lever_taken_out(step_cost_script, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(step_cost_script, "should_compile", lambda *args, **kwargs: False)  # seconds, not the point
    out = tmp_path / "cost.json"
    options = ["--levers", "no_bigram", "--rounds", "1", "--vocab_size", "2000", "--json", str(out)]
    report = step_cost_script.main(options)
    rows = {row["lever"]: row for row in report["rows"]}
    assert list(rows) == ["recipe", "no_bigram"] and json.loads(out.read_text()) == report
    # The contenders are the recipe and the recipe without its bigram table (rows and projection).
    assert rows["recipe"]["parameters"] - rows["no_bigram"]["parameters"] == 65536 * 64 + 64 * 160
    assert rows["recipe"]["of_recipe"] == 1.0 and rows["no_bigram"]["ms_per_step"] > 0
    assert "no_bigram" in capsys.readouterr().out


def test_step_cost_times_a_second_build_of_the_recipe_as_a_control(step_cost_script, monkeypatch):
    monkeypatch.setattr(step_cost_script, "should_compile", lambda *args, **kwargs: False)
    report = step_cost_script.main(["--levers", "recipe_again", "--rounds", "1", "--vocab_size", "2000"])
    rows = {row["lever"]: row for row in report["rows"]}
    assert list(rows) == ["recipe", "recipe_again"]  # two contenders, not the recipe once
    assert rows["recipe_again"]["parameters"] == rows["recipe"]["parameters"]
    assert rows["recipe_again"]["ms_per_step"] > 0


def test_step_cost_starts_each_round_with_the_next_contender(step_cost_script, monkeypatch):
    # In a fixed order the first contender's steps time slower: every contender goes first as often.
    turns = []
    monkeypatch.setattr(step_cost_script, "should_compile", lambda *args, **kwargs: False)
    monkeypatch.setattr(step_cost_script.Contender, "step", lambda self, x, y: turns.append(self) or 0.001)
    monkeypatch.setattr(step_cost_script, "WARMUP_ROUNDS", 0)
    step_cost_script.main(["--levers", "no_bigram", "bigram16k", "--rounds", "3", "--vocab_size", "2000"])
    firsts = turns[::3]
    assert len(turns) == 9 and len(set(map(id, firsts))) == 3  # three rounds, each begun by another contender
    assert all(len(set(map(id, turns[i : i + 3]))) == 3 for i in (0, 3, 6))  # every contender steps once a round


@pytest.mark.parametrize("precision, autocast", [("bf16-mixed", True), ("32-true", False)])
def test_step_cost_computes_the_loss_in_the_recipes_precision(step_cost_script, precision, autocast, monkeypatch):
    # `minigpt fit` trains in bf16-mixed on a CPU with native bf16: a step timed in float32 there would not
    # be the step the runs take.
    cfg = step_cost_script.recipe("tiny", [])
    cfg["trainer"]["precision"] = precision
    contender = step_cost_script.Contender(cfg, vocab_size=50)
    loss, seen = contender.module.model.loss_sum_and_count, []
    monkeypatch.setattr(contender.module.model, "loss_sum_and_count",
                        lambda x, y: (seen.append(torch.is_autocast_enabled("cpu")), loss(x, y))[1])  # fmt: skip
    tokens = torch.randint(0, 50, (2, 8))
    assert contender.step(tokens, tokens) > 0 and seen == [autocast]


def test_bench_attention_times_the_three_ways_and_names_the_models_choice(attention_script, tmp_path, capsys):
    out, limit = tmp_path / "attention.json", CPU_SHORT_ATTENTION_MAX_KEYS
    options = ["--lengths", str(limit), str(2 * limit), "--tokens", str(2 * limit), "--heads", "1", "--head_size", "4",
               "--rounds", "1", "--json", str(out)]  # fmt: skip
    report = attention_script.main(options)
    assert json.loads(out.read_text()) == report
    assert [(row["length"], row["batch"], row["model_runs"]) for row in report["rows"]] == [
        (limit, 2, "matrix"), (2 * limit, 1, "bfloat16")]  # fmt: skip
    assert all(row[f"{name}_ms"] > 0 for row in report["rows"] for name in ("bfloat16", "float32", "matrix"))
    assert "the model runs matrix" in capsys.readouterr().out


def test_bench_attention_refuses_a_length_that_does_not_divide_the_batch(attention_script, capsys):
    with pytest.raises(SystemExit) as e:
        attention_script.main(["--lengths", "64", "100"])
    assert e.value.code == 2 and "divide --tokens 4096" in capsys.readouterr().err


@pytest.mark.parametrize("setting, compiled", [(True, True), ("auto", True), (False, False)])
def test_step_cost_compiles_the_blocks_where_fit_would(step_cost_script, monkeypatch, setting, compiled):
    cfg = step_cost_script.recipe("tiny", [])
    cfg["model"]["compile"] = setting
    monkeypatch.setattr("minigpt.lit_module.can_compile", lambda device: True)
    calls = []
    monkeypatch.setattr("minigpt.model.GPT.compile_parts", lambda model, **options: calls.append(options))
    step_cost_script.Contender(cfg, vocab_size=50)
    assert calls == ([{"dynamic": False}] if compiled else [])


def test_step_cost_refuses_a_lever_that_is_not_about_the_model(step_cost_script, capsys):
    with pytest.raises(SystemExit) as e:
        step_cost_script.main(["--levers", "block64"])
    assert e.value.code == 2 and "measure it with scripts/levers.py" in capsys.readouterr().err
