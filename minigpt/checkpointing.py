"""Crash-safe checkpoint writes for Lightning: `minigpt.checkpoint.save_checkpoint` as a CheckpointIO plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from minigpt.checkpoint import save_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transaction is the right tool there
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_checkpoint(checkpoint, path)
