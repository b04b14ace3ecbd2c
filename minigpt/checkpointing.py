"""Checkpoints of a training run: crash-safe writes, and one `last.ckpt` plus the best files per run.

* `AtomicCheckpointIO`: `minigpt.checkpoint.save_checkpoint` as Lightning's CheckpointIO plugin.
  `use_atomic_writes(trainer)` installs it after the Trainer is built, so the run's saved config
  never holds an object it cannot write back (a config re-runs as it is).
* `RunCheckpoint`: Lightning's `ModelCheckpoint` that keeps rotating the same files after a resume,
  even if the run folder was reached by another path, and does not warn that its own folder is
  not empty when a run resumes into it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
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
    current = trainer.strategy._checkpoint_io
    if current is None or type(current) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose state (best files, `last.ckpt`) survives a resume into the same folder.

    Lightning restores the best-k bookkeeping only when the stored `dirpath` string equals the new
    one; otherwise it forgets the old best files (never deleted) and, finding a `last.ckpt` it did
    not write, saves `last-v1.ckpt`. Here files of the stored state that exist in this run's folder
    are adopted, and those that do not are dropped.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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

    def save_last_now(self, trainer: pl.Trainer) -> str:
        """Save `last.ckpt` now, as the periodic save does (same name, replaced in place); return its path."""
        previous = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        # Lightning validates once more when a run is asked to stop; that validation must still rank
        # this step among the best files (ModelCheckpoint skips a step it has already saved).
        self._last_global_step_saved = previous
        return self.last_model_path


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where the run's `last.ckpt` lives (the checkpoint callback's folder, else the root dir)."""
    ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    folder = ckpt.dirpath if ckpt is not None and ckpt.dirpath else trainer.default_root_dir
    return Path(os.fspath(folder)) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
