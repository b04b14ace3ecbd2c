import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from minigpt.config import GPTConfig
from minigpt.data.datamodule import IMDBDataModule
from minigpt.lit_module import LitMiniGPT, load_checkpoint_file, load_model
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


def make(tiny_corpus, tmp_path, **model_kw):
    dm = IMDBDataModule(source="text", text_path=str(tiny_corpus), block_size=8, batch_size=4, val_fraction=0.2)
    cfg = GPTConfig.tiny(vocab_size=dm.vocab_size, block_size=8, dropout=0.1)
    return dm, LitMiniGPT(cfg, optimizer="adamw", lr=3e-3, scheduler="constant", **model_kw)


@pytest.fixture
def tiny_corpus(tmp_path):
    from conftest import review

    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(review(i, 10 + (i % 7) * 3) for i in range(48)))
    return p


def trainer(tmp_path, max_steps, callbacks, **kw):
    return Trainer(
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
        **kw,
    )


def test_resume_mid_epoch_is_exact(tiny_corpus, tmp_path):
    # straight: 2k steps
    seed_everything(1)
    dm, lit = make(tiny_corpus, tmp_path)
    dm.setup("fit")
    steps_per_epoch = len(dm.train_dataloader())
    k = steps_per_epoch + 3  # stop in the middle of the second epoch
    straight = RecordBatches()
    trainer(tmp_path / "a", 2 * k, [straight]).fit(lit, datamodule=dm)
    w_straight = {n: p.detach().clone() for n, p in lit.named_parameters()}

    # interrupted: k steps, checkpoint, then a new process-like start that resumes to 2k
    seed_everything(1)
    dm, lit = make(tiny_corpus, tmp_path)
    first = RecordBatches()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, every_n_train_steps=k, save_top_k=0)
    trainer(tmp_path / "b", k, [first, ckpt]).fit(lit, datamodule=dm)
    seed_everything(123)  # the resumed process starts from a different random state
    dm, lit = make(tiny_corpus, tmp_path)
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


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "empty"), (b"\x00garbage", "corrupt"), (None, "does not exist")],
)
def test_bad_checkpoint_files(tmp_path, content, match):
    path = tmp_path / "x.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_checkpoint_file(str(path))


def test_foreign_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a minigpt checkpoint"):
        load_checkpoint_file(str(tmp_path / "foreign.ckpt"))


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
    with pytest.raises(ValueError, match="decay_steps"):
        LitMiniGPT(cfg, scheduler="cosine")
    opt = LitMiniGPT(cfg).configure_optimizers()
    assert isinstance(opt["optimizer"], torch.optim.Adam) and opt["lr_scheduler"]["interval"] == "step"
    assert isinstance(opt["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
