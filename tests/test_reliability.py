"""Crash and resume, Ctrl-C, non-finite loss, atomic checkpoints: `minigpt fit` as a real process."""

import errno
import math
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from minigpt.checkpoint import save_checkpoint
from minigpt.checkpointing import AtomicCheckpointIO
from minigpt.cli import main
from minigpt.data.datamodule import IMDBDataModule
from minigpt.errors import UserError
from minigpt.plot import read_scalars

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MINIGPT = [sys.executable, "-m", "minigpt.cli"]


def fit_args(corpus, *extra):
    return [*MINIGPT, "fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text",
            "--data.text_path", str(corpus), "--trainer.enable_progress_bar", "false",
            "--model.config.dropout", "0.1", *extra]  # fmt: skip


def run(args, cwd, **kw):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, **kw)


def last_step(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, weights_only=True)["global_step"])
    except Exception:  # being replaced right now
        return -1


def batches_per_epoch(corpus) -> int:
    """Training batches per epoch of `fit_args(corpus)` (tiny.yaml's data on the corpus)."""
    data = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())["data"]
    dm = IMDBDataModule(**data, source="text", text_path=str(corpus))
    dm.setup("fit")
    return len(dm.train_dataloader())


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(corpus, tmp_path):
    # Checkpoints every `every` steps, and the run ends before any of them falls on an epoch's end
    # (their least common multiple): wherever the kill lands, it resumes from the middle of an epoch.
    per_epoch = batches_per_epoch(corpus)
    every = next(k for k in (5, 4, 3) if per_epoch % k)
    max_steps = math.lcm(every, per_epoch) - 1
    assert max_steps >= 4 * every, (per_epoch, every)
    common = ("--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "8",
              "--checkpoint.every_n_train_steps", str(every))  # fmt: skip
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    assert run(fit_args(corpus, *common), straight).returncode == 0

    proc = subprocess.Popen(fit_args(corpus, *common), cwd=crashed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = crashed / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and last_step(ckpt) < 2 * every:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_step(ckpt)
    assert 2 * every <= killed_at < max_steps and killed_at % per_epoch != 0  # true by construction

    resumed = run(fit_args(corpus, *common, "--ckpt_path", "last"), crashed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(straight / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["global_step"] == b["global_step"] == max_steps
    for name, value in a["state_dict"].items():
        assert torch.allclose(value, b["state_dict"][name], atol=1e-6), name
    for tag in ("val_loss", "train_loss"):  # one continuous curve each, the same points as the straight run's
        va = read_scalars(straight / "lightning_logs/version_0")[tag]
        vb = read_scalars(crashed / "lightning_logs/version_0")[tag]
        assert [s for s, _ in va] == [s for s, _ in vb], tag
        assert [v for _, v in va] == pytest.approx([v for _, v in vb], abs=1e-5), tag
    assert sorted(p.name for p in (crashed / "lightning_logs").iterdir()) == ["version_0"]


def _fit_until_validated(args, cwd: Path, err_file: Path, after_step: int) -> str:
    """Run `minigpt fit`, press Ctrl-C once it has validated after `after_step`; return its stderr."""
    with open(err_file, "w") as err:
        proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            steps = [int(m) for m in re.findall(r"step (\d+): val_loss", err_file.read_text())]
            if any(s > after_step for s in steps):
                break
            time.sleep(0.1)
        assert proc.poll() is None, err_file.read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    text = err_file.read_text()
    assert proc.returncode == 0, text[-2000:]
    return text


def test_ctrl_c_twice_keeps_one_last_checkpoint_and_the_best_files_rotate(corpus, tmp_path):
    long_run = ("--trainer.max_steps", "100000", "--trainer.max_epochs", "100000", "--trainer.val_check_interval", "5")
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    first = _fit_until_validated(fit_args(corpus, *long_run), tmp_path, tmp_path / "err1", 0)
    assert not re.search(r"warning|tip:", first.replace("Ctrl-C", ""), re.IGNORECASE)  # a quiet start
    step = last_step(folder / "last.ckpt")
    assert step > 0
    # The line saying where the checkpoint is comes once it is final: after the validation Lightning runs
    # when a run stops (which may write last.ckpt again), naming the step the file holds.
    lines = first.splitlines()
    saved = [i for i, line in enumerate(lines) if line.startswith("saved ")]
    validated = [i for i, line in enumerate(lines) if f"step {step}: val_loss" in line]
    assert len(saved) == 1 and validated and saved[0] > validated[-1], first[-2000:]
    assert f"last.ckpt (step {step}); resume with: minigpt fit ... --ckpt_path last" in lines[saved[0]]
    second = _fit_until_validated(fit_args(corpus, *long_run, "--ckpt_path", "last"), tmp_path, tmp_path / "err2", step)
    assert "exists and is not empty" not in second
    assert last_step(folder / "last.ckpt") > step
    names = sorted(p.name for p in folder.iterdir())
    # one last.ckpt (no last-v1.ckpt) and at most save_top_k (1) best file: the old one was rotated out
    assert names[-1] == "last.ckpt" and len(names) == 2 and names[0].startswith("best-"), names
    assert stat.S_IMODE((folder / "last.ckpt").stat().st_mode) == 0o666 & ~_umask()
    step = last_step(folder / "last.ckpt")
    more = ("--trainer.max_epochs", "100000", "--trainer.max_steps", str(step + 3), "--ckpt_path", "last")
    resumed = run(fit_args(corpus, *more), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert last_step(folder / "last.ckpt") == step + 3, resumed.stderr[-3000:]
    assert [p.name for p in folder.iterdir() if not p.name.startswith("best-")] == ["last.ckpt"]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _disk_full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_checkpoint_write_is_a_user_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    save_checkpoint({"w": torch.ones(3)}, target)
    before = target.read_bytes()
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(UserError, match=r"no space left on the device to write .*last\.ckpt \(it needs [\d.]+ MB"):
        save_checkpoint({"w": torch.zeros(1000)}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_full_disk_during_fit_is_one_line_exit_2(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = fit_args(corpus, "--trainer.val_check_interval", "2")[len(MINIGPT) :]
    main([*tiny, "--trainer.max_steps", "2"])
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    before = (folder / "last.ckpt").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(SystemExit) as e:
        main([*tiny, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("minigpt: error: no space left on the device to write ") and " MB" in last
    assert (folder / "last.ckpt").read_bytes() == before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    # lr 1e6: the first Adam step moves every weight by ~1e6 (finite, saved), the next loss is not finite.
    # --checkpoint.monitor null: save every step even before the first validation.
    args = fit_args(corpus, "--trainer.max_steps", "200", "--checkpoint.every_n_train_steps", "1",
                    "--checkpoint.monitor", "null", "--model.lr", "1e6",
                    "--trainer.gradient_clip_val", "null")  # fmt: skip
    result = run(args, tmp_path)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("minigpt: error: training stopped:") and "at step" in last_line
    ckpt = torch.load(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_corrupt_checkpoint_is_one_line(corpus, tmp_path, command):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    args = [*MINIGPT, command, "--ckpt_path", str(bad)]
    if command == "fit":
        args = fit_args(corpus, "--ckpt_path", str(bad))
    result = run(args, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("minigpt: error:") and str(bad) in lines[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "lightning_logs").exists()


def test_atomic_checkpoint_io_never_leaves_a_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"w": torch.zeros(1000)}, target)
    assert target.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_two_process_ddp_trains_on_disjoint_samples_and_resumes(corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    common = ("--data.sampling", "packed", "--trainer.val_check_interval", "3", "--model.config.dropout", "0.0")
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    probe = ("--trainer.callbacks+=ddp_probe.RecordBatches", f"--trainer.callbacks.out_dir={tmp_path / 'batches'}")
    (tmp_path / "ddp").mkdir(), (tmp_path / "single").mkdir()
    result = run(fit_args(corpus, *common, *ddp, *probe, "--trainer.max_steps", "6"), tmp_path / "ddp", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "batches" / f"rank{r}.pt") for r in (0, 1))
    assert len(r0) == len(r1) == 6
    blocks0 = {tuple(row.tolist()) for b in r0[:3] for row in b}  # the first three steps of each rank
    blocks1 = {tuple(row.tolist()) for b in r1[:3] for row in b}
    assert blocks0 and not blocks0 & blocks1  # each process sees different samples
    assert result.stderr.count("val_loss") == 2  # one summary line per validation, from rank 0 only

    # the same global batch (2 x 8) in one process reaches about the same loss
    single = run(fit_args(corpus, *common, "--data.batch_size", "16", "--trainer.max_steps", "6"), tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    v_ddp = read_scalars(tmp_path / "ddp/lightning_logs/version_0")["val_loss"][-1][1]
    v_single = read_scalars(tmp_path / "single/lightning_logs/version_0")["val_loss"][-1][1]
    assert v_ddp == pytest.approx(v_single, abs=0.25)

    # and a DDP checkpoint resumes under DDP
    resumed = run(fit_args(corpus, *common, *ddp, "--trainer.max_steps", "9", "--ckpt_path", "last"), tmp_path / "ddp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_step(tmp_path / "ddp/lightning_logs/version_0/checkpoints/last.ckpt") == 9


def test_a_saved_config_starts_a_new_run_after_ctrl_c_and_resume(corpus, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    long_run = ("--trainer.max_steps", "100000", "--trainer.val_check_interval", "5")
    err = _fit_until_validated(fit_args(corpus, *long_run, "--trainer.default_root_dir", str(old)), tmp_path,
                               tmp_path / "err1", 0)  # fmt: skip
    run_dir = old / "lightning_logs" / "version_0"
    step = last_step(run_dir / "checkpoints" / "last.ckpt")
    # resume with the command the run printed, for two more steps
    printed = next(line for line in err.splitlines() if line.startswith("resume "))
    resume = shlex.split(printed)[1:]  # minigpt fit --config .../config.yaml --ckpt_path .../last.ckpt
    assert resume[:3] == ["minigpt", "fit", "--config"] and Path(resume[3]) == run_dir / "config.yaml"
    assert resume[4:] == ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    resumed = run([*MINIGPT, *resume[1:], "--trainer.max_steps", str(step + 2)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert last_step(run_dir / "checkpoints" / "last.ckpt") == step + 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["ckpt_path"] is None  # never saved

    config = (run_dir / "config.yaml").read_bytes()
    files = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    again = run([*MINIGPT, "fit", "--config", str(run_dir / "config.yaml"), "--trainer.default_root_dir", str(new),
                 "--trainer.max_steps", "2"], tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert last_step(new / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt") == 2  # a new run, here
    assert (run_dir / "config.yaml").read_bytes() == config  # the old run is untouched
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == files
    assert sorted(p.name for p in (old / "lightning_logs").iterdir()) == ["version_0"]


def test_a_finished_run_extended_with_more_steps_equals_one_longer_run(corpus, tmp_path):
    # The first run stops in the middle of an epoch (max_steps): its last.ckpt must hold that data position,
    # so the extension trains on the same batches, to the same weights, as one 6-step run.
    assert batches_per_epoch(corpus) > 3
    common = fit_args(corpus, "--model.scheduler", "constant")[len(MINIGPT) :]
    main([*common, "--trainer.default_root_dir", str(tmp_path / "straight"), "--trainer.max_steps", "6"])
    extended = ["--trainer.default_root_dir", str(tmp_path / "extended")]
    main([*common, *extended, "--trainer.max_steps", "3"])
    main([*common, *extended, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    a, b = (torch.load(tmp_path / run / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
            for run in ("straight", "extended"))  # fmt: skip
    assert a["global_step"] == b["global_step"] == 6
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
