"""The output head of one decoding step: plain `F.linear`, or a packed copy of it where that measures faster.

Plain reference: `F.linear(hidden, weight, bias)`, what `GPT.head_logits` computes for a linear head.
Fast path: `PackedHead`, the same weights laid out as slabs of columns for a product with few rows.
`decode_head` returns one of the two for a weight/bias pair; with "auto" it measures both once per device,
dtype, shape and batch size, and keeps the packed copy of a weight tensor until that tensor changes.
Heads that are not one linear layer (the adaptive softmax) have no packed form: the caller uses them as
they are (`plain_only` checks the choice for them).

Test: tests/test_generation.py (packed equals plain in float32 and under bf16 autocast, whole generations
equal, the copy follows weight updates, "auto" returns the faster of the two).
Benchmark: scripts/bench_generate.py (the head-alone rows, and the cold first call that builds and measures).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from minigpt.errors import UserError

HeadChoice = Literal["auto", "plain", "packed"]
"""How a decoding step applies a linear head to its last hidden states."""

Head = Callable[[Tensor], Tensor]  # (B, C) hidden states -> (B, V) scores


class PackedHead:
    """A linear head (V, C) stored as S slabs of (C, P) columns, S x P >= V, for matrix-vector products.

    Plain counterpart: `F.linear(h, W, b)` with the (V, C) row-major matrix. A decoding step multiplies
    only B (often 1) rows by the head, which is bound by reading W once. On some CPUs the (C, V) layout
    streams faster for so few rows, and S slabs in one `baddbmm` (bias fused) split the read between S
    threads; on others the plain product is as fast. `decode_head` measures both (per device and shape)
    and uses this one only where it wins.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, splits: int) -> None:
        V, C = weight.shape
        P = -(-V // splits)
        with torch.no_grad():
            self.weight = weight.new_empty(splits, C, P)  # (S, C, P): slab i holds rows [iP, iP+P) of W
            for i in range(splits):
                rows = weight[i * P : (i + 1) * P]  # (<= P, C): the last slab may be short
                self.weight[i, :, : rows.size(0)] = rows.t()
                self.weight[i, :, rows.size(0) :] = 0
            self.bias = None if bias is None else bias.new_zeros(splits, 1, P)  # (S, 1, P)
            if self.bias is not None:
                self.bias.view(-1)[:V] = bias
        self.vocab_size = V

    def __call__(self, hidden: Tensor) -> Tensor:
        """(B, C) hidden states -> (B, V) logits."""
        S, B, C = self.weight.size(0), hidden.size(0), hidden.size(1)
        h = hidden.expand(S, B, C)
        parts = torch.bmm(h, self.weight) if self.bias is None else torch.baddbmm(self.bias, h, self.weight)
        return parts.transpose(0, 1).reshape(B, -1)[:, : self.vocab_size]  # (S, B, P) -> (B, V)


def decode_head(weight: Tensor, bias: Tensor | None, batch_size: int, choice: HeadChoice = "auto") -> Head:
    """The function a decoding step sends its last hidden states (B, C) through, giving (B, V) logits.

    Args:
        weight: (V, C) weight of the linear head (not modified).
        bias: (V,) bias of the head, or None.
        batch_size: Rows per step (B).
        choice: "plain" is `F.linear(hidden, weight, bias)`; "packed" a `PackedHead` copy (kept per
            weight tensor until the weights change); "auto" the packed head only where a one-time
            measurement (per device, dtype, shape and batch size, cached for the process) found it
            faster than the plain one.

    Raises:
        UserError: `choice` is not one of the three.
    """
    _check(choice)
    plain = partial(F.linear, weight=weight, bias=bias)
    if choice == "plain":
        return plain
    key = _win_key(weight, bias, batch_size)
    if choice == "auto" and _WINS.get(key) is False:
        return plain  # measured before: plain wins here, so no packed copy is built
    packed = packed_head(weight, bias)
    if choice == "packed":
        return packed
    if key not in _WINS:
        _WINS[key] = _packed_is_faster(plain, packed, weight, batch_size)
    if _WINS[key]:
        return packed
    _PACKED.pop(weight, None)  # plain won: keep no copy of the head that nothing uses
    return plain


def plain_only(head: Head, choice: HeadChoice = "auto") -> Head:
    """`head` itself, for an output head that is not one linear layer (the adaptive softmax).

    Such a head has no packed form: "auto" and "plain" both mean `head`.

    Raises:
        UserError: `choice` is "packed", or not one of the three.
    """
    _check(choice)
    if choice == "packed":
        raise UserError("the packed head needs a linear head; use head 'auto' or 'plain' for this model.")
    return head


def packed_head(weight: Tensor, bias: Tensor | None) -> PackedHead:
    """The head `weight`, `bias` as a `PackedHead`, rebuilt only when the weights change.

    The copy is cached per weight tensor; its key holds the tensors' version counters (they move with
    every in-place update: an optimizer step, `load_state_dict`) and storage, so a stale copy is never used.
    """
    key = (_version(weight), weight.data_ptr(), None if bias is None else (_version(bias), bias.data_ptr()))
    cached = _PACKED.get(weight)
    if cached is not None and cached[0] == key and key[0] is not None:
        return cached[1]
    packed = PackedHead(weight, bias, _splits(weight.device))
    _PACKED[weight] = (key, packed)
    return packed


def decode_head_cache_size() -> int:
    """Packed copies plus measurements held now (a benchmark checks that its cold row starts from 0)."""
    return len(_PACKED) + len(_WINS)


def reset_decode_heads() -> None:
    """Forget every packed copy and measurement (benchmarks use it to time the cold first call)."""
    _PACKED.clear()
    _WINS.clear()


_PACKED = WeakTensorKeyDictionary()  # weight tensor -> (its version key, PackedHead); dies with the weight
_WINS: dict[tuple, bool] = {}  # _win_key -> whether the packed head measured faster
_ROUNDS = 5  # timed calls per contender in the one-time measurement (the fastest counts)


def _check(choice: str) -> None:
    if choice not in ("auto", "plain", "packed"):
        raise UserError(f"head must be 'auto', 'plain' or 'packed', got {choice!r}.")


def _splits(device: torch.device) -> int:
    # One slab per CPU thread lets `bmm` share the read between threads; a GPU parallelises one slab.
    return torch.get_num_threads() if device.type == "cpu" else 1


def _win_key(weight: Tensor, bias: Tensor | None, batch_size: int) -> tuple:
    return (weight.device, weight.dtype, tuple(weight.shape), bias is not None, batch_size)


def _packed_is_faster(plain: Head, packed: PackedHead, weight: Tensor, batch_size: int) -> bool:
    hidden = torch.randn(batch_size, weight.size(1), device=weight.device, dtype=weight.dtype)
    best = {"plain": float("inf"), "packed": float("inf")}
    with torch.no_grad():
        for _ in range(_ROUNDS + 1):  # one more round: the first call of each may include warm-up
            for name, fn in (("plain", plain), ("packed", packed)):
                best[name] = min(best[name], _seconds(fn, hidden))
    return best["packed"] < best["plain"]


def _seconds(fn: Head, x: Tensor) -> float:
    """Seconds of one call of `fn` on `x`, the device's queued work included."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn(x)
    sync()
    return time.perf_counter() - t0


def _version(tensor: Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter: no caching for them
        return None
