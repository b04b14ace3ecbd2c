"""Training pairs from token ids: the one-token shift, three ways to cut, padding collate, sampler.

All datasets read a flat ``ids`` array with ``offsets`` (document ``d`` is
``ids[offsets[d]:offsets[d+1]]``), so they work on memory-mapped cache files and are cheap to
send to worker processes. Every sample is a pair ``(x, y)`` with ``y`` the slice after ``x``:

    x = s[i : i+T]          y = s[i+1 : i+T+1]

Randomness never lives in the dataset: the sampler hands out *virtual* indices
``epoch * len(dataset) + i`` and a sample's random window is a pure function of
``(seed, virtual index)``, so workers, resume and multi-process runs all see the same samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from minigpt.tokenizer import EOT_ID, IGNORE_INDEX, PAD_ID


def flatten(docs: list[list[int]], dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (ids, offsets), the layout every dataset here reads."""
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    ids = np.fromiter((t for d in docs for t in d), dtype=dtype, count=int(lengths.sum()))
    return ids, np.concatenate(([0], np.cumsum(lengths)))


def _doc(ids: np.ndarray, offsets: np.ndarray, d: int) -> np.ndarray:
    return ids[offsets[d] : offsets[d + 1]]


class RandomWindowDataset(Dataset):
    """The tutorial's sampling: one random window of ``block_size`` tokens per review and visit.

    A review not longer than ``block_size`` is used whole, its target ending in ``<|endoftext|>``.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, block_size: int, seed: int = 0, eot_id: int = EOT_ID):
        self.ids, self.offsets, self.block_size, self.seed, self.eot_id = ids, offsets, block_size, seed, eot_id

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        doc = _doc(self.ids, self.offsets, index % len(self))
        T = self.block_size
        if len(doc) <= T:
            s = np.append(doc, self.eot_id)
            return _pair(s[:-1], s[1:])
        # A window needs T + 1 tokens; start is uniform over every possible start.
        start = int(np.random.default_rng((self.seed, index)).integers(0, len(doc) - T))
        s = doc[start : start + T + 1]
        return _pair(s[:-1], s[1:])


class PackedDataset(Dataset):
    """Reviews joined as ``doc <eot> doc <eot> ...`` and cut into consecutive blocks.

    Block ``b`` predicts tokens ``b*T+1 .. b*T+T`` of the stream, so an epoch scores every token
    (but the very first) exactly once.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, block_size: int, eot_id: int = EOT_ID):
        self.stream = _join_with_eot(ids, offsets, eot_id)
        self.block_size = block_size

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.block_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = (index % len(self)) * self.block_size
        s = self.stream[i : i + self.block_size + 1]
        return _pair(s[:-1], s[1:])


class DocumentWindowDataset(Dataset):
    """Fixed windows for evaluation: every token of every document scored exactly once.

    Each document becomes ``<eot> doc <eot>`` (the leading ``<eot>`` is the context of the first
    word, as between packed documents) and is cut into consecutive windows of ``block_size``
    targets; windows never cross documents and are identical on every pass. ``stride`` < block
    size gives later windows ``block_size - stride`` tokens of extra context, while each target is
    still scored once (the overlap's targets are ``IGNORE_INDEX``, which the loss skips).
    """

    def __init__(
        self, ids: np.ndarray, offsets: np.ndarray, block_size: int, stride: int | None = None, eot_id: int = EOT_ID
    ):
        stride = stride or block_size
        if not 1 <= stride <= block_size:
            raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
        self.ids, self.offsets, self.block_size, self.stride, self.eot_id = ids, offsets, block_size, stride, eot_id
        windows = []
        for d in range(len(offsets) - 1):
            n_targets = int(offsets[d + 1] - offsets[d]) + 1  # every word and the final <eot>
            extra = max(0, -(-(n_targets - block_size) // stride))  # ceil: windows after the first
            starts = np.arange(extra + 1, dtype=np.int64) * stride
            windows.append(np.stack([np.full(len(starts), d, dtype=np.int64), starts], axis=1))
        self.windows = np.concatenate(windows) if windows else np.zeros((0, 2), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        d, start = (int(v) for v in self.windows[index])
        s = np.concatenate(([self.eot_id], _doc(self.ids, self.offsets, d), [self.eot_id]))
        x, y = s[start : start + self.block_size], s[start + 1 : start + self.block_size + 1].copy()
        if start > 0:  # targets already scored by the previous window are context only
            y[: self.block_size - self.stride] = IGNORE_INDEX
        return _pair(x, y)


def _join_with_eot(ids: np.ndarray, offsets: np.ndarray, eot_id: int) -> np.ndarray:
    n_docs = len(offsets) - 1
    out = np.empty(len(ids) + n_docs, dtype=np.int64)
    # document d moves right by d slots (one <eot> after each earlier document)
    ends = offsets[1:] + np.arange(n_docs)
    out[ends] = eot_id
    mask = np.ones(len(out), dtype=bool)
    mask[ends] = False
    out[mask] = ids
    return out


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.asarray(x, dtype=np.int64)), torch.from_numpy(np.asarray(y, dtype=np.int64))


def pad_collate(
    batch: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack pairs into batch-first ``(B, T)`` long tensors, right-padded.

    Inputs are padded with ``pad_id`` (the tokenizer's ``<pad>``), targets with ``IGNORE_INDEX``,
    so the loss skips padding by position whatever the tokenizer (GPT-2 has no pad token).
    """
    T = max(len(x) for x, _ in batch)
    xs = torch.full((len(batch), T), pad_id, dtype=torch.long)
    ys = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        xs[i, : len(x)] = x
        ys[i, : len(y)] = y
    return xs, ys


class EpochSampler(Sampler[int]):
    """Shuffles with a permutation that depends only on ``(seed, epoch)`` and yields virtual indices.

    Lightning calls ``set_epoch`` at the start of each epoch; ``state_dict`` lets
    ``StatefulDataLoader`` resume mid-epoch at the exact next sample.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0
        self._next = 0  # position in the current epoch's order

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._next = epoch, 0

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        while self._next < self.n:
            i = order[self._next]
            self._next += 1
            yield self.epoch * self.n + i
        self._next = 0
        # An epoch that ran out on its own moves on, so a second `iter` without set_epoch
        # (plain loops, tests) does not repeat the same order.
        self.epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next": self._next, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != self.n or state.get("seed") != self.seed:
            raise ValueError(
                f"cannot resume the data position: the checkpoint's sampler saw {state.get('n')} samples "
                f"(seed {state.get('seed')}), this run has {self.n} (seed {self.seed}); the data changed"
            )
        self.epoch, self._next = state["epoch"], state["next"]
