"""Training callbacks: sample generations while training, and a Ctrl-C that saves before stopping."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from minigpt.generation import SamplingConfig, check_sampling, generate_text

log = logging.getLogger(__name__)


class GenerationCallback(Callback):
    """At the end of each validation epoch, continue fixed prompts with a fixed seed.

    The text goes to TensorBoard (text panel, tag ``samples``) and to the console, so what the
    model writes can be followed while it learns.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 30,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int = 0,
        enabled: bool = True,
    ):
        """
        Args:
            prompts: texts to continue (default: ["the movie was"]).
            max_new_tokens: tokens to generate per prompt.
            temperature: sampling temperature (0 = greedy).
            top_k: keep the k most likely tokens (None = all).
            top_p: nucleus sampling threshold (None = off).
            seed: seed of the sampling generator, the same at every epoch.
            enabled: turn the samples off.
        """
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        if max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.prompts = list(prompts) if prompts else ["the movie was"]
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.seed, self.enabled = seed, enabled
        self.last_samples: list[tuple[str, str]] = []

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tokenizer = getattr(pl_module, "tokenizer", None)
        if not self.enabled or trainer.sanity_checking or tokenizer is None:
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        # Sampling must not disturb the training random state (exact resume depends on it).
        with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
            self.last_samples = [
                (
                    prompt,
                    generate_text(
                        pl_module.model,
                        tokenizer,
                        prompt,
                        SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p),
                        generator=generator,
                    ),
                )
                for prompt in self.prompts
            ]
        text = "\n\n".join(f"**{p}** {c}" for p, c in self.last_samples)
        for p, c in self.last_samples:
            log.info("sample (step %d): %s | %s", trainer.global_step, p, c)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("samples", text, global_step=trainer.global_step)


class GracefulStop(Callback):
    """Never end a run without a resumable ``last.ckpt``.

    * First Ctrl-C (SIGINT): finish the current step, save ``last.ckpt``, stop cleanly; a second
      Ctrl-C interrupts at once, as usual.
    * A run that ends by ``max_steps``/``max_time`` between two validations (when
      ``ModelCheckpoint`` would not save) still saves its final state.

    The checkpoint resumes with ``--ckpt_path last``.
    """

    def __init__(self) -> None:
        self.requested = False
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
            path = self.save_last(trainer)
            log.warning("saved %s; resume with: minigpt fit ... --ckpt_path last", path)
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.last_path(trainer)
        if trainer.global_step > 0 and _saved_step(path) != trainer.global_step:
            trainer.save_checkpoint(path, weights_only=False)

    @staticmethod
    def last_path(trainer: pl.Trainer) -> Path:
        ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir)
        return folder / "last.ckpt"

    def save_last(self, trainer: pl.Trainer) -> Path:
        path = self.last_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        return path


def _saved_step(path: Path) -> int | None:
    if not path.exists():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # unreadable: rewrite it
        return None
