"""Key/value caches for `GPT`: what a decoding step keeps of the tokens already seen.

The model asks its cache two things (`GPT.hidden_states`): `prepare(T, key_padding_mask)` once before T new
tokens go through the blocks (their default positions, the attention mask, and whether SDPA's plain causal
flag applies), then `update(k, v, layer)` in every layer (store the new keys and values, return every key and
value the new tokens may attend to; the argument order of transformers' `Cache.update`). `KVCache` keeps all
rows at the same slot, which is what `minigpt.generation` needs; a cache with a slot per row (a server
batching requests of different lengths) or an adapter over transformers' `Cache` answers the same two calls.

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
