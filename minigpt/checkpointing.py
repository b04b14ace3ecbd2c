"""Crash-safe checkpoint writes.

Lightning's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec
transaction, whose local temporary file lives in the system temp folder: when that is another
filesystem than the checkpoint folder, the final "move" is a copy, and a crash during it leaves
a truncated ``last.ckpt`` -- exactly the file a resume reads. This plugin writes a temporary
file next to the target, flushes it to disk and renames it over the target, so a reader sees the
old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transaction is the right tool there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
