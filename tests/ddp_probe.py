"""A callback for the multi-process test: each rank writes the batches it trained on."""

from pathlib import Path

import torch
from lightning.pytorch import Callback


class RecordBatches(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[0].clone())

    def on_train_end(self, trainer, pl_module):
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(self.batches, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")
