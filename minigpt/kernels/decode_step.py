"""One decoding step outside the output head: the trunk for one new token per row, and the greedy pick.

With one new token per row, every op of the trunk is tiny ((B, C) rows through (C, 3C) matrices), so a
step costs its number of ops, and the fork and join of torch's thread team inside each op, more than its
arithmetic. The head, one read of a (V, C) matrix, is the one large op (`minigpt.kernels.decode_head`).
Each fast path here sits beside its plain reference:

- the trunk (`decode_trunk`): two ways to compute it, each on torch's intra-op threads or on one thread
  (`one_thread`: no thread team to fork and join inside every op, and no waiting at the join for a core
  that another process holds):
  "plain" is `GPT.hidden_states(idx, positions=..., cache=...)` (the reference) and "one_thread" the
  same on one thread; "lean" is `one_token_hidden`, the same blocks for one new token with fewer ops (no
  check, mask or position built per step, (B, C) rows throughout, keys and values written straight into
  the `KVCache`) and "lean_one_thread" the same on one thread. "auto" takes the fastest of the four for
  a model and batch size, timing each followed by the step's head: the head's read evicts the trunk's
  weights from the caches, and a head on several threads wakes the threads a one-thread trunk left idle.
- the greedy pick (`greedy_pick`): "plain" is `logits.argmax(-1)`, whose CPU kernel is several times
  slower than a plain maximum (https://github.com/pytorch/pytorch/issues/140000); "chunked" is
  `chunked_argmax`, a maximum per chunk of the vocabulary and the argmax inside the winning chunk only
  (the same first index of the maximum); "auto" measures both once per device, dtype and shape.

Test: tests/test_kernels.py (each fast path equals its reference; "auto" keeps the faster one) and
tests/test_generation.py (whole generations equal for every trunk: KV cache, sliding window, left-padded
batches, sampled text).
Benchmark: scripts/bench_generate.py (a row per trunk beside the bound, and the greedy pick alone).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt.cache import KVCache
from minigpt.errors import UserError
from minigpt.model import GPT, CausalSelfAttention, adaptive_input_embedding, apply_rotary

TrunkChoice = Literal["auto", "plain", "one_thread", "lean", "lean_one_thread"]
"""How a decoding step runs the trunk over one new token per row (see the module docstring)."""

PickChoice = Literal["auto", "plain", "chunked"]
"""How the greedy pick finds each row's best score."""

Trunk = Callable[[Tensor, "Tensor | None", KVCache, "Tensor | None"], Tensor]
"""(B, 1) new ids, (B, 1) positions or None (the cache's slots), a prefilled cache, (B,) the token before each new
one or None (see `GPT.forward`'s `previous`) -> (B, 1, C) hidden states."""

TRUNK_CHOICES: tuple[str, ...] = ("auto", "plain", "one_thread", "lean", "lean_one_thread")
PICK_CHOICES: tuple[str, ...] = ("auto", "plain", "chunked")


# -- the trunk ---------------------------------------------------------------------------------------


def decode_trunk(
    model: GPT, cache: KVCache, choice: TrunkChoice = "auto", head: Callable[[Tensor], Tensor] | None = None
) -> Trunk:
    """The function a decoding step runs its one new token per row through, for `model` and its `cache`.

    Args:
        model: The language model, in eval mode while the trunk is used (the lean trunk has no dropout).
        cache: The empty `KVCache` the decoding will use ("auto" measures on it and leaves it empty).
        choice: "plain", "one_thread", "lean", "lean_one_thread" or "auto" (see `resolve_trunk`).
        head: The step's output head, (B, C) -> (B, V): "auto" times each trunk followed by it.

    Raises:
        UserError: `choice` is not one of the five, or is a lean trunk for a model with forward hooks.
    """
    return _trunks(model)[resolve_trunk(model, cache, choice, head)]


def resolve_trunk(
    model: GPT, cache: KVCache, choice: TrunkChoice = "auto", head: Callable[[Tensor], Tensor] | None = None
) -> str:
    """The trunk `choice` stands for: itself, or for "auto" the fastest of the four for `model` at the
    cache's batch size, each timed with `head` after it (the median of `_ROUNDS` steps), once per device,
    dtype, config, batch size and thread count, on the empty `cache` (left empty).

    The lean trunks call the blocks' parts, not the blocks, so a lean choice for a model with forward
    hooks (on any module) is a `UserError`, and "auto" gives such a model "plain" without timing anything.
    """
    check_trunk(choice)
    hooked = _has_forward_hooks(model)
    if choice.startswith("lean") and hooked:
        raise UserError(
            f"trunk {choice!r} skips the model's modules that forward hooks are registered on; "
            "use trunk 'plain', 'one_thread' or 'auto', or remove the hooks."
        )
    if choice != "auto":
        return choice
    # Hooks must see every step and nothing else (timing the trunks would run them on probe steps); and
    # with a single slot no token is ever decoded after a prefill: every step prefills the window.
    if hooked or cache.capacity < 2:
        return "plain"
    device = cache.k[0].device
    key = (device, cache.k[0].dtype, repr(model.config), cache.batch_size, torch.get_num_threads())
    if key not in _TRUNKS:
        _TRUNKS[key] = _fastest(_trunks(model), partial(_probe_step, cache=cache, head=head), device)
    return _TRUNKS[key]


def _has_forward_hooks(model: GPT) -> bool:
    # torch has no public query for registered hooks; these dicts are where `register_forward_hook`,
    # `register_forward_pre_hook` and their global `register_module_*` versions keep them.
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _trunks(model: GPT) -> dict[str, Trunk]:
    plain, lean = partial(_plain_trunk, model), partial(one_token_hidden, model)
    return {
        "plain": plain,
        "one_thread": partial(_on_one_thread, plain),
        "lean": lean,
        "lean_one_thread": partial(_on_one_thread, lean),
    }


def check_trunk(choice: str) -> None:
    """Reject a trunk choice that is not one of `TRUNK_CHOICES` with a `UserError` naming them."""
    if choice not in TRUNK_CHOICES:
        raise UserError(f"trunk must be one of {', '.join(map(repr, TRUNK_CHOICES))}, got {choice!r}.")


def one_token_hidden(
    model: GPT, idx: Tensor, positions: Tensor | None, cache: KVCache, previous: Tensor | None = None
) -> Tensor:
    """`model.hidden_states(idx, positions=..., cache=..., previous=...)` for one new token per row, with fewer ops.

    The token goes to slot `cache.pos` (the cache holds at least one earlier slot and has room for one
    more). It is never a pad, so it may attend to every filled slot but the prefill's pads: the mask is
    the cache's padding mask as it is, and no mask at all without padding. The rows stay (B, C) from the
    embedding to the last norm, and dropout is skipped (eval mode).

    Args:
        model: The language model whose blocks run.
        idx: (B, 1) new token ids.
        positions: (B, 1) position of each row's token, or None for the slot itself.
        cache: The `KVCache` of the earlier tokens; the new keys and values are written into it.
        previous: (B,) the token before each row's new one (a model with bigram embeddings reads it), or None.

    Returns:
        (B, 1, n_embd) hidden states after the last block (and `ln_f` for pre-norm models).
    """
    slot = cache.pos
    assert idx.size(1) == 1 and 0 < slot < cache.capacity, "one new token after a prefill, with room for it"
    cache.pos = slot + 1
    position = slot if positions is None else positions[:, 0]  # the same for every row, or (B,)
    x = _embed(model, idx[:, 0], position, previous)  # (B, C)
    rope = None
    if model.config.positional == "rotary":
        rope = model.rope_cos[position], model.rope_sin[position]  # (hs/2,) or (B, hs/2)
        rope = rope if positions is None else tuple(t[:, None, None] for t in rope)  # broadcast over heads
    mask = ~cache.key_padding_mask[:, None, None, : slot + 1] if cache.has_padding else None  # (B, 1, 1, S)
    for block in model.transformer.h:
        if block.norm_first:
            x = x + _attend(block.attn, block.ln_1(x), rope, mask, cache, slot)
            x = x + block.mlp(block.ln_2(x))
        else:
            x = block.ln_1(x + _attend(block.attn, x, rope, mask, cache, slot))
            x = block.ln_2(x + block.mlp(x))
    if model.config.norm_first:
        x = model.transformer.ln_f(x)
    return x[:, None]


def _embed(model: GPT, idx: Tensor, position: int | Tensor, previous: Tensor | None) -> Tensor:
    """`model.embed` of one token per row without dropout: (B,) ids at `position` (int or (B,)) after the
    `previous` (B,) ids -> (B, C).

    A position shared by every row reads its row of a position table as a view, with no index op."""
    config, transformer = model.config, model.transformer
    if model.adaptive_input:
        x = adaptive_input_embedding(idx, model.adaptive, model.shortlist_weight)
    else:
        x = F.embedding(idx, transformer.wte.weight)
    if config.scale_embedding:
        x = x * math.sqrt(config.n_embd)
    if config.positional == "learned":
        x = x + transformer.wpe.weight[position]
    elif config.positional == "sinusoidal":
        x = x + model.sinusoidal[position].to(x.dtype)
    if config.bigram_buckets:
        if previous is None:
            raise ValueError("This model has bigram embeddings (bigram_buckets > 0): a decoding step needs `previous`.")
        x = x + model.bigram_embedding(previous, idx)
    return x


def _attend(
    attn: CausalSelfAttention, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache,
    slot: int,
) -> Tensor:  # fmt: skip
    """`attn(x, ...)` for one token per row (x (B, C)) at `slot` of `cache`: (B, C)."""
    B, C = x.shape
    # c_attn's output rows are [q; k; v], each head after head: one view splits them, no transposes.
    q, k, v = attn.c_attn(x).view(B, 3, attn.n_head, 1, C // attn.n_head).unbind(1)  # (B, nh, 1, hs)
    if attn.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    keys, values = cache.k[attn.layer], cache.v[attn.layer]  # (B, nh, block_size, hs)
    keys[:, :, slot : slot + 1] = k
    values[:, :, slot : slot + 1] = v
    # The cache may be kept in another dtype than the one autocast computes in (as `KVCache.update`).
    keys, values = keys[:, :, : slot + 1].to(q.dtype), values[:, :, : slot + 1].to(q.dtype)
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, 1, hs)
    return attn.c_proj(y.reshape(B, C))  # one query per row: (B, nh, 1, hs) is (B, C) head after head


def _plain_trunk(
    model: GPT, idx: Tensor, positions: Tensor | None, cache: KVCache, previous: Tensor | None = None
) -> Tensor:
    return model.hidden_states(idx, positions=positions, cache=cache, previous=previous)


def _on_one_thread(
    fn: Trunk, idx: Tensor, positions: Tensor | None, cache: KVCache, previous: Tensor | None = None
) -> Tensor:
    with one_thread():
        return fn(idx, positions, cache, previous)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one intra-op thread inside the block, then restore the thread count.

    The count is per OS thread once that thread has run a parallel op (OpenMP keeps it per thread), so
    other Python threads that already use torch keep theirs.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _probe_step(trunk: Trunk, cache: KVCache, head: Callable[[Tensor], Tensor] | None) -> None:
    """One decoding step through `trunk` and `head` at slot 1 of the otherwise empty `cache`."""
    idx = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.k[0].device)
    cache.reset()
    cache.pos = 1  # slot 0 stands for the prefill (its zero keys are as good as any for timing)
    try:
        hidden = trunk(idx, None, cache, idx[:, 0])
        if head is not None:
            head(hidden[:, -1])
    finally:
        cache.reset()


# -- the greedy pick ---------------------------------------------------------------------------------


def greedy_pick(logits: Tensor, choice: PickChoice = "auto") -> Tensor:
    """Each row's index of its largest score, the first one on ties (NaN counts as largest): (B, V) -> (B,).

    Args:
        logits: (B, V) scores.
        choice: "plain" (`logits.argmax(-1)`), "chunked" (`chunked_argmax` on one thread) or "auto"
            (see `resolve_pick`).

    Raises:
        UserError: `choice` is not one of the three.
    """
    return _PICK_FNS[resolve_pick(logits, choice)](logits)


def resolve_pick(logits: Tensor, choice: PickChoice = "auto") -> str:
    """The greedy pick `choice` stands for: itself, or for "auto" the faster of the two for scores like
    `logits`, measured once per device, dtype and shape (on random scores)."""
    if choice not in PICK_CHOICES:
        raise UserError(f"pick must be one of {', '.join(map(repr, PICK_CHOICES))}, got {choice!r}.")
    if choice != "auto":
        return choice
    key = (logits.device, logits.dtype, tuple(logits.shape))
    if key not in _PICKS:
        sample = torch.randn(logits.shape, device=logits.device).to(logits.dtype)
        _PICKS[key] = _fastest(_PICK_FNS, lambda pick: pick(sample), logits.device)
    return _PICKS[key]


def _chunked_on_one_thread(logits: Tensor) -> Tensor:
    # The chunk maxima are microseconds of work: split between threads, they would wait at each join.
    with one_thread():
        return chunked_argmax(logits)


def chunked_argmax(logits: Tensor) -> Tensor:
    """`logits.argmax(-1)` of (B, V) scores in two passes: the maximum of each of K chunks (a vectorised
    reduction), the first chunk holding the row's maximum, then the argmax inside that chunk alone.

    The first chunk reaching the maximum holds its first index, so ties resolve as `argmax` does; a NaN
    is its chunk's maximum and the first chunk with one wins, so NaN resolves as `argmax` does too.
    """
    B, V = logits.shape
    P = _chunk_size(V)
    chunks = logits.reshape(B, V // P, P)  # (B, K, P), a view when each row is contiguous
    best = chunks.amax(-1).argmax(-1)  # (B,) first chunk holding the maximum
    inside = chunks.gather(1, best.view(B, 1, 1).expand(B, 1, P)).squeeze(1)  # (B, P)
    return best * P + inside.argmax(-1)


@lru_cache(maxsize=64)
def _chunk_size(V: int) -> int:
    # A divisor of V (the chunks tile the row exactly) near 1024 scores: few chunk maxima to compare
    # and a short final argmax. A prime V gets one chunk, i.e. a plain argmax ("auto" then keeps plain).
    divisors = {d for i in range(1, math.isqrt(V) + 1) if V % i == 0 for d in (i, V // i)}
    return min(divisors, key=lambda d: (abs(d - 1024), d))


def _argmax(logits: Tensor) -> Tensor:
    return logits.argmax(-1)


_PICK_FNS: dict[str, Callable[[Tensor], Tensor]] = {"plain": _argmax, "chunked": _chunked_on_one_thread}


# -- the one-time measurements -----------------------------------------------------------------------

_TRUNKS: dict[tuple, str] = {}  # (device, dtype, config, batch size, threads) -> the fastest trunk's name
_PICKS: dict[tuple, str] = {}  # (device, dtype, shape) -> the fastest greedy pick's name
_ROUNDS = 5  # timed calls per contender in a measurement (the median counts)


def decode_step_cache_size() -> int:
    """Measurements held now (a benchmark checks that its cold row starts from 0)."""
    return len(_TRUNKS) + len(_PICKS)


def reset_decode_steps() -> None:
    """Forget every trunk and greedy-pick measurement (benchmarks use it to time the cold first call)."""
    _TRUNKS.clear()
    _PICKS.clear()


def _fastest(contenders: dict[str, Callable], run: Callable[[Callable], object], device: torch.device) -> str:
    """The name of the contender whose `run(contender)` took the least median time over `_ROUNDS` timed
    turns, after one untimed turn each (a first call may include warm-up); a tie goes to the first one
    (the reference). The median, not the fastest turn: on a loaded machine a contender on several threads
    is sometimes quick and usually slow (its join waits for a core), and the usual cost is what counts."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            run(fn)
        for _ in range(_ROUNDS):
            for name, fn in contenders.items():
                times[name].append(_seconds(partial(run, fn), device))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return min(median, key=median.__getitem__)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`, the device's queued work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0
