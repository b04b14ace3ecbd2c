"""``LitMiniGPT``: the thin LightningModule around the pure ``GPT`` model.

It holds the model, one shared step for train/val/test, the optimizer and schedule, and what a
checkpoint needs to generate on its own (the tokenizer). Nothing else.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from minigpt.checkpoint import load_model, minigpt_section, model_from_checkpoint, model_state  # noqa: F401
from minigpt.checkpoint import read_checkpoint as load_checkpoint_file
from minigpt.config import GPTConfig
from minigpt.model import GPT
from minigpt.tokenizer import IGNORE_INDEX, Vocab, tokenizer_from_dict

log = logging.getLogger(__name__)

class LitMiniGPT(pl.LightningModule):
    def __init__(
        self,
        config: GPTConfig,
        optimizer: Literal["adam", "adamw"] = "adam",
        lr: float = 1e-2,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: Literal["step", "cosine", "constant"] = "step",
        step_size: int = 10_000,
        gamma: float = 0.9,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        min_lr: float = 0.0,
        init_from: str | None = None,
        compile: bool = False,
    ):
        """
        Args:
            config: the model's architecture (``vocab_size`` and ``block_size`` come from the data).
            optimizer: "adam" (the tutorial's: L2 weight decay on every parameter) or "adamw"
                (decoupled decay on matrices only, as nanoGPT).
            lr: peak learning rate.
            weight_decay: weight decay (see ``optimizer``).
            betas: Adam's betas.
            scheduler: "step" (the tutorial's StepLR, stepped every optimizer step), "cosine"
                (linear warmup then cosine to ``min_lr`` at ``decay_steps``) or "constant".
            step_size: StepLR: multiply the rate by ``gamma`` every this many steps.
            gamma: StepLR factor.
            warmup_steps: linear warmup steps ("cosine" and "constant").
            decay_steps: "cosine": step at which the rate reaches ``min_lr`` (required; kept apart
                from the Trainer's ``max_steps`` so the schedule never depends on the data length).
            min_lr: "cosine": final learning rate.
            init_from: a minigpt checkpoint whose weights start this run (fine-tuning); its
                vocabulary must equal the data's.
            compile: ``torch.compile`` the model (in place, so checkpoints keep their keys). Worth
                it on a GPU; off by default because on CPU compiling costs more than it saves here.
        """
        super().__init__()
        if isinstance(config, dict):  # from a checkpoint's hyper-parameters
            config = GPTConfig(**config)
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"model.lr must be a positive number, got {lr}")
        if scheduler == "cosine" and (decay_steps is None or decay_steps <= warmup_steps):
            raise ValueError(f"model.scheduler cosine needs model.decay_steps > warmup_steps ({warmup_steps})")
        if step_size < 1 or warmup_steps < 0:
            raise ValueError("model.step_size must be >= 1 and model.warmup_steps >= 0")
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = asdict(config)
        self.config = config
        self.model = GPT(config)
        self.tokenizer: Vocab | None = None
        self._sums: dict[str, list[Tensor]] = {}
        self._step_started: float | None = None
        self._rng_to_restore: dict | None = None
        if init_from:
            self._init_from(init_from)

    # -- steps ------------------------------------------------------------------------------------
    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        # Batches are right-padded and attention is causal, so padding can only follow the real
        # tokens and never changes them: no key-padding mask is needed (the model test proves it),
        # which keeps attention on its fused causal path. Padded targets are IGNORE_INDEX.
        nll_sum, count = self.model.loss_sum_and_count(x, y, ignore_index=IGNORE_INDEX)
        loss = nll_sum / count.clamp(min=1)
        if stage == "train":
            if not torch.isfinite(loss):
                # Stop before backward: the weights (and so every checkpoint) stay finite.
                raise FloatingPointError(
                    f"training stopped: the loss is {float(loss.detach())} at step {self.global_step}; the last good "
                    "checkpoint is kept (try a lower --model.lr or --trainer.gradient_clip_val)"
                )
            self.log("train_loss", loss, prog_bar=True, batch_size=x.size(0))
        else:
            sums = self._sums.setdefault(stage, [torch.zeros((), device=x.device, dtype=torch.float64)] * 2)
            self._sums[stage] = [sums[0] + nll_sum.detach().double(), sums[1] + count]
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._shared_step(batch, "train")
        self._log_throughput(batch)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        loss = self._epoch_loss("val")
        if loss is not None and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            train = self.trainer.callback_metrics.get("train_loss")
            log.info(
                "epoch %d step %d: val_loss %.4f val_ppl %.1f%s",
                self.current_epoch,
                self.global_step,
                loss,
                math.exp(min(loss, 700)),
                f" (train_loss {float(train):.4f})" if train is not None else "",
            )

    def on_test_epoch_end(self) -> None:
        self._epoch_loss("test")

    def _epoch_loss(self, stage: str) -> float | None:
        """Perplexity = exp(total NLL / total tokens) over the whole epoch (all processes)."""
        sums = self._sums.pop(stage, None)
        if sums is None:
            return None
        total = self.trainer.strategy.reduce(torch.stack([sums[0], sums[1].double()]), reduce_op="sum")
        loss = float(total[0] / total[1].clamp(min=1))
        # Already summed over processes above; sync_dist only averages identical values (and keeps
        # Lightning from warning that epoch-level metrics are not synced).
        self.log(f"{stage}_loss", loss, sync_dist=True)
        self.log(f"{stage}_ppl", math.exp(min(loss, 700)), sync_dist=True)
        self.log(f"{stage}_tokens", float(total[1]), sync_dist=True)
        return loss

    def _log_throughput(self, batch: tuple[Tensor, Tensor]) -> None:
        now = time.perf_counter()
        if self._step_started is not None:
            tokens = int((batch[1] != IGNORE_INDEX).sum()) * self.trainer.world_size
            self.log("train_tok_s", tokens / max(now - self._step_started, 1e-9), batch_size=batch[0].size(0))
        self._step_started = now

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            # Same clipping as Lightning's, but a non-finite gradient norm stops training before
            # the optimizer writes NaN into the weights.
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            if not torch.isfinite(norm):
                raise FloatingPointError(
                    f"training stopped: the gradient norm is {float(norm)} at step {self.global_step}; "
                    "the last good checkpoint is kept (try a lower --model.lr)"
                )
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # Never touch trainer.estimated_stepping_batches here: it drops the data loader's
        # saved position on resume (Lightning issue #20550).
        if hp.optimizer == "adamw":
            matrices = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
            others = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
            groups = [{"params": matrices, "weight_decay": hp.weight_decay}, {"params": others, "weight_decay": 0.0}]
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=self._fused_optimizer())
        else:
            opt = torch.optim.Adam(
                self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay,
                fused=self._fused_optimizer(),
            )  # fmt: skip
        if hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.gamma)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _fused_optimizer(self) -> bool | None:
        """True on CPU: the fused kernel updates each weight in one pass over its value, gradient and two
        moments instead of about ten passes of the default per-tensor loop (about 20 ms instead of 220 ms
        per step for the tutorial model's 42M parameters on 2 cores), with the same arithmetic (a test
        compares it with the default). None (PyTorch's default) elsewhere: on CUDA the default foreach
        kernels are already fast, and a fused optimizer would unscale 16-bit AMP gradients after our clipping."""
        params = [p for p in self.parameters() if p.requires_grad]
        return True if params and all(p.device.type == "cpu" and p.is_floating_point() for p in params) else None

    def _lr_factor(self, step: int) -> float:
        hp = self.hparams
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        if hp.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - hp.warmup_steps) / (hp.decay_steps - hp.warmup_steps))
        floor = hp.min_lr / hp.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    # -- what a checkpoint carries ------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.hparams.get("compile") and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        vocab = getattr(dm, "vocab", None)
        if vocab is None:
            return
        if len(vocab) != self.config.vocab_size:
            raise ValueError(
                f"the data's vocabulary has {len(vocab)} tokens but the model was built for "
                f"{self.config.vocab_size}; use the data settings the model was trained with"
            )
        self._check_same_vocab(vocab)
        self.tokenizer = vocab

    def _check_same_vocab(self, vocab: Vocab, what: str = "the checkpoint's") -> None:
        if self.tokenizer is not None and self.tokenizer.itos != vocab.itos:
            raise ValueError(
                f"{what} vocabulary differs from the data's (same size {len(vocab)} but other words or order); "
                "use the data settings (source, min_freq, max_size) the model was trained with"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["minigpt"] = minigpt_section(
            self.tokenizer,
            data=dict(getattr(getattr(self.trainer, "datamodule", None), "hparams", {}) or {}),
            rng={"torch": torch.get_rng_state(), "cuda": _cuda_rng_state()},
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("minigpt") or {}
        if extra.get("tokenizer"):
            stored = tokenizer_from_dict(extra["tokenizer"])
            self._check_same_vocab(stored)
            self.tokenizer = stored
        self._rng_to_restore = extra.get("rng")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restore the random state of a resumed run here, after the data loader iterator has been
        # created (creating it draws a seed from the global generator), so dropout masks continue
        # exactly as in an uninterrupted run.
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["torch"])
            if self._rng_to_restore.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None

    def _init_from(self, path: str) -> None:
        ckpt = load_checkpoint_file(path)
        state = model_state(ckpt)
        wpe = state.get("transformer.wpe.weight")
        if wpe is not None and wpe.size(0) > self.config.block_size:
            # Fine-tuning with a shorter context: the first block_size learned positions are the same.
            state["transformer.wpe.weight"] = wpe[: self.config.block_size]
        try:
            self.model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{path} does not fit this model config: {str(err).splitlines()[0]}") from err
        tok = (ckpt.get("minigpt") or {}).get("tokenizer")
        self.tokenizer = tokenizer_from_dict(tok) if tok else None


def _cuda_rng_state() -> list[Tensor] | None:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
