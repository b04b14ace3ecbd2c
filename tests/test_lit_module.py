import io
import math
import pickle
import types
import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from minigpt.checkpoint import load_model, read_checkpoint
from minigpt.config import GPTConfig
from minigpt.data.datamodule import IMDBDataModule
from minigpt.lit_module import LitMiniGPT, is_logging_step
from minigpt.model import lm_loss
from minigpt.tokenizer import IGNORE_INDEX


class RecordBatches(Callback):
    def __init__(self):
        self.batches, self.val_losses = [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0].clone())

    def on_validation_end(self, trainer, pl_module):  # after the module's epoch-end logging
        if not trainer.sanity_checking:
            self.val_losses[trainer.global_step] = float(trainer.callback_metrics["val_loss"])


def make(tiny_corpus, tmp_path, optimizer="adamw", **model_kw):
    dm = IMDBDataModule(source="text", text_path=str(tiny_corpus), block_size=8, batch_size=4, val_fraction=0.2)
    cfg = GPTConfig.tiny(vocab_size=dm.vocab_size, block_size=8, dropout=0.1)
    return dm, LitMiniGPT(cfg, optimizer=optimizer, lr=3e-3, scheduler="constant", **model_kw)


@pytest.fixture
def tiny_corpus(tmp_path):
    from conftest import review

    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(review(i, 10 + (i % 7) * 3) for i in range(48)))
    return p


def trainer(tmp_path, max_steps, callbacks, **kw):
    settings = dict(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        limit_val_batches=3,
        num_sanity_val_steps=0,
        gradient_clip_val=0.5,
    )
    return Trainer(**(settings | kw))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_mid_epoch_is_exact(tiny_corpus, tmp_path, optimizer):
    # straight: 2k steps
    seed_everything(1)
    dm, lit = make(tiny_corpus, tmp_path, optimizer)
    dm.setup("fit")
    steps_per_epoch = len(dm.train_dataloader())
    k = steps_per_epoch + 3  # stop in the middle of the second epoch
    straight = RecordBatches()
    trainer(tmp_path / "a", 2 * k, [straight]).fit(lit, datamodule=dm)
    w_straight = {n: p.detach().clone() for n, p in lit.named_parameters()}

    # interrupted: k steps, checkpoint, then a new process-like start that resumes to 2k
    seed_everything(1)
    dm, lit = make(tiny_corpus, tmp_path, optimizer)
    first = RecordBatches()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, every_n_train_steps=k, save_top_k=0)
    trainer(tmp_path / "b", k, [first, ckpt]).fit(lit, datamodule=dm)
    seed_everything(123)  # the resumed process starts from a different random state
    dm, lit = make(tiny_corpus, tmp_path, optimizer)
    second = RecordBatches()
    trainer(tmp_path / "b", 2 * k, [second]).fit(lit, datamodule=dm, ckpt_path=str(tmp_path / "b" / "last.ckpt"))

    resumed = first.batches + second.batches
    assert len(resumed) == len(straight.batches) == 2 * k
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight.batches))  # identical batch order
    assert {**first.val_losses, **second.val_losses}.keys() == straight.val_losses.keys()
    for step, loss in straight.val_losses.items():
        assert {**first.val_losses, **second.val_losses}[step] == pytest.approx(loss, abs=1e-6)
    for n, p in lit.named_parameters():
        assert torch.allclose(p, w_straight[n], atol=1e-6), n


def test_epoch_perplexity_is_exp_of_token_mean_not_mean_of_batch_ppl(tiny_corpus, tmp_path):
    dm, lit = make(tiny_corpus, tmp_path)
    t = trainer(tmp_path, 1, [])
    (metrics,) = t.validate(lit, datamodule=dm, verbose=False)
    total, count, batch_ppls = 0.0, 0, []
    lit.eval()
    with torch.no_grad():
        for x, y in list(dm.val_dataloader())[:3]:
            logits = lit(x)
            n = int((y != IGNORE_INDEX).sum())
            loss = float(lm_loss(logits, y, ignore_index=IGNORE_INDEX))
            total, count = total + loss * n, count + n
            batch_ppls.append(math.exp(loss))
    assert metrics["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert metrics["val_tokens"] == count


def test_checkpoint_generates_without_data_and_loads_weights_only(tiny_corpus, tmp_path):
    dm, lit = make(tiny_corpus, tmp_path)
    t = trainer(tmp_path, 3, [])
    t.fit(lit, datamodule=dm)
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # no pickled objects inside
    assert ckpt["minigpt"]["tokenizer"]["itos"] == dm.vocab.itos
    again = LitMiniGPT.load_from_checkpoint(path)  # no data module anywhere
    assert again.tokenizer.itos == dm.vocab.itos
    for (n, p), q in zip(lit.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n
    model, vocab = load_model(str(path))
    assert model.config == lit.config and len(vocab) == lit.config.vocab_size


class NotATensor:
    pass


def _torch_file(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


SAVED = _torch_file({"state_dict": {"w": torch.ones(3)}, "hyper_parameters": {}})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"^checkpoint \S+x\.ckpt does not exist$"),
        ("folder", r"^checkpoint \S+x\.ckpt is a folder; pass a \.ckpt file written by minigpt fit \(e\.g\. "),
        (b"", r"^checkpoint \S+x\.ckpt is empty \(0 bytes\)$"),
        (b"# README\n", r"x\.ckpt is not a PyTorch checkpoint \(it is not a zip or pickle file\); pass a \.ckpt file"),
        (b"\x00garbage", r"x\.ckpt is not a PyTorch checkpoint \(it is not a zip or pickle file\)"),
        (SAVED[: len(SAVED) // 2], r"x\.ckpt is truncated \(its zip archive has no end: the file was cut off while"),
        (SAVED[:-100] + bytes(100), r"x\.ckpt is truncated \(its zip archive has no end"),
        (pickle.dumps({"a": 1}), r"x\.ckpt is a pickle file that PyTorch cannot load as a checkpoint; pass a \.ckpt"),
        (_torch_file({"a": NotATensor()}), r"x\.ckpt holds Python objects besides tensors and plain values, so it is"),
        (_torch_file({"weights": torch.zeros(2)}), r"x\.ckpt is a PyTorch file but not a minigpt checkpoint \(it has"),
        (_torch_file([1, 2], _use_new_zipfile_serialization=False), r"x\.ckpt is a PyTorch file but not a minigpt"),
    ],
    ids=["missing", "folder", "empty", "text", "binary", "truncated", "cut-end", "pickle", "objects", "foreign",
         "legacy-foreign"],
)  # fmt: skip
def test_a_file_that_is_not_a_checkpoint_says_what_it_is_in_one_sentence(tmp_path, content, message):
    path = tmp_path / "x.ckpt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may come before the error line
        with pytest.raises(ValueError, match=message) as err:
            read_checkpoint(str(path))
    text = str(err.value)
    sentence = text.replace(str(path), "PATH")
    assert "\n" not in sentence and len(sentence) < 200 and sentence[-1] not in "(,:; ", sentence  # a whole sentence


def test_a_corrupt_zip_member_is_corrupt_not_truncated(tmp_path):
    # A zip whose directory is intact but whose tensor data is damaged: PyTorch fails on reading it.
    data = bytearray(SAVED)
    start = data.index(b"data.pkl") + len("data.pkl")
    data[start + 40 : start + 60] = bytes(20)
    (tmp_path / "x.ckpt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"^checkpoint \S+x\.ckpt is corrupt: it is a zip archive, but PyTorch cannot"):
        read_checkpoint(str(tmp_path / "x.ckpt"))


def test_vocab_mismatch_on_fine_tuning_is_refused(tiny_corpus, tmp_path):
    dm, lit = make(tiny_corpus, tmp_path)
    t = trainer(tmp_path, 1, [])
    t.fit(lit, datamodule=dm)
    t.save_checkpoint(tmp_path / "m.ckpt")
    other = tmp_path / "other.txt"
    other.write_text(tiny_corpus.read_text().upper().replace("THE", "A") + "\n\nzebra zebra zebra")
    dm2 = IMDBDataModule(source="text", text_path=str(other), block_size=8, batch_size=4, val_fraction=0.2)
    cfg = GPTConfig.tiny(vocab_size=dm.vocab_size, block_size=8)
    lit2 = LitMiniGPT(cfg, init_from=str(tmp_path / "m.ckpt"))
    with pytest.raises(ValueError, match="vocabulary"):
        trainer(tmp_path, 1, []).fit(lit2, datamodule=dm2)


def test_lr_schedules():
    cfg = GPTConfig.tiny()
    lit = LitMiniGPT(cfg, scheduler="cosine", lr=1.0, warmup_steps=10, decay_steps=110, min_lr=0.1)
    assert lit._lr_factor(0) == pytest.approx(0.1) and lit._lr_factor(9) == pytest.approx(1.0)
    assert lit._lr_factor(60) == pytest.approx(0.55) and lit._lr_factor(110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay_steps must be > model.warmup_steps"):
        LitMiniGPT(cfg, scheduler="cosine", warmup_steps=10, decay_steps=10)
    # warmup-stable-decay: the peak rate until the last decay_fraction of the steps after warmup, then linear.
    wsd = LitMiniGPT(cfg, scheduler="wsd", lr=1.0, warmup_steps=10, decay_steps=110, min_lr=0.1, decay_fraction=0.2)
    assert [wsd._lr_factor(s) for s in (0, 9, 10, 60, 90)] == pytest.approx([0.1, 1.0, 1.0, 1.0, 1.0])
    assert [wsd._lr_factor(s) for s in (95, 100, 110, 200)] == pytest.approx([0.775, 0.55, 0.1, 0.1])
    with pytest.raises(ValueError, match="decay_fraction must be in"):
        LitMiniGPT(cfg, scheduler="wsd", decay_fraction=0.0)
    opt = LitMiniGPT(cfg).configure_optimizers()
    assert isinstance(opt["optimizer"], torch.optim.Adam) and opt["lr_scheduler"]["interval"] == "step"
    assert isinstance(opt["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


# -- the cosine schedule follows the run's budget (decay_steps null) ---------------------------------------
class RecordLR(Callback):
    def __init__(self, clock: list[float] | None = None, stop_at: int | None = None, ckpt: str | None = None):
        self.lrs, self.clock, self.stop_at, self.ckpt = [], clock, stop_at, ckpt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.clock is not None:
            self.clock[0] += 1.0  # each step takes one second of the fake clock
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.stop_at:  # an interruption, with the same limits as the full run
            trainer.save_checkpoint(self.ckpt)
            trainer.should_stop = True


@pytest.fixture
def fake_clock(monkeypatch):
    import types

    import lightning.pytorch.callbacks.timer as timer_module

    clock = [1000.0]
    monkeypatch.setattr(timer_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    return clock


def budget_run(tiny_corpus, tmp_path, limit: str, callback: RecordLR, ckpt_path=None):
    seed_everything(3)
    dm = IMDBDataModule(source="text", text_path=str(tiny_corpus), block_size=8, batch_size=4, val_fraction=0.2)
    cfg = GPTConfig.tiny(vocab_size=dm.vocab_size, block_size=8)
    lit = LitMiniGPT(cfg, optimizer="adamw", lr=1.0, scheduler="cosine", warmup_steps=2, min_lr=0.1)
    budget = dict(max_steps=12) if limit == "max_steps" else dict(max_time={"seconds": 12})
    t = Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, **budget)  # fmt: skip
    t.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
    return t


def cosine(progress: float) -> float:
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("limit", ["max_steps", "max_time"])
def test_cosine_reaches_min_lr_when_the_budget_ends(tiny_corpus, tmp_path, limit, fake_clock):
    rec = RecordLR(clock=fake_clock)
    t = budget_run(tiny_corpus, tmp_path, limit, rec)
    assert t.global_step == 12  # 12 steps, or 12 seconds of the fake clock
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)  # min_lr after the last step
    assert rec.lrs[:3] == pytest.approx([0.5, 1.0, 1.0])  # warmup
    # Peak rate when warmup ends, then by steps: (step - warmup) / (max_steps - warmup); by time: the
    # fraction of max_time spent (one fake second per step).
    progress = [(s - 2) / 10 for s in range(3, 12)] if limit == "max_steps" else [s / 12 for s in range(3, 12)]
    progress = [0.0, *progress]
    assert rec.lrs[2:] == pytest.approx([cosine(p) for p in progress])


@pytest.mark.parametrize("limit", ["max_steps", "max_time"])
def test_resume_mid_schedule_gives_the_same_learning_rates(tiny_corpus, tmp_path, limit, fake_clock):
    straight = RecordLR(clock=fake_clock)
    budget_run(tiny_corpus, tmp_path / "a", limit, straight)
    ckpt = str(tmp_path / "mid.ckpt")
    first = RecordLR(clock=fake_clock, stop_at=5, ckpt=ckpt)
    budget_run(tiny_corpus, tmp_path / "b", limit, first)
    fake_clock[0] += 500.0  # the resumed process starts later: only the time spent training counts
    second = RecordLR(clock=fake_clock)
    t = budget_run(tiny_corpus, tmp_path / "b", limit, second, ckpt_path=ckpt)
    assert len(first.lrs) == 5 and t.global_step == 12
    assert first.lrs + second.lrs == pytest.approx(straight.lrs, abs=1e-12)


def test_cosine_without_any_limit_is_refused(tiny_corpus, tmp_path):
    lit = LitMiniGPT(GPTConfig.tiny(), scheduler="cosine")
    lit.trainer = Trainer(max_epochs=-1, logger=False)
    with pytest.raises(ValueError, match="set --trainer.max_steps, --trainer.max_time or model.decay_steps"):
        lit._lr_factor(5)


# -- no host synchronisation per training step ------------------------------------------------------------
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_steps_read_nothing_on_the_host_except_on_logging_steps(tiny_corpus, tmp_path, monkeypatch, optimizer):
    # On CUDA, reading a tensor's value on the host (bool(t), t.item(), float(t), ...) waits for the device.
    # CPU proxy: count those reads while each training step runs (forward, loss, backward, clipping, the
    # optimizer and the scheduler). Only logging steps (every 3rd here) may read. The meta-device test in
    # test_kernels.py covers reads hidden in C++ (boolean indexing) for the model's plain loss.
    reads = [0]

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            reads[0] += 1
            return original(self, *args, **kwargs)

        return wrapper

    class Count(Callback):
        def __init__(self):
            self.per_step = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.logging = is_logging_step(trainer, batch_idx)
            reads[0] = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.per_step.append((self.logging, reads[0]))

    dm, lit = make(tiny_corpus, tmp_path, optimizer, loss_kernel="plain")
    count = Count()
    t = trainer(tmp_path, 12, [count], log_every_n_steps=3, enable_checkpointing=False, limit_val_batches=0)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    t.fit(lit, datamodule=dm)
    monkeypatch.undo()
    assert [n for logging, n in count.per_step if not logging] == [0] * 8
    assert all(n > 0 for logging, n in count.per_step if logging)  # the proxy does see host reads


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_non_finite_loss_stops_before_a_checkpoint_and_keeps_the_weights_finite(tiny_corpus, tmp_path, optimizer):
    # lr 1e6: the first step moves every weight by ~1e6, a later loss is not finite. The check runs on
    # logging steps (every 50th: never here) and before every checkpoint (every step here).
    dm, lit = make(tiny_corpus, tmp_path, optimizer)
    lit.hparams.lr = 1e6
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    t = trainer(tmp_path, 50, [ckpt], log_every_n_steps=50, gradient_clip_val=None, limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=r"training stopped: the loss is (nan|inf) at step \d+"):
        t.fit(lit, datamodule=dm)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] < t.global_step
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    # The fused optimizer (and Muon beside it) skipped every update after the bad step, without a host read.
    assert all(torch.isfinite(p).all() for p in lit.parameters())


# -- what reaches the logger ---------------------------------------------------------------------------------
class MemoryLogger(Logger):
    """Every (step, metrics) a run logs."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(step, m[key]) for step, m in self.rows if key in m]


class StepClock(Callback):
    """A fake clock: each training step takes 1 s up to its loss (data, forward) and 2 s after (backward,
    optimizer); validation takes no time. Also records each batch's scored tokens."""

    def __init__(self, clock: list[float]):
        self.clock, self.tokens = clock, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clock[0] += 1.0
        self.tokens.append(int((batch[1] != IGNORE_INDEX).sum()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.clock[0] += 2.0


def test_tokens_per_second_counts_whole_steps_after_validation_and_after_a_resume(tiny_corpus, tmp_path, monkeypatch):
    import minigpt.lit_module as lit_module

    clock = [100.0]
    monkeypatch.setattr(lit_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def run(max_steps, callbacks, ckpt_path=None):
        seed_everything(5)
        dm, lit = make(tiny_corpus, tmp_path)
        logger = MemoryLogger()
        # Validation after steps 5, 10, 15; logging steps 3, 6, 9, ...: step 6 is the first one after a validation.
        t = trainer(tmp_path, max_steps, callbacks, logger=logger, log_every_n_steps=3, limit_val_batches=1)
        t.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
        return logger.values("train_tok_s")

    first = StepClock(clock)
    stop = RecordLR(stop_at=7, ckpt=str(tmp_path / "mid.ckpt"))  # an interrupted run, resumed below
    before = run(18, [first, stop])
    clock[0] += 1000.0  # the resumed process starts later
    second = StepClock(clock)
    after = run(18, [second], ckpt_path=str(tmp_path / "mid.ckpt"))
    assert set(first.tokens + second.tokens) == {32}  # every batch scores 4 x 8 tokens
    # Every rate is 32 tokens per 3-second step, the first after a validation or a resume included: a window
    # that opened at the end of a pause and closed inside a step would give 32 / 1 s (3x) at step 6.
    assert [step for step, _ in before] == [3] and [step for step, _ in after] == [9, 12, 15, 18]
    assert [rate for _, rate in before + after] == pytest.approx([32 / 3] * 5)


def test_the_model_summary_counts_the_flops_of_one_sequence():
    from lightning.pytorch.utilities.model_summary import ModelSummary

    lit = LitMiniGPT(GPTConfig.tiny(vocab_size=40, block_size=8))
    summary = ModelSummary(lit, max_depth=1)
    if not hasattr(summary, "total_flops"):
        pytest.skip("this Lightning's model summary counts no FLOPs")
    # At least the token-by-parameter multiply-adds of the matrices one 8-token sequence goes through.
    matrices = sum(p.numel() for name, p in lit.model.named_parameters() if p.dim() == 2 and "wpe" not in name)
    assert summary.total_flops >= 2 * 8 * (matrices - lit.model.transformer.wte.weight.numel())
