"""Checkpoints of a training run: crash-safe writes, and one `last.ckpt` plus the best files per run.

* `AtomicCheckpointIO`: `minigpt.checkpoint.save_checkpoint` as Lightning's CheckpointIO plugin.
  `use_atomic_writes(trainer)` installs it after the Trainer is built, so the run's saved config
  never holds an object it cannot write back (a config re-runs as it is).
* `RunCheckpoint`: Lightning's `ModelCheckpoint` that keeps rotating the same files after a resume,
  even if the run folder was reached by another path, does not warn that its own folder is not
  empty when a run resumes into it, can save `last.ckpt` on demand (Ctrl-C) and saves it when a run
  ends between two of its saves (at its last step, so that a run extended from it continues the data
  where it stopped).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from minigpt.checkpoint import save_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transaction is the right tool there
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_checkpoint(checkpoint, path)


def use_atomic_writes(trainer: pl.Trainer) -> None:
    """Write the trainer's checkpoints with `AtomicCheckpointIO`, unless a CheckpointIO was configured."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not one configured
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose state (best files, `last.ckpt`) survives a resume into the same folder.

    Lightning restores the best-k bookkeeping only when the stored `dirpath` string equals the new
    one; otherwise it forgets the old best files (never deleted) and, finding a `last.ckpt` it did
    not write, saves `last-v1.ckpt`. Here files of the stored state that exist in this run's folder
    are adopted, and those that do not are dropped.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.saved_step: int | None = None  # global_step of the newest checkpoint written in this fit
        with warnings.catch_warnings():
            if self.dirpath is None:
                # The folder is the run's own version_N/checkpoints: a new run's is empty, so one with
                # files is this run's, resumed (the user gave no folder of their own to protect).
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.dirpath is None:
            return super().load_state_dict(state_dict)

        def adopt(path: str | None) -> str:
            # A file of the stored run that lives in this folder under the same name, spelled as
            # ModelCheckpoint spells its own paths (it compares them as strings).
            here = os.path.join(self.dirpath, Path(path).name) if path else ""
            return here if here and os.path.isfile(here) else ""

        state = dict(state_dict, dirpath=self.dirpath)
        state["best_k_models"] = {
            adopt(p): v for p, v in (state_dict.get("best_k_models") or {}).items() if adopt(p)
        }  # fmt: skip
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = adopt(state_dict.get(key))
        if not state["best_k_models"]:
            state["best_model_score"] = None
        super().load_state_dict(state)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Called for every checkpoint the trainer writes, on every process. ModelCheckpoint writes
        # last.ckpt along with each of its best files, so a save at a step means last.ckpt holds it.
        self.saved_step = trainer.global_step
        # What was logged up to this step goes to disk with it: a run killed later and resumed from this
        # checkpoint keeps its curves up to here and drops only what came after (see run_logger).
        for logger in trainer.loggers:
            flush = getattr(getattr(logger, "experiment", None), "flush", None)
            if callable(flush):
                flush()

    def save_last_now(self, trainer: pl.Trainer) -> str:
        """Save `last.ckpt` now, under the name the periodic save uses (replaced in place); return its path.

        ModelCheckpoint's own bookkeeping is left alone, so the validation Lightning runs when a run is
        asked to stop still ranks this step among the best files (and then writes `last.ckpt` again).
        """
        metrics = {**trainer.callback_metrics, "epoch": torch.tensor(trainer.current_epoch),
                   "step": torch.tensor(trainer.global_step)}  # fmt: skip
        # Named before saving, so the file's own copy of this callback's state names it.
        self.last_model_path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(self.last_model_path, weights_only=self.save_weights_only)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
        return self.last_model_path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The last step of a run that stops in the middle of an epoch (max_steps, max_time) is saved here,
        # where the data loader's position is the next batch's. By on_train_end Lightning counts the epoch
        # as done, and a run extended from a checkpoint written there would start the next epoch instead.
        ends = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step  # max_steps -1: no limit
        if ends and trainer.global_step > 0 and self.saved_step != trainer.global_step and not trainer.fast_dev_run:
            self.save_last_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run that ends between two saves (by max_steps, max_time) still saves its final state.

        Replaces ModelCheckpoint's, which saves `last.ckpt` only when it saved nothing in this fit.
        """
        if trainer.global_step > 0 and self.saved_step != trainer.global_step and not trainer.fast_dev_run:
            self.save_last_now(trainer)


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where the run's `last.ckpt` lives (the checkpoint callback's folder, else the root dir)."""
    ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    folder = ckpt.dirpath if ckpt is not None and ckpt.dirpath else trainer.default_root_dir
    return Path(os.fspath(folder)) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
