"""Training callbacks: samples while training, a Ctrl-C that saves, and what a person watching sees.

* `GenerationCallback`: fixed prompts continued after each validation (TensorBoard text + console).
* `GracefulStop`: the first Ctrl-C saves `last.ckpt` and stops; a run never ends without one.
* `EarlyValidation`: the first validation (and sample) early, then the configured interval.
* `ProgressLog`: plain progress lines when the output is a file, not a terminal.
* `LearningRateLog`: one learning-rate curve per distinct rate.
* `ProgressBar`: Lightning's bar, showing the run's version as ``version``.
* `EMAWeights`: an exponential moving average of the weights (Lightning's `WeightAveraging`), opt-in.
* `KeepFreedMemory`: freed memory stays in the process for the next step (`minigpt.allocator`).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Timer, TQDMProgressBar, WeightAveraging
from lightning.pytorch.utilities import rank_zero_only
from torch.optim.swa_utils import get_ema_multi_avg_fn

from minigpt.allocator import keep_freed_memory
from minigpt.checkpointing import RunCheckpoint, last_checkpoint_path
from minigpt.generation import SamplingConfig, generate_text
from minigpt.lit_module import is_logging_step, log_to_loggers

log = logging.getLogger(__name__)

TRAINING_SAMPLES = SamplingConfig(max_new_tokens=30, temperature=0.8, top_k=50, top_p=None)
"""How the training-time samples are drawn unless configured (`--generation.sampling.*`)."""


class GenerationCallback(Callback):
    """At the end of each validation epoch, continue fixed prompts with a fixed seed.

    The text goes to TensorBoard (text panel, tag ``samples``) and to the console, so what the
    model writes can be followed while it learns. Like `minigpt generate`, a sample never holds
    `<pad>` and holds `<unk>` only if asked.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        sampling: SamplingConfig = TRAINING_SAMPLES,
        seed: int = 0,
        enabled: bool = True,
    ):
        """
        Args:
            prompts: texts to continue (default: ["the movie was"]).
            sampling: how tokens are chosen (``max_new_tokens``, ``temperature``, ``top_k``, ...).
            seed: seed of the sampling generator, the same at every epoch.
            enabled: turn the samples off.
        """
        self.prompts = list(prompts) if prompts else ["the movie was"]
        self.sampling = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(**sampling)
        self.seed, self.enabled = seed, enabled
        self.last_samples: list[tuple[str, str]] = []

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tokenizer = getattr(pl_module, "tokenizer", None)
        if not self.enabled or trainer.sanity_checking or tokenizer is None:
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        # Sampling must not disturb the training random state (exact resume depends on it). It runs the
        # compiled blocks eagerly: a sample's shapes, KV cache, thread count and grad mode each differ from
        # training's, and every such variant would cost a recompile (and soon torch.compile's recompile limit).
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
            self.last_samples = [
                (prompt, generate_text(pl_module.model, tokenizer, prompt, self.sampling, generator=generator))
                for prompt in self.prompts
            ]
        text = "\n\n".join(f"**{p}** {c}" for p, c in self.last_samples)
        for p, c in self.last_samples:
            log.info("sample (step %d): %s | %s", trainer.global_step, p, c)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("samples", text, global_step=trainer.global_step)


class GracefulStop(Callback):
    """The first Ctrl-C (SIGINT) finishes the current step, saves ``last.ckpt`` and stops cleanly.

    The file is saved at once, so a second Ctrl-C (which interrupts at once, as usual) during the
    validation Lightning runs before it stops loses nothing; that validation may write it again
    (with the best files' ranking), and the line saying where it is comes once it is final. The save
    goes through the run's `RunCheckpoint` (which also saves the final state of a run that ends
    between two of its saves), so it replaces ``last.ckpt``, never a ``last-v1.ckpt``. The checkpoint
    resumes with ``--ckpt_path last``.
    """

    def __init__(self) -> None:
        self.requested = False
        self.saved: Path | None = None
        self.saved_step: int | None = None
        self._previous = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # From the start of fit (before the sanity check), so no early Ctrl-C is lost.
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. inside a notebook worker): keep default
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort now)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.requested and not trainer.should_stop:
            self.save_last(trainer)
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if self.requested and self.saved is not None and trainer.is_global_zero:
            log.info("saved %s (step %d); resume with: minigpt fit ... --ckpt_path last", self.saved, self.saved_step)

    def save_last(self, trainer: pl.Trainer) -> Path:
        self.saved_step = trainer.global_step
        ckpt = _run_checkpoint(trainer)
        if ckpt is not None:
            self.saved = Path(ckpt.save_last_now(trainer))
        else:
            self.saved = last_checkpoint_path(trainer)
            trainer.save_checkpoint(self.saved, weights_only=False)
        return self.saved


def _run_checkpoint(trainer: pl.Trainer) -> RunCheckpoint | None:
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, RunCheckpoint)), None)


class EarlyValidation(Callback):
    """Validate (and so sample) once at ``step``, then every ``val_check_interval`` steps as configured.

    A new run shows how it is doing within its first minute without a long run validating more often.
    Works with step-based validation (``check_val_every_n_epoch: null``); otherwise it does nothing.
    """

    def __init__(self, step: int | None = None):
        """
        Args:
            step: the training step of the first validation (None: the configured interval only).
        """
        if step is not None and step < 1:
            raise ValueError(f"early_validation.step must be >= 1 or null, got {step}")
        self.step = step
        self._regular: int | float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        regular = _validation_interval(trainer)
        if (
            self.step is None
            or trainer.check_val_every_n_epoch is not None
            or not isinstance(regular, int)
            or not self.step < regular
            or trainer.global_step >= self.step
        ):
            return
        # `step` first, then the regular multiples.
        self._regular = _validation_interval(trainer, self.step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._regular is not None and not trainer.sanity_checking:
            _validation_interval(trainer, self._regular)
            self._regular = None


def _validation_interval(trainer: pl.Trainer, batches: int | float | None = None) -> int | float:
    """The number of training batches between validations (with ``batches``: set it, and return the old one).

    The one place minigpt uses a Lightning attribute that is not public API: no public API moves the
    next validation of a running fit. Lightning's fit loop sets ``trainer.val_check_batch`` from
    ``val_check_interval`` when it sets up the data, and its epoch loop validates when the count of
    training batches (across epochs, with ``check_val_every_n_epoch: null``) is a multiple of it.
    Checked with Lightning 2.4.0 and 2.6.6 (``_FitLoop.setup_data``, ``_TrainingEpochLoop._should_check_val_fx``).
    """
    current = trainer.val_check_batch
    if batches is not None:
        trainer.val_check_batch = batches
    return current


class ProgressLog(Callback):
    """One plain line of progress every ``log_every_n_steps`` steps or ``interval_s`` seconds, whichever is later.

    For output that goes to a file (``minigpt fit > run.log``, nohup, CI), where a progress bar is
    noise. The first logging step and the end of training are always reported.
    """

    def __init__(self, interval_s: float = 30.0):
        self.interval_s = interval_s
        self._start = self._last_time = 0.0
        self._start_step = 0
        self._last_step: int | None = None
        self._tokens = 0
        # The epoch of the last trained batch: when a run stops (max_steps, max_time, Ctrl-C) Lightning has
        # already counted that epoch as done by on_train_end, so trainer.current_epoch is one ahead there.
        self._epoch: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last_time = time.monotonic()
        self._start_step, self._last_step, self._tokens, self._epoch = trainer.global_step, None, 0, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        self._tokens += x.numel() * trainer.world_size  # no device sync: padding included
        self._epoch = trainer.current_epoch
        step, now = trainer.global_step, time.monotonic()
        every = max(1, trainer.log_every_n_steps)
        if self._last_step is None:
            due = step - self._start_step >= every
        else:
            due = step - self._last_step >= every and now - self._last_time >= self.interval_s
        if due:
            self._print(trainer, step, now)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._print(trainer, trainer.global_step, time.monotonic())

    @rank_zero_only
    def _print(self, trainer: pl.Trainer, step: int, now: float) -> None:
        self._last_step, self._last_time = step, now
        elapsed = now - self._start
        loss = trainer.callback_metrics.get("train_loss")
        done = step - self._start_step
        total = _planned_steps(trainer)
        eta = (total - step) * elapsed / done if total and done else None
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # --trainer.max_time
        left = timer.time_remaining("train") if timer is not None else None
        if left is not None:
            eta = left if eta is None else min(eta, left)
        parts = [
            f"step {step}" + (f"/{total}" if total else ""),
            f"epoch {trainer.current_epoch if self._epoch is None else self._epoch}",
            f"train_loss {float(loss):.4f}" if loss is not None else "train_loss -",
            f"{self._tokens / max(elapsed, 1e-9):,.0f} tok/s",
            f"elapsed {_clock(elapsed)}",
            f"eta {_clock(eta)}" if eta is not None else "eta -",
        ]
        print("  ".join(parts), flush=True)


def _planned_steps(trainer: pl.Trainer) -> int | None:
    """The step the run stops at by max_steps or max_epochs (None if neither bounds it)."""
    steps = [trainer.max_steps] if trainer.max_steps and trainer.max_steps > 0 else []
    per_epoch = trainer.num_training_batches
    if trainer.max_epochs and trainer.max_epochs > 0 and isinstance(per_epoch, int):
        steps.append(trainer.max_epochs * math.ceil(per_epoch / trainer.accumulate_grad_batches))
    return min(steps) if steps else None


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LearningRateLog(Callback):
    """Log the learning rate at logging steps (with the loss): one ``lr`` curve per distinct rate.

    Lightning's ``LearningRateMonitor`` logs every parameter group, and AdamW's two groups (with and
    without weight decay) share one rate: two identical curves.
    """

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx) -> None:
        if not trainer.loggers or not is_logging_step(trainer, batch_idx):
            return
        stats = {}
        for i, optimizer in enumerate(trainer.optimizers):
            name = "lr" if len(trainer.optimizers) == 1 else f"lr-{i}"
            rates = [group["lr"] for group in optimizer.param_groups]
            if len(set(rates)) == 1:
                stats[name] = rates[0]
            else:
                stats.update({f"{name}-pg{j}": rate for j, rate in enumerate(rates)})
        log_to_loggers(trainer, stats, step=trainer.global_step + 1)  # the rate of the step this batch makes


class KeepFreedMemory(Callback):
    """Keep freed memory in the process (`minigpt.allocator.keep_freed_memory`) once the data is ready.

    From `setup` on, which Lightning calls after `prepare_data`: preparing the data streams through
    buffers that it should hand back, the steps after it allocate the same tensors again and again.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        keep_freed_memory()


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar with the run's version named ``version`` (Lightning says ``v_num``)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items:
            items = {"version": items.pop("v_num"), **items}
        return items


class EMAWeights(WeightAveraging):
    """Validate, checkpoint and finish with an exponential moving average of the weights.

    Opt-in: ``minigpt fit --trainer.callbacks+=minigpt.callbacks.EMAWeights --trainer.callbacks.decay 0.99``.
    Lightning's `WeightAveraging` does the work: after every optimizer step the average moves towards the
    weights by ``1 - decay``; validation runs on the average; a checkpoint's ``state_dict`` holds the
    average (so ``evaluate``, ``generate`` and the exports read it) and ``current_model_state`` the weights
    being trained, which a resume continues from. 0.99 averages over about the last 100 steps.
    """

    def __init__(self, decay: float = 0.99):
        """
        Args:
            decay: the average's weight on its previous value at each step (0 < decay < 1).
        """
        if not 0 < decay < 1:
            raise ValueError(
                f"EMAWeights decay must be between 0 and 1 (exclusive), got {decay}; 0.99 averages over about "
                "the last 100 steps"
            )
        self._trained: dict[str, torch.Tensor] | None = None
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trained = None
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning moves the average into the model here, and the run's last checkpoint is written after
        # this hook: keep the weights being trained for it, so that a resume continues them.
        self._trained = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._trained is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._trained

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # validate and test (a run's config.yaml keeps this callback) score the average, which is the
        # checkpoint's state_dict: nothing to restore, and no warning to print.
        if self._average_model is not None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
