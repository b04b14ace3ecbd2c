"""Optional fast paths, each beside the plain reference it must equal.

Nothing here is needed for correctness: the model (`minigpt/model.py`) and generation
(`minigpt/generation.py`) work with plain PyTorch alone. Each kernel below names its plain
counterpart, has a test holding it to that reference (forward, gradients, bf16 where it applies),
and a benchmark row showing where it wins; it is used only where that measurement says so.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from minigpt.errors import UserError

if TYPE_CHECKING:
    from minigpt.model import GPT

# -- training: the loss over a large linear head ------------------------------------------------------


# -- generation: the output head for one decoding step ------------------------------------------------

HeadChoice = Literal["auto", "plain", "packed"]
"""How `decode_head` applies a linear head to one step's last hidden states."""


class PackedHead:
    """A linear head (V, C) stored as S slabs of (C, P) columns, S x P >= V, for matrix-vector products.

    Plain counterpart: `GPT.head_logits`, i.e. `F.linear(h, W, b)` with the (V, C) row-major matrix.
    A decoding step multiplies only B (often 1) rows by the head, which is bound by reading W once. On
    some CPUs the (C, V) layout streams faster for so few rows, and S slabs in one `baddbmm` (bias
    fused) split the read between S threads; on others the plain product is as fast. `decode_head`
    measures both (per device and shape) and uses this one only where it wins.
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


def decode_head(model: GPT, batch_size: int, choice: HeadChoice = "auto") -> Callable[[Tensor], Tensor]:
    """The function a decoding step sends its last hidden states (B, C) through, giving (B, V) scores.

    Args:
        model: The model whose head it is (not modified).
        batch_size: Rows per step (B).
        choice: "plain" is `model.head_logits`; "packed" a `PackedHead` copy of the linear head (kept
            per model until the head's weights change); "auto" the packed head only where a one-time
            measurement (per device, dtype, shape and batch size, cached for the process) found it
            faster than the plain one. The adaptive head always runs plain.
    """
    if choice not in ("auto", "plain", "packed"):
        raise UserError(f"head must be 'auto', 'plain' or 'packed', got {choice!r}.")
    if choice == "plain" or model.config.head != "linear":
        if choice == "packed":
            raise UserError(f"the packed head needs a linear head, this model's is {model.config.head!r}.")
        return model.head_logits
    packed = packed_head(model)
    if choice == "packed" or _packed_wins(model, packed, batch_size):
        return packed
    return model.head_logits


def packed_head(model: GPT) -> PackedHead:
    """The model's linear head as a `PackedHead`, rebuilt only when its weights change.

    The copy is cached per model; the key holds the weights' version counters (they move with every
    in-place update: an optimizer step, `load_state_dict`) and storage, so a stale copy is never used.
    """
    weight, bias = model.lm_head.weight, model.lm_head.bias
    key = (_version(weight), weight.data_ptr(), None if bias is None else (_version(bias), bias.data_ptr()))
    cached = _PACKED.get(model)
    if cached is not None and cached[0] == key and key[0] is not None:
        return cached[1]
    packed = PackedHead(weight, bias, _splits(weight.device))
    _PACKED[model] = (key, packed)
    return packed


def decode_head_cache_size() -> int:
    """Packed copies plus measurements held now (a benchmark checks that its cold row starts from 0)."""
    return len(_PACKED) + len(_WINS)


def reset_decode_heads() -> None:
    """Forget every packed copy and measurement (benchmarks use it to time the cold first call)."""
    _PACKED.clear()
    _WINS.clear()


_PACKED: weakref.WeakKeyDictionary[GPT, tuple[tuple, PackedHead]] = weakref.WeakKeyDictionary()
_WINS: dict[tuple, bool] = {}
_ROUNDS = 5  # timed calls per contender in the one-time measurement (the fastest counts)


def _splits(device: torch.device) -> int:
    # One slab per CPU thread lets `bmm` share the read between threads; a GPU parallelises one slab.
    return torch.get_num_threads() if device.type == "cpu" else 1


def _packed_wins(model: GPT, packed: PackedHead, batch_size: int) -> bool:
    weight = model.lm_head.weight
    key = (weight.device, weight.dtype, tuple(weight.shape), packed.bias is not None, batch_size)
    if key not in _WINS:
        hidden = torch.randn(batch_size, weight.size(1), device=weight.device, dtype=weight.dtype)
        best = {"plain": float("inf"), "packed": float("inf")}
        with torch.no_grad():
            for _ in range(_ROUNDS + 1):  # the first round warms up both
                for name, fn in (("plain", model.head_logits), ("packed", packed)):
                    best[name] = min(best[name], _seconds(fn, hidden))
        _WINS[key] = best["packed"] < best["plain"]
    return _WINS[key]


def _seconds(fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
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
