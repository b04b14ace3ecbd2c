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
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor

from minigpt.checkpoint import minigpt_section, model_state, read_checkpoint, section, state_dict_mismatch
from minigpt.config import GPTConfig
from minigpt.errors import UserError
from minigpt.hardware import can_compile
from minigpt.model import GPT, LossKernel
from minigpt.optim import MuonWithAdamW, fused_qkv, hidden_matrices
from minigpt.tokenizer import IGNORE_INDEX, Vocab, tokenizer_from_dict

log = logging.getLogger(__name__)

_SHARDING = (FSDPStrategy, ModelParallelStrategy)
"""Strategies that split weight matrices across processes."""


def is_logging_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the training batch now running ends a logging step.

    Logging steps are every ``trainer.log_every_n_steps``-th optimizer step (``global_step`` counts the
    steps done before this batch), on the batch that completes the step's gradient accumulation. Values
    measured on it are logged at ``global_step + 1``, the step they belong to.

    Args:
        trainer: the running trainer.
        batch_idx: the batch's index in its epoch (as the training hooks get it).

    Returns:
        True on a logging step.
    """
    every = trainer.log_every_n_steps
    completes_step = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
    return every > 0 and completes_step and (trainer.global_step + 1) % every == 0


def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write values to the run's loggers (TensorBoard) at the step they were measured after.

    `LightningModule.log` gives the logger the count of batches stepped so far, one less than the step
    a value was measured after: validation after step N would land at N - 1 while the console and the
    samples say N. Values logged this way and those ``self.log`` keeps for callbacks (``logger=False``)
    are the same numbers.

    Args:
        trainer: the running trainer (its loggers; rank-zero-only loggers ignore other processes).
        metrics: name -> value.
        step: the number of optimizer steps done.
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


def should_compile(setting: bool | str, device: torch.device, announce: bool = True) -> bool:
    """Whether a fit on `device` compiles the Transformer blocks, for `compile` True, False or "auto".

    On a CPU or a CUDA GPU, "auto" compiles where `torch.compile` can build kernels for the device, and says
    so (if `announce`) where it cannot; True where it cannot is bad input (it would fail at the first step).
    On other devices "auto" does not compile and True is left to torch."""
    if setting is False:
        return False
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        if announce and setting == "auto":
            log.info("training without torch.compile: compile auto compiles on CPUs and CUDA GPUs, not on %s "
                     "(--model.compile true tries)", kind)  # fmt: skip
        return setting is True
    if can_compile(device):
        return True
    what = "a C++ compiler (g++ or clang++)" if kind == "cpu" else "Triton"
    if setting is True:
        raise UserError(f"model.compile true needs {what} for torch.compile on {kind}, and none was found: "
                        "install one, or set --model.compile false")  # fmt: skip
    if announce:
        log.info("training without torch.compile: it needs %s on %s, and none was found (install one to "
                 "train faster)", what, kind)  # fmt: skip
    return False


class LitMiniGPT(pl.LightningModule):
    def __init__(
        self,
        config: GPTConfig,
        optimizer: Literal["adam", "adamw", "muon"] = "adam",
        lr: float = 1e-2,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        muon_momentum: float = 0.95,
        muon_ns_steps: int = 5,
        adamw_lr: float | None = None,
        scheduler: Literal["step", "cosine", "wsd", "constant"] = "step",
        step_size: int = 10_000,
        gamma: float = 0.9,
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        min_lr: float = 0.0,
        decay_fraction: float = 0.2,
        init_from: str | None = None,
        compile: bool | Literal["auto"] = False,
        loss_kernel: LossKernel = "auto",
    ):
        """
        Args:
            config: the model's architecture (``vocab_size`` and ``block_size`` come from the data).
            optimizer: "adam" (the tutorial's: L2 weight decay on every parameter), "adamw"
                (decoupled decay on matrices only, as nanoGPT) or "muon" (``minigpt.optim``: Muon for
                the Transformer blocks' weight matrices, AdamW as "adamw" for everything else, one
                learning rate and schedule for both).
            lr: peak learning rate.
            weight_decay: weight decay (see ``optimizer``).
            betas: Adam's betas.
            muon_momentum: "muon": the (Nesterov) momentum of Muon's half.
            muon_ns_steps: "muon": Newton-Schulz steps that orthogonalise each update (5 is Muon's default).
            adamw_lr: "muon": the peak rate of the AdamW half (embeddings, head, norms); None: ``lr``. The
                schedule scales both halves alike.
            scheduler: "step" (the tutorial's StepLR, stepped every optimizer step), "cosine"
                (linear warmup then cosine to ``min_lr`` at ``decay_steps``), "wsd" (warmup, then the peak rate,
                then a linear decay to ``min_lr`` over the last ``decay_fraction`` of the decay) or "constant".
            step_size: StepLR: multiply the rate by ``gamma`` every this many steps.
            gamma: StepLR factor.
            warmup_steps: linear warmup steps ("cosine" and "constant").
            decay_steps: "cosine": step at which the rate reaches ``min_lr``. None (the default) follows
                the run's budget: the rate reaches ``min_lr`` when the first of the Trainer's limits
                (``max_steps``, ``max_time``, ``max_epochs``) ends the run; with ``max_time`` the progress
                is the fraction of the time spent (Lightning's ``Timer``, whose state a checkpoint keeps).
            min_lr: "cosine" and "wsd": final learning rate.
            decay_fraction: "wsd": the share of the steps after warmup spent decaying.
            init_from: a minigpt checkpoint whose weights start this run (fine-tuning); its
                vocabulary must equal the data's.
            compile: ``torch.compile`` the Transformer blocks (in place, so checkpoints keep their keys):
                True, False, or "auto" (compile where ``torch.compile`` can build kernels for the training
                device: a C++ compiler on a CPU, Triton on a GPU). Off by default: compiling costs time up
                front (seconds on a small model) before it makes each step faster.
            loss_kernel: the linear head's training loss (``GPT.loss_kernel``): "plain" (chunked
                ``F.cross_entropy``), "fused" (``minigpt.kernels``) or "auto" (fused for float32 on CPU
                without autocast, where its benchmark shows a gain; plain elsewhere).
        """
        super().__init__()
        if isinstance(config, dict):  # from a checkpoint's hyper-parameters
            config = GPTConfig(**config)
        if lr <= 0 or not math.isfinite(lr):
            raise UserError(f"model.lr must be a positive number, got {lr}")
        if decay_steps is not None and decay_steps <= warmup_steps:
            raise UserError(f"model.decay_steps must be > model.warmup_steps ({warmup_steps}), got {decay_steps}")
        if not 0 < decay_fraction <= 1:
            raise UserError(f"model.decay_fraction must be in (0, 1], got {decay_fraction}")
        if compile not in (True, False, "auto"):
            raise UserError(f"model.compile must be true, false or auto, got {compile!r}")
        if muon_ns_steps < 1 or not 0 <= muon_momentum < 1:
            raise UserError("model.muon_ns_steps must be >= 1 and model.muon_momentum in [0, 1)")
        if adamw_lr is not None and (optimizer != "muon" or adamw_lr <= 0 or not math.isfinite(adamw_lr)):
            raise UserError(
                f"model.adamw_lr sets the AdamW half of model.optimizer muon and must be a positive number, "
                f"got {adamw_lr} with optimizer {optimizer}; leave it out or use --model.optimizer muon"
            )
        if step_size < 1 or warmup_steps < 0:
            raise UserError("model.step_size must be >= 1 and model.warmup_steps >= 0")
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = asdict(config)
        self.config = config
        self.model = GPT(config, loss_kernel=loss_kernel)
        # One sequence: Lightning's model summary runs it to count FLOPs (and shows in/out sizes).
        self.example_input_array = torch.zeros((1, config.block_size), dtype=torch.long)
        self.tokenizer: Vocab | None = None
        self._sums: dict[str, list[Tensor]] = {}
        self._tokens: Tensor | None = None  # tokens trained on in the throughput window (on the device)
        self._window_started: float | None = None  # None: the next training step opens the window
        self._logged_step = 0  # the last step whose training loss went to the loggers
        self._bad: tuple[Tensor, Tensor, Tensor] | None = None  # first non-finite (step, kind, value)
        self._rng_to_restore: dict | None = None
        if init_from:
            self._init_from(init_from)

    # -- steps ------------------------------------------------------------------------------------
    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def _shared_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> Tensor:
        x, y = batch
        # Batches are right-padded and attention is causal, so padding can only follow the real
        # tokens and never changes them: no key-padding mask is needed (the model test proves it),
        # which keeps attention on its fused causal path. Padded targets are IGNORE_INDEX.
        nll_sum, count = self.model.loss_sum_and_count(x, y, ignore_index=IGNORE_INDEX)
        loss = nll_sum / count.clamp(min=1)
        if stage == "train":
            # For the progress bar and callbacks; the logger gets it from _log_train_step.
            self.log("train_loss", loss, prog_bar=True, batch_size=x.size(0), logger=False)
            self._note_non_finite(loss, 0)
            self._count_tokens(count)
            if is_logging_step(self.trainer, batch_idx):  # values are read on logging steps only
                self._stop_if_non_finite()
                self._log_train_step(loss)
        else:
            sums = self._sums.setdefault(stage, [torch.zeros((), device=x.device, dtype=torch.float64)] * 2)
            self._sums[stage] = [sums[0] + nll_sum.detach().double(), sums[1] + count]
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, batch_idx, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, batch_idx, "test")

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
        metrics = {f"{stage}_loss": loss, f"{stage}_ppl": math.exp(min(loss, 700)), f"{stage}_tokens": float(total[1])}
        fitting = self.trainer.state.fn == "fit"
        # Already summed over processes above; sync_dist only averages identical values (and keeps
        # Lightning from warning that epoch-level metrics are not synced). While fitting, the logger gets
        # them at the step they were measured after.
        self.log_dict(metrics, sync_dist=True, logger=not fitting)
        if fitting and not self.trainer.sanity_checking:
            log_to_loggers(self.trainer, metrics, step=self.global_step)
        return loss

    # -- no host synchronisation per training step -------------------------------------------------
    # A training step only queues work on the device. Reading a value on the host (`bool(t)`, `t.item()`)
    # would wait for the device every step, so the non-finite check and the token count stay on the device
    # and are read on logging steps (every `trainer.log_every_n_steps`), which synchronise anyway, and
    # before every validation and checkpoint. The fused optimizer (CPU, CUDA) skips the updates of a flagged
    # run, so the weights stay finite; with another optimizer a non-finite step may write NaN into the
    # weights in memory before the check, but no checkpoint is ever saved after it.

    def _note_non_finite(self, value: Tensor, kind: int) -> None:
        """Remember on the device the first step whose loss (kind 0) or gradient norm (1) is not finite."""
        value = value.detach().float()
        if self._bad is None:
            self._bad = (torch.full((), -1, device=value.device, dtype=torch.long), torch.zeros_like(value).long(),
                         torch.zeros_like(value))  # fmt: skip
        step, old_kind, old_value = self._bad
        first = ~torch.isfinite(value) & (step < 0)
        self._bad = (torch.where(first, self.global_step, step), torch.where(first, kind, old_kind),
                     torch.where(first, value, old_value))  # fmt: skip

    def _stop_if_non_finite(self) -> None:
        """Raise if a step was non-finite (a host synchronisation: called on logging steps, before every
        validation and checkpoint, and at the end of training)."""
        if self._bad is None or int(self._bad[0]) < 0:
            return
        step, kind, value = (t.item() for t in self._bad)
        what = "loss" if kind == 0 else "gradient norm"
        raise FloatingPointError(
            f"training stopped: the {what} is {value} at step {step}; the last good checkpoint is kept "
            "(try a lower --model.lr or --trainer.gradient_clip_val)"
        )

    # `train_tok_s` is measured between two training steps at the same point of each step (after the
    # forward pass), so a window holds whole steps: after a pause (start, resume, validation, new epoch)
    # the first step only opens the next window. A window opened at the end of a pause and closed inside
    # a step would count that step's tokens over part of its time (forward only: about 3x the rate).

    def _count_tokens(self, count: Tensor) -> None:
        if self._window_started is None:
            self._window_started = time.perf_counter()
        else:
            self._tokens = count if self._tokens is None else self._tokens + count

    def _log_train_step(self, loss: Tensor) -> None:
        """Log train_loss, the epoch and `train_tok_s` (tokens per second of all processes since the
        previous logging step) at this step (a host read: logging steps synchronise anyway)."""
        now = time.perf_counter()
        metrics = {"train_loss": float(loss.detach()), "epoch": float(self.current_epoch)}
        if self._window_started is not None and self._tokens is not None:
            seconds = max(now - self._window_started, 1e-9)
            metrics["train_tok_s"] = float(self._tokens) * self.trainer.world_size / seconds
        self._tokens, self._window_started = None, now
        self._logged_step = self.global_step + 1
        log_to_loggers(self.trainer, metrics, step=self._logged_step)

    def _restart_throughput_window(self) -> None:
        # Time spent outside training steps (validation, a new epoch's loader) is not throughput.
        self._tokens, self._window_started = None, None

    def on_train_epoch_start(self) -> None:
        self._restart_throughput_window()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self._stop_if_non_finite()

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit":
            self._restart_throughput_window()

    def on_train_end(self) -> None:
        self._stop_if_non_finite()
        # A run that stops between logging steps (max_time, Ctrl-C) ends its curve at its last step.
        loss = self.trainer.callback_metrics.get("train_loss")
        if loss is not None and self.global_step > self._logged_step:
            metrics = {"train_loss": float(loss), "epoch": float(self.current_epoch)}
            log_to_loggers(self.trainer, metrics, step=self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            # Same clipping as Lightning's, and a non-finite gradient norm stops training.
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            self._note_non_finite(norm, 1)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self._bad is not None and optimizer.defaults.get("fused"):
            # The fused optimizer skips its update while `found_inf` is non-zero (the mechanism AMP's
            # GradScaler uses), so a non-finite step never reaches the weights, without a host read.
            optimizer.found_inf = (self._bad[0] >= 0).float()

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        # Never touch trainer.estimated_stepping_batches here: it drops the data loader's
        # saved position on resume (Lightning issue #20550).
        if hp.optimizer in ("adamw", "muon"):
            trainer = self._attached_trainer()
            if hp.optimizer == "muon" and isinstance(getattr(trainer, "strategy", None), _SHARDING):
                raise UserError(
                    "model.optimizer muon orthogonalises whole weight matrices, which a sharding strategy "
                    "splits across processes; use --trainer.strategy ddp or --model.optimizer adamw"
                )
            muon = hidden_matrices(self.model) if hp.optimizer == "muon" else []
            taken = {id(p) for p in muon}
            rest = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
            matrices = [p for p in rest if p.dim() >= 2]
            others = [p for p in rest if p.dim() < 2]
            groups = [{"params": matrices, "weight_decay": hp.weight_decay}, {"params": others, "weight_decay": 0.0}]
            if muon:
                if hp.adamw_lr is not None:
                    groups = [{**g, "lr": hp.adamw_lr} for g in groups]
                opt = MuonWithAdamW(
                    muon, groups, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas),
                    momentum=hp.muon_momentum, ns_steps=hp.muon_ns_steps, fused=self._fused_optimizer(),
                    qkv=fused_qkv(self.model),
                )  # fmt: skip
            else:
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
        """True on CPU and CUDA: the fused kernel updates each weight in one pass over its value, gradient
        and two moments instead of several passes of the default implementation, with the same arithmetic
        (a test compares it with the default), and it can skip a non-finite step without a host read (see
        `configure_gradient_clipping`). None (PyTorch's default) on other devices and with 16-bit AMP,
        whose GradScaler would unscale the gradients of a fused optimizer after our clipping."""
        params = [p for p in self.parameters() if p.requires_grad]
        trainer = self._attached_trainer()
        scaled = trainer is not None and str(trainer.precision).startswith("16")
        on_fused_devices = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return True if params and on_fused_devices and not scaled else None

    def _attached_trainer(self) -> pl.Trainer | None:
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer (e.g. configure_optimizers called on its own)
            return None

    def _lr_factor(self, step: int) -> float:
        hp = self.hparams
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        if hp.scheduler == "constant":
            return 1.0
        floor, progress = hp.min_lr / hp.lr, self._decay_progress(step)
        if hp.scheduler == "wsd":
            return floor + (1 - floor) * min(1.0, (1 - progress) / hp.decay_fraction)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def _decay_progress(self, step: int) -> float:
        """Fraction in [0, 1] of the steps after warmup done after `step` optimizer steps (of the decay steps, or
        of the run's budget)."""
        warmup, decay_steps = self.hparams.warmup_steps, self.hparams.decay_steps
        if decay_steps is not None:
            return min(1.0, (step - warmup) / (decay_steps - warmup))
        if step <= warmup:
            return 0.0
        # Follow the run's budget: whichever of the Trainer's limits ends the run first. Never through
        # trainer.estimated_stepping_batches: it drops the data loader's saved position on resume
        # (Lightning issue #20550). num_training_batches is set by then and costs nothing to read.
        trainer, done = self.trainer, []
        if trainer.max_steps > 0:
            done.append((step - warmup) / max(1, trainer.max_steps - warmup))
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = None if timer is None else timer.time_remaining("train")
        if remaining is not None:
            elapsed = timer.time_elapsed("train")
            # Processes' clocks differ slightly; all of them must use the same rate.
            elapsed, remaining = trainer.strategy.broadcast((elapsed, remaining))
            done.append(elapsed / max(elapsed + remaining, 1e-9))
        batches = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and 0 < batches < float("inf"):
            per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            done.append((step - warmup) / max(1, trainer.max_epochs * per_epoch - warmup))
        if not done:
            raise UserError(
                f"model.scheduler {self.hparams.scheduler} with model.decay_steps null follows the Trainer's limit, "
                "but this run has none it can measure: set --trainer.max_steps, --trainer.max_time or "
                "model.decay_steps"
            )
        return min(1.0, max(done))

    # -- what a checkpoint carries ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        setting, announce = self.hparams.get("compile", False), self.trainer.is_global_zero
        if getattr(self, "_compiled", False) or not should_compile(setting, self.device, announce):
            return
        # Here, after the model summary's one forward pass, which would otherwise compile a graph of its own.
        self.model.compile_parts()
        self._compiled = True
        if announce:
            log.info("compiling the model (torch.compile): the first steps wait for it")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        vocab = getattr(dm, "vocab", None)
        if vocab is None:
            return
        if len(vocab) != self.config.vocab_size:
            raise UserError(
                f"the data's vocabulary has {len(vocab)} tokens but the model was built for "
                f"{self.config.vocab_size}; use the data settings the model was trained with"
            )
        self._check_same_vocab(vocab)
        self.tokenizer = vocab

    def _check_same_vocab(self, vocab: Vocab, what: str = "the checkpoint's") -> None:
        if self.tokenizer is not None and self.tokenizer.itos != vocab.itos:
            raise UserError(
                f"{what} vocabulary differs from the data's (same size {len(vocab)} but other words or order); "
                "use the data settings (source, min_freq, max_size) the model was trained with"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._stop_if_non_finite()  # never save weights a non-finite step may have written
        checkpoint["minigpt"] = minigpt_section(
            self.tokenizer,
            data=dict(getattr(getattr(self.trainer, "datamodule", None), "hparams", {}) or {}),
            rng={"torch": torch.get_rng_state(), "cuda": _cuda_rng_state()},
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = section(checkpoint)
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
        ckpt = read_checkpoint(path)
        state = model_state(ckpt)
        wpe = state.get("transformer.wpe.weight")
        if wpe is not None and wpe.size(0) > self.config.block_size:
            # Fine-tuning with a shorter context: the first block_size learned positions are the same.
            state["transformer.wpe.weight"] = wpe[: self.config.block_size]
        try:
            self.model.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"{path} does not fit this model config ({state_dict_mismatch(err)})") from err
        tok = section(ckpt).get("tokenizer")
        self.tokenizer = tokenizer_from_dict(tok) if tok else None


def _cuda_rng_state() -> list[Tensor] | None:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
