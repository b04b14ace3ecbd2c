"""Key/value caches for `GPT`: what a decoding step keeps of the tokens already seen.

The model asks its cache two things (`GPT.hidden_states`): `prepare(T, key_padding_mask)` once before T new
tokens go through the blocks (their default positions, the attention mask, and whether SDPA's plain causal
flag applies), then `update(k, v, layer)` in every layer (store the new keys and values, return every key and
value the new tokens may attend to; the argument order of transformers' `Cache.update`). `KVCache` keeps all
rows at the same slot, which is what `minigpt.generation` needs; `SlotCache` gives each row its own length (a
server batching requests of different lengths), and an adapter over transformers' `Cache` answers the same two calls.

Reference: the `Cache.update` API of Hugging Face transformers; litgpt `litgpt/model.py` (`KVCache`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from minigpt.config import GPTConfig


class Cache(Protocol):
    """What `GPT` asks of a cache (see the module docstring)."""

    @property
    def batch_size(self) -> int: ...

    def prepare(self, T: int, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None, bool]:
        """Before T new tokens: their default positions ((T,) or (B, T)), the attention mask, the causal flag."""
        ...

    def update(self, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """In each layer: store the new keys/values (B, nh, T, hs); return every visible one (B, nh, S, hs)."""
        ...


def attention_mask(
    start: int, T: int, key_padding_mask: Tensor | None, device: torch.device
) -> tuple[Tensor | None, bool]:
    """The attention mask of T queries at slots start .. start+T-1 over keys at slots 0 .. start+T-1.

    Args:
        start: Slot of the first query (the number of keys already cached).
        T: Number of queries.
        key_padding_mask: bool (B, start+T), True where a key slot holds a pad token; None without padding.
        device: Where the mask is built.

    Returns:
        (bool (B or 1, 1, T, S) mask with True = may attend, or None; whether SDPA's causal flag applies).
    """
    if key_padding_mask is None:
        if start == 0:
            return None, True  # square causal attention: SDPA's fast path
        if T == 1:
            return None, False  # one new token may see every cached key
    q_slot = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(start + T, device=device)[None, :]  # (1, S)
    mask = k_slot <= q_slot  # (T, S)
    if key_padding_mask is not None:
        # A pad query may have no visible key at all (left padding), and an all-masked softmax row is NaN;
        # letting every query see itself avoids that. Outputs at pad positions are ignored anyway.
        mask = mask & (~key_padding_mask[:, None, :] | (k_slot == q_slot))  # (B, T, S)
    return mask.unsqueeze(-3), False  # (B or 1, 1, T, S), broadcast over heads


class KVCache:
    """Keys and values of every layer for the slots filled so far, the same slots for every row.

    Slots are filled left to right: `pos` tokens have been written. Padding is remembered per slot so
    later tokens never attend to pad keys.

    Attributes:
        k: Per layer, (B, n_head, block_size, head_size) keys.
        v: Per layer, (B, n_head, block_size, head_size) values.
        key_padding_mask: (B, block_size) bool, True where the slot holds a pad token.
        pos: Number of slots filled so far.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, device: torch.device | None, dtype: torch.dtype | None
    ) -> None:
        shape = (batch_size, config.n_head, config.block_size, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.key_padding_mask = torch.zeros(batch_size, config.block_size, dtype=torch.bool, device=device)
        self.slots = torch.arange(config.block_size, device=device)  # default positions, sliced per step
        self.pos = 0
        self._start = 0  # first slot of the tokens being written (set by `prepare`)
        # Whether any padding mask was ever given: without one, decoding needs no explicit attention mask.
        self.has_padding = False

    @property
    def batch_size(self) -> int:
        return self.key_padding_mask.size(0)

    @property
    def capacity(self) -> int:
        """Number of slots (the model's block_size)."""
        return self.key_padding_mask.size(1)

    def reset(self) -> None:
        """Forget the cached positions (the tensors are reused)."""
        self.pos, self.has_padding = 0, False
        self.key_padding_mask.zero_()

    def prepare(self, T: int, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None, bool]:
        """Reserve slots pos .. pos+T-1 for T new tokens (B, T) and remember their padding.

        Returns:
            ((T,) positions, attention mask or None, causal flag), see `attention_mask`.
        """
        start = self.pos
        if start + T > self.capacity:
            raise ValueError(
                f"Cannot forward sequence of length {T} at cache position {start}, block_size is only "
                f"{self.capacity}. Crop the context and prefill a reset cache (sliding window)."
            )
        new_slots = self.key_padding_mask[:, start : start + T]
        if key_padding_mask is None:
            new_slots.fill_(False)
        else:
            new_slots.copy_(key_padding_mask)
            self.has_padding = True
        self._start, self.pos = start, start + T
        padding = self.key_padding_mask[:, : start + T] if self.has_padding else None
        return (self.slots[start : start + T], *attention_mask(start, T, padding, self.slots.device))

    def update(self, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Store one layer's new (B, n_head, T, head_size) keys and values at the reserved slots; return that
        layer's keys and values of every filled slot, (B, n_head, S, head_size), in the new keys' dtype (the
        cache may be kept in another dtype than autocast's compute dtype)."""
        s, e = self._start, self._start + k.size(2)
        self.k[layer][:, :, s:e] = k
        self.v[layer][:, :, s:e] = v
        return self.k[layer][:, :, :e].to(k.dtype), self.v[layer][:, :, :e].to(v.dtype)


class SlotCache:
    """Keys and values of up to `max_rows` sequences that each have their own length: a server's cache.

    Requests of different lengths decode together (continuous batching, the "slots" of llama.cpp's server):
    a request is prefilled alone into a free row through `row(i)`, then every decoding step feeds one token
    per row to rows 0 .. `rows`-1 at once, each at its own position and attending only to its own keys.
    The caller keeps the rows that take part in a step at the front (`move` fills the gap a finished
    request leaves), so a step reads views of the buffers, never a gathered copy, and a free row costs nothing.

    Attributes:
        k: Per layer, (max_rows, n_head, block_size, head_size) keys.
        v: Per layer, (max_rows, n_head, block_size, head_size) values.
        rows: Rows 0 .. rows-1 take part in the next decoding step.
    """

    def __init__(
        self, config: GPTConfig, max_rows: int, device: torch.device | None, dtype: torch.dtype | None
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}.")
        shape = (max_rows, config.n_head, config.block_size, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.slots = torch.arange(config.block_size, device=device)  # key slots, and a prefill's positions
        self.lengths = [0] * max_rows  # tokens held per row (kept on the host: no device sync to read them)
        self.rows = 0
        self._index: Tensor | None = None  # (rows,) row ids of the step being written (set by `prepare`)
        self._write: Tensor | None = None  # (rows,) slot each row writes its new key to
        self._seen = 0  # keys a step reads: the longest row's length after the step

    @property
    def batch_size(self) -> int:
        return self.rows

    @property
    def capacity(self) -> int:
        """Slots per row (the model's block_size)."""
        return self.slots.numel()

    @property
    def max_rows(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> _RowCache:
        """The cache of row `i` alone (batch 1) for a prefill: its first forward fills slots 0 .. T-1 of
        the row, whatever the row held before."""
        if not 0 <= i < self.max_rows:
            raise IndexError(f"row {i} is outside the cache's {self.max_rows} rows.")
        return _RowCache(self, i)

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` (keys, values, length) into row `dst`, e.g. the last active row into a freed one."""
        if src != dst:
            n = self.lengths[src]
            for buffers in (self.k, self.v):
                for layer in buffers:
                    layer[dst, :, :n] = layer[src, :, :n]
            self.lengths[dst] = n

    def prepare(self, T: int, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None, bool]:
        """Reserve each active row's next slot for one new token per row ((rows, 1) ids).

        Returns:
            ((rows, 1) positions, each row's own length; a bool (rows, 1, 1, S) mask letting each row see
            only its own filled slots, or None when all rows have the same length; False).
        """
        if T != 1 or key_padding_mask is not None:
            raise ValueError(
                f"A SlotCache step takes one token per row without padding (got {T} tokens per row); "
                "prefill a prompt through `row(i)`."
            )
        lengths = self.lengths[: self.rows]
        if not lengths:
            raise ValueError("A SlotCache step needs at least one active row (rows = 0).")
        if max(lengths) >= self.capacity:
            raise ValueError(
                f"A row holds {max(lengths)} tokens, block_size is only {self.capacity}: "
                "crop its context and prefill it again (sliding window)."
            )
        device = self.slots.device
        write = torch.tensor(lengths, device=device)  # (rows,) slot of each row's new token
        self._index = torch.arange(self.rows, device=device)
        self._write, self._seen = write, max(lengths) + 1
        mask = None
        if min(lengths) != max(lengths):
            mask = (self.slots[None, : self._seen] <= write[:, None]).view(self.rows, 1, 1, self._seen)
        for r in range(self.rows):
            self.lengths[r] += 1
        return write[:, None], mask, False

    def update(self, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Store one layer's (rows, n_head, 1, head_size) new keys and values at each row's reserved slot;
        return the active rows' keys and values over the longest row's slots, (rows, n_head, S, head_size)."""
        self.k[layer][self._index, :, self._write] = k[:, :, 0].to(self.k[layer].dtype)
        self.v[layer][self._index, :, self._write] = v[:, :, 0].to(self.v[layer].dtype)
        n, S = self.rows, self._seen
        return self.k[layer][:n, :, :S].to(k.dtype), self.v[layer][:n, :, :S].to(v.dtype)


class _RowCache:
    """One row of a `SlotCache` as a batch-1 cache that a prompt is prefilled through (see `SlotCache.row`)."""

    batch_size = 1

    def __init__(self, cache: SlotCache, row: int) -> None:
        self.cache, self.index, self._end = cache, row, 0

    def prepare(self, T: int, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None, bool]:
        """Slots 0 .. T-1 of the row for a prompt of T tokens: ((T,) positions, None, causal)."""
        if key_padding_mask is not None or self._end:
            raise ValueError("A SlotCache row takes one prefill of an unpadded prompt; decode through the SlotCache.")
        if T > self.cache.capacity:
            raise ValueError(f"Cannot prefill {T} tokens, block_size is only {self.cache.capacity}.")
        self._end = self.cache.lengths[self.index] = T
        return self.cache.slots[:T], None, True

    def update(self, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Store the prompt's (1, n_head, T, head_size) keys and values; return them as the cache holds them."""
        i, T = self.index, self._end
        self.cache.k[layer][i : i + 1, :, :T] = k
        self.cache.v[layer][i : i + 1, :, :T] = v
        return self.cache.k[layer][i : i + 1, :, :T].to(k.dtype), self.cache.v[layer][i : i + 1, :, :T].to(v.dtype)
